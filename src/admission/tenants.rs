//! Tenants as admission sees them: the one tenant of a route without a
//! `tenant_key`, the bounded count of whom admission shed, and how a tenant is
//! shown.

use std::collections::HashMap;

use serde::Serialize;

use crate::client_key::ClientKey;

/// The tenant of every request on a route without a `tenant_key`.
pub fn everyone() -> ClientKey {
    ClientKey::Digest(0)
}

/// Tenants counted in [`ShedCounts`]: with more, the least-shed is replaced.
pub const SHED_TENANTS: usize = 256;

/// Requests shed per tenant, for the heaviest few: at most
/// [`SHED_TENANTS`] tenants are kept (the space-saving heavy-hitter count:
/// a tenant not kept takes the place of the least-shed one, inheriting its
/// count), so a flood of one-off tenants costs a bounded table and the
/// tenants shed most stay at the top with their counts.
#[derive(Debug, Default)]
pub(crate) struct ShedCounts {
    counts: HashMap<ClientKey, u64>,
}

impl ShedCounts {
    pub(crate) fn count(&mut self, tenant: &ClientKey) {
        if let Some(n) = self.counts.get_mut(tenant) {
            *n += 1;
            return;
        }
        let mut inherited = 0;
        if self.counts.len() >= SHED_TENANTS
            && let Some((least, n)) = self
                .counts
                .iter()
                .min_by_key(|(_, n)| **n)
                .map(|(t, n)| (t.clone(), *n))
        {
            self.counts.remove(&least);
            inherited = n;
        }
        self.counts.insert(tenant.clone(), inherited + 1);
    }

    /// The `n` tenants shed most, most first.
    pub(crate) fn top(&self, n: usize) -> Vec<TenantCount> {
        let mut top: Vec<_> = self.counts.iter().collect();
        top.sort_by_key(|&(_, n)| std::cmp::Reverse(*n));
        top.into_iter()
            .take(n)
            .map(|(t, n)| TenantCount::new(t, *n))
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.counts.len()
    }
}

/// A tenant and a count, as `/status` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantCount {
    /// The tenant: a client address, or the start of its header value (an
    /// API key is a secret: enough of it to tell tenants apart, not to use
    /// it), or `#<digest>` for a long value.
    pub tenant: String,
    /// Requests.
    pub count: u64,
}

impl TenantCount {
    pub(crate) fn new(tenant: &ClientKey, count: u64) -> Self {
        Self {
            tenant: shown(tenant),
            count,
        }
    }
}

/// Characters of a header-value tenant shown in full; a longer one shows its
/// first [`SHOWN_PREFIX`] and an ellipsis.
const SHOWN_WHOLE: usize = 12;
const SHOWN_PREFIX: usize = 6;

fn shown(tenant: &ClientKey) -> String {
    match tenant {
        ClientKey::Ip(ip) => ip.to_string(),
        ClientKey::Value(bytes) => {
            let text = String::from_utf8_lossy(bytes);
            if text.chars().count() <= SHOWN_WHOLE {
                text.into_owned()
            } else {
                let prefix: String = text.chars().take(SHOWN_PREFIX).collect();
                format!("{prefix}…")
            }
        }
        ClientKey::Digest(d) => format!("#{d:016x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ClientKey {
        ClientKey::Value(s.as_bytes().into())
    }

    #[test]
    fn the_heaviest_stay_exact_and_the_table_stays_bounded() {
        let mut c = ShedCounts::default();
        for _ in 0..1000 {
            c.count(&key("flood"));
        }
        for i in 0..10 * SHED_TENANTS {
            c.count(&key(&format!("one-off-{i}")));
        }
        assert_eq!(c.len(), SHED_TENANTS);
        assert_eq!(
            c.top(1),
            [TenantCount {
                tenant: "flood".into(),
                count: 1000
            }]
        );
    }

    #[test]
    fn secrets_are_shown_only_in_part() {
        assert_eq!(shown(&key("team-a")), "team-a");
        assert_eq!(shown(&key("sk_live_0123456789abcdef")), "sk_liv…");
        assert_eq!(
            shown(&ClientKey::Ip("10.0.0.1".parse().unwrap())),
            "10.0.0.1"
        );
    }
}
