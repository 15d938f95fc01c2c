//! A request's priority class, and whom to believe about it.
//!
//! A class decides who waits and who is evicted from a full queue, so a client
//! able to name its own class could push everyone else out: the header is
//! believed only from trusted peers (the route's load balancers or internal
//! callers), and a plan can carry a class instead (the rate-limit tier of the
//! client's key). HAProxy's `http-request set-priority-class` and Envoy's
//! runtime priorities are likewise set by the proxy's own rules, never taken
//! from the client as is.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request};
use ipnet::IpNet;

use crate::conn::{ClientAddr, ClientTier};

/// A request's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Shed first, admitted last (backfills, replays).
    Batch = 0,
    /// The default.
    Normal = 1,
    /// Admitted first, shed last (health-critical writes).
    Critical = 2,
}

impl Priority {
    /// `critical`, `normal` or `batch` (any case); anything else, or no header,
    /// is `normal`.
    pub fn from_header(value: Option<&HeaderValue>) -> Self {
        value
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
            .unwrap_or(Priority::Normal)
    }

    /// `critical`, `normal` or `batch`, in any case and with white space
    /// around; anything else is `None`.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        [Priority::Critical, Priority::Normal, Priority::Batch]
            .into_iter()
            .find(|p| value.eq_ignore_ascii_case(p.as_str()))
    }

    /// The class name, as in the header and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::Batch => "batch",
            Priority::Normal => "normal",
            Priority::Critical => "critical",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Whose priority header is believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Every caller's: for a service whose callers are all trusted (behind
    /// its own authentication).
    Anyone,
    /// Only peers in these networks (the socket peer, from
    /// [`ClientAddr`]); a request without a known peer is not believed.
    Peers(Vec<IpNet>),
}

/// Where a request's class comes from: the header, from a trusted peer; else
/// the class of the client's rate-limit tier ([`ClientTier`]); else
/// [`Priority::Normal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityRule {
    header: HeaderName,
    trust: Trust,
    tiers: Vec<(Arc<str>, Priority)>,
}

impl PriorityRule {
    /// Classes from `header`, believed from anyone (narrow it with
    /// [`PriorityRule::trusted_peers`]).
    pub fn header(header: HeaderName) -> Self {
        Self {
            header,
            trust: Trust::Anyone,
            tiers: Vec::new(),
        }
    }

    /// Believes the header only from peers in `networks` (none: from nobody).
    pub fn trusted_peers(mut self, networks: Vec<IpNet>) -> Self {
        self.trust = Trust::Peers(networks);
        self
    }

    /// Clients of rate-limit tier `name` get `priority` (unless a trusted
    /// peer's header says otherwise).
    pub fn tier(mut self, name: impl Into<Arc<str>>, priority: Priority) -> Self {
        self.tiers.push((name.into(), priority));
        self
    }

    /// The class of `req`.
    pub fn of<B>(&self, req: &Request<B>) -> Priority {
        self.of_claiming(req, req.headers().get(&self.header))
    }

    /// The class of `req`, whose header says `claim`.
    fn of_claiming<B>(&self, req: &Request<B>, claim: Option<&HeaderValue>) -> Priority {
        if let Some(value) = claim
            && self.believes(req.extensions().get::<ClientAddr>().map(|c| c.addr().ip()))
        {
            return Priority::from_header(Some(value));
        }
        if self.tiers.is_empty() {
            return Priority::Normal;
        }
        req.extensions()
            .get::<ClientTier>()
            .and_then(|tier| self.tiers.iter().find(|(name, _)| *name == tier.0))
            .map_or(Priority::Normal, |&(_, priority)| priority)
    }

    /// The class of `req`, written into its header for the next tier: a
    /// tier behind this proxy that trusts it (README's layering) must see the
    /// class decided here, never a claim this proxy did not believe.
    pub fn decide<B>(&self, req: &mut Request<B>) -> Priority {
        let claim = req.headers().get(&self.header);
        let claimed = claim.is_some();
        let priority = self.of_claiming(req, claim);
        if priority != Priority::Normal || claimed {
            req.headers_mut().insert(
                self.header.clone(),
                HeaderValue::from_static(priority.as_str()),
            );
        }
        priority
    }

    fn believes(&self, peer: Option<IpAddr>) -> bool {
        match &self.trust {
            Trust::Anyone => true,
            // A dual-stack listener sees IPv4 peers as `::ffff:a.b.c.d`.
            Trust::Peers(networks) => peer.is_some_and(|ip| {
                let ip = ip.to_canonical();
                networks.iter().any(|net| net.contains(&ip))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn request(peer: Option<&str>, header: Option<&str>, tier: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(peer) = peer {
            let addr: SocketAddr = peer.parse().unwrap();
            req.extensions_mut().insert(ClientAddr::new(addr));
        }
        if let Some(value) = header {
            req.headers_mut()
                .insert("x-priority", HeaderValue::from_str(value).unwrap());
        }
        if let Some(tier) = tier {
            req.extensions_mut().insert(ClientTier(tier.into()));
        }
        req
    }

    #[test]
    fn header_parsing() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            Priority::from_header(Some(&v("Critical"))),
            Priority::Critical
        );
        assert_eq!(Priority::from_header(Some(&v(" batch "))), Priority::Batch);
        assert_eq!(
            Priority::from_header(Some(&v("urgent!!"))),
            Priority::Normal
        );
        assert_eq!(Priority::from_header(None), Priority::Normal);
        assert_eq!(Priority::parse("NORMAL"), Some(Priority::Normal));
        assert_eq!(Priority::parse("high"), None);
    }

    #[test]
    fn the_header_counts_only_from_trusted_peers() {
        let rule = PriorityRule::header(HeaderName::from_static("x-priority"))
            .trusted_peers(vec!["10.0.0.0/8".parse().unwrap()]);
        let of = |peer, header| rule.of(&request(peer, header, None));
        assert_eq!(
            of(Some("10.1.2.3:5000"), Some("critical")),
            Priority::Critical
        );
        assert_eq!(of(Some("10.1.2.3:5000"), Some("batch")), Priority::Batch);
        assert_eq!(
            of(Some("192.0.2.7:5000"), Some("critical")),
            Priority::Normal
        );
        assert_eq!(
            of(None, Some("critical")),
            Priority::Normal,
            "no known peer"
        );
        let nobody =
            PriorityRule::header(HeaderName::from_static("x-priority")).trusted_peers(Vec::new());
        assert_eq!(
            nobody.of(&request(Some("10.1.2.3:5000"), Some("critical"), None)),
            Priority::Normal
        );
        let anyone = PriorityRule::header(HeaderName::from_static("x-priority"));
        assert_eq!(
            anyone.of(&request(None, Some("critical"), None)),
            Priority::Critical
        );
    }

    #[test]
    fn a_tier_carries_its_class_unless_a_trusted_header_says_otherwise() {
        let rule = PriorityRule::header(HeaderName::from_static("x-priority"))
            .trusted_peers(vec!["10.0.0.0/8".parse().unwrap()])
            .tier("gold", Priority::Critical)
            .tier("bulk", Priority::Batch);
        let of = |peer, header, tier| rule.of(&request(peer, header, tier));
        let outside = Some("192.0.2.7:5000");
        assert_eq!(of(outside, None, Some("gold")), Priority::Critical);
        assert_eq!(of(outside, Some("critical"), Some("bulk")), Priority::Batch);
        assert_eq!(of(outside, None, Some("silver")), Priority::Normal);
        assert_eq!(
            of(Some("10.0.0.1:1"), Some("batch"), Some("gold")),
            Priority::Batch,
            "a trusted peer's header wins"
        );
    }
}
