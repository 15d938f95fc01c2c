//! Tenants as admission sees them: who a request's tenant is ([`Tenants`]),
//! the one tenant of a route without a `tenant_key`, the bounded count of
//! whom admission shed, and how a tenant is shown.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::client_key::{ClientKey, KeyExtractor};

/// Who a request's tenant is: what `keys` finds (an address, a header
/// value). A header value is the client's own word, and tenants take turns:
/// a client inventing a name per request would get a turn per name. So each
/// client address may be at most `per_client` tenants at once (names it used
/// in the last [`NAMES_KEPT_FOR`]); a further name counts as the first of
/// its names. One client, one share, whatever it calls itself.
#[derive(Debug)]
pub struct Tenants {
    keys: KeyExtractor,
    per_client: Option<usize>,
    names: Mutex<Names>,
}

/// Each client address's names, and when the table was last swept.
#[derive(Debug, Default)]
struct Names {
    by_address: HashMap<IpAddr, Vec<(ClientKey, Instant)>>,
    swept: Option<Instant>,
}

/// How long a client's tenant name counts against its share after its last use.
pub const NAMES_KEPT_FOR: Duration = Duration::from_secs(10);

/// Client addresses whose names are kept at once: past it (after dropping
/// the stale), a new address's requests are its address's tenant.
const ADDRESSES: usize = 65_536;

impl Tenants {
    /// Tenants as `keys` finds them, each client address at most
    /// `per_client` of them (`None`: no bound, for callers that are all
    /// trusted).
    pub fn new(keys: KeyExtractor, per_client: Option<usize>) -> Self {
        Self {
            keys,
            per_client: per_client.map(|n| n.max(1)),
            names: Mutex::new(Names::default()),
        }
    }

    /// The tenant of a request with these headers and extensions.
    pub fn of(&self, headers: &http::HeaderMap, extensions: &http::Extensions) -> ClientKey {
        let key = self.keys.key(headers, extensions);
        let Some(cap) = self.per_client else {
            return key;
        };
        if matches!(key, ClientKey::Ip(_)) {
            return key; // named by its address: nothing to invent
        }
        let address = self.keys.address(headers, extensions);
        let now = Instant::now();
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < NAMES_KEPT_FOR;
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let Names { by_address, swept } = &mut *names;
        if by_address.len() >= ADDRESSES && !by_address.contains_key(&address) {
            // Swept at most once a second: a flood of new addresses costs
            // a lookup each, not a scan each.
            if swept.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1)) {
                *swept = Some(now);
                by_address.retain(|_, used| {
                    used.retain(|(_, at)| fresh(at));
                    !used.is_empty()
                });
            }
            if by_address.len() >= ADDRESSES {
                return ClientKey::Ip(address);
            }
        }
        let used = by_address.entry(address).or_default();
        used.retain(|(_, at)| fresh(at));
        if let Some((_, at)) = used.iter_mut().find(|(name, _)| *name == key) {
            *at = now;
            return key;
        }
        if used.len() < cap {
            used.push((key.clone(), now));
            return key;
        }
        used[0].0.clone()
    }
}

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
