//! Keys, the capped store, verdicts and tiers (paused clock, no sleeps).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use governor::state::keyed::ShrinkableKeyedStateStore;
use http::{HeaderMap, HeaderValue};
use metrics::{Counter, Gauge};

use super::KeySource;
use super::*;
use crate::config::RateLimitConfig;
use crate::conn::ClientAddr;

fn request(peer: &str, headers: &[(&str, &str)]) -> (HeaderMap, http::Extensions) {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let mut ext = http::Extensions::new();
    let ip: IpAddr = peer.parse().unwrap();
    ext.insert(ClientAddr::new(SocketAddr::new(ip, 40000)));
    (map, ext)
}

fn ip(s: &str) -> ClientKey {
    ClientKey::Ip(s.parse().unwrap())
}

#[test]
fn an_untrusted_peer_cannot_pick_its_key() {
    let keys = KeyExtractor::new(&KeySource::Ip, Vec::new());
    let (h, e) = request("203.0.113.9", &[("x-forwarded-for", "1.1.1.1")]);
    assert_eq!(keys.key(&h, &e), ip("203.0.113.9"));
    // Trusting someone else changes nothing for this peer either.
    let keys = KeyExtractor::new(&KeySource::Ip, vec!["10.0.0.0/8".parse().unwrap()]);
    assert_eq!(keys.key(&h, &e), ip("203.0.113.9"));
}

#[test]
fn behind_trusted_proxies_the_client_is_the_rightmost_untrusted_address() {
    let trusted = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
    let keys = KeyExtractor::new(&KeySource::Ip, trusted);
    let cases: &[(&[&str], &str)] = &[
        // The client spoofs a first entry; the load balancer appended the real one.
        (&["6.6.6.6, 198.51.100.7"], "198.51.100.7"),
        (&["6.6.6.6, 198.51.100.7, 10.0.0.2"], "198.51.100.7"),
        // Several header lines are one list, in order.
        (
            &["6.6.6.6", "198.51.100.7:5555", "10.1.1.1"],
            "198.51.100.7",
        ),
        // An IPv6 client is its /64.
        (&["[2001:db8::7]:443, fd00::1"], "2001:db8::"),
        (&["::ffff:198.51.100.8"], "198.51.100.8"),
        // Only trusted hops: the left-most is as far as we can see.
        (&["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
        // Garbage from a trusted hop: stop at the last address we trust.
        (&["198.51.100.7, garbage, 10.0.0.2"], "10.0.0.2"),
        (&[], "10.9.9.9"),
    ];
    for (lines, want) in cases {
        let headers: Vec<(&str, &str)> = lines.iter().map(|l| ("x-forwarded-for", *l)).collect();
        let (h, e) = request("10.9.9.9", &headers);
        assert_eq!(keys.key(&h, &e), ip(want), "{lines:?}");
    }
}

#[test]
fn ipv6_clients_are_their_network() {
    let (h, e) = request("2001:db8:0:1:aaaa::5", &[]);
    let keys = KeyExtractor::new(&KeySource::Ip, Vec::new());
    assert_eq!(keys.key(&h, &e), ip("2001:db8:0:1::"));
    let keys = keys.ipv6_prefix(48);
    assert_eq!(keys.key(&h, &e), ip("2001:db8::"));
    let keys = keys.ipv6_prefix(128);
    assert_eq!(keys.key(&h, &e), ip("2001:db8:0:1:aaaa::5"));
    // IPv4 stays whole.
    let (h, e) = request("192.0.2.77", &[]);
    assert_eq!(keys.key(&h, &e), ip("192.0.2.77"));
}

#[test]
fn header_keys_fall_back_to_the_address_and_long_ones_are_digested() {
    let name = http::HeaderName::from_static("x-api-key");
    let keys = KeyExtractor::new(&KeySource::Header(name), Vec::new());
    let (h, e) = request("192.0.2.1", &[("x-api-key", "team-a")]);
    assert_eq!(keys.key(&h, &e), ClientKey::Value(b"team-a"[..].into()));
    let (h, e) = request("192.0.2.1", &[]);
    assert_eq!(keys.key(&h, &e), ip("192.0.2.1"));
    let long = "k".repeat(500);
    let (h, e) = request("192.0.2.1", &[("x-api-key", &long)]);
    let key = keys.key(&h, &e);
    assert!(matches!(key, ClientKey::Digest(_)));
    assert_eq!(key, ClientKey::listed(&KeySource::Ip, &long, keys.hasher()));
}

fn limiter(per_second: f64, burst: u32) -> RateLimiter {
    RateLimiter::new(
        Rate {
            per_second,
            burst: Some(burst),
        },
        100_000,
    )
}

#[tokio::test(start_paused = true)]
async fn verdicts_carry_retry_after_and_the_ratelimit_fields() {
    let limiter = limiter(1.0, 2);
    let a = ip("192.0.2.1");
    let first = limiter.check(&a);
    assert_eq!(first.retry_after_s, None);
    assert_eq!(first.policy, "\"default\";q=2;w=2");
    assert_eq!(first.state, "\"default\";r=1;t=1");
    assert_eq!(limiter.check(&a).state, "\"default\";r=0;t=2");
    let refused = limiter.check(&a);
    assert_eq!(refused.retry_after_s, Some(1));
    assert_eq!(refused.state, "\"default\";r=0;t=2");
    // Another client is unaffected.
    assert_eq!(limiter.check(&ip("192.0.2.2")).retry_after_s, None);
    // A second later one token is back.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(limiter.check(&a).retry_after_s, None);
    assert_eq!(limiter.check(&a).retry_after_s, Some(1));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_the_wait_rounded_up() {
    let limiter = limiter(0.1, 1); // one per 10 s
    let a = ip("192.0.2.1");
    assert_eq!(limiter.check(&a).retry_after_s, None);
    assert_eq!(limiter.check(&a).retry_after_s, Some(10));
    tokio::time::advance(Duration::from_millis(6_500)).await;
    assert_eq!(limiter.check(&a).retry_after_s, Some(4));
}

#[tokio::test(start_paused = true)]
async fn tiers_have_their_own_rate() {
    let text = r#"
        [[route]]
        upstream = "http://127.0.0.1:9"
        [route.rate_limit]
        key = "header:x-api-key"
        per_second = 1
        burst = 1
        [[route.rate_limit.tier]]
        name = "gold"
        keys = ["gold-key"]
        per_second = 100
        burst = 5
    "#;
    let config = crate::config::Config::parse("t.toml", text).unwrap();
    let config: &RateLimitConfig = config.routes[0].rate_limit.as_ref().unwrap();
    let metrics = RateLimitMetrics::new("t", &crate::metrics::Registry::new());
    let limiter = RateLimiter::with_settings(&config.into(), metrics);
    let gold = ClientKey::Value(b"gold-key"[..].into());
    for _ in 0..5 {
        let v = limiter.check(&gold);
        assert_eq!(v.retry_after_s, None);
        assert_eq!(v.policy, "\"gold\";q=5;w=1");
    }
    let plain = ClientKey::Value(b"other"[..].into());
    assert_eq!(limiter.check(&plain).retry_after_s, None);
    assert_eq!(limiter.check(&plain).retry_after_s, Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_million_keys_stay_within_the_cap_and_share_the_overflow_bucket() {
    let limiter = RateLimiter::new(
        Rate {
            per_second: 1.0,
            burst: Some(1),
        },
        1_000,
    );
    for i in 0..1_000_000u32 {
        limiter.check(&ClientKey::Ip(IpAddr::from(i.to_be_bytes())));
    }
    assert_eq!(limiter.keys(), 1_000);
    // Past the cap, new clients are limited together, never let through free.
    let newcomer = ClientKey::Ip("198.51.100.1".parse().unwrap());
    assert_eq!(limiter.check(&newcomer).retry_after_s, Some(1));
    // Known clients keep their own bucket.
    let known = ClientKey::Ip(IpAddr::from(5u32.to_be_bytes()));
    assert_eq!(limiter.check(&known).retry_after_s, Some(1));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(limiter.check(&known).retry_after_s, None);
}

#[tokio::test(start_paused = true)]
async fn pruning_forgets_clients_whose_bucket_refilled() {
    let limiter = limiter(10.0, 10);
    for i in 0..100u32 {
        limiter.check(&ClientKey::Ip(IpAddr::from(i.to_be_bytes())));
    }
    assert_eq!(limiter.keys(), 100);
    limiter.prune();
    assert_eq!(limiter.keys(), 100, "buckets not yet refilled");
    tokio::time::advance(Duration::from_millis(150)).await;
    limiter.check(&ip("192.0.2.200"));
    tokio::time::advance(Duration::from_millis(60)).await;
    limiter.prune();
    assert_eq!(limiter.keys(), 1, "only the recent client is kept");
    tokio::time::advance(Duration::from_secs(1)).await;
    limiter.prune();
    assert_eq!(limiter.keys(), 0);
}

#[test]
fn the_store_counts_what_it_holds() {
    let store: CappedStore<u32> = CappedStore::new(2, Counter::noop(), Gauge::noop());
    assert!(store.is_empty());
    use governor::state::StateStore;
    for k in 0..5u32 {
        let _: Result<(), ()> = store.measure_and_replace(&k, |_| Ok(((), 7u64.into())));
    }
    assert_eq!(store.len(), 2);
    store.retain_recent(7u64.into());
    assert_eq!(store.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_largest_accepted_buckets_keep_governors_arithmetic_in_range() {
    // At the bound check-config enforces (a year to refill the burst), and at
    // the largest burst at the largest rate: no overflow, sane verdicts.
    for (per_second, burst) in [(0.1, 3_153_600), (1_000_000.0, u32::MAX)] {
        let limiter = limiter(per_second, burst);
        let a = ip("192.0.2.1");
        let decision = limiter.check(&a);
        assert_eq!(decision.retry_after_s, None, "{per_second} {burst}");
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(limiter.check(&a).retry_after_s, None);
    }
}
