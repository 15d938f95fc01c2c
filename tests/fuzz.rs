//! Property tests (proptest) for the two places that parse what others send:
//! the config file and request headers. Bounded: 256 cases each in `cargo
//! test`; `PROPTEST_CASES=100000 cargo test --test fuzz` (or `bash
//! scripts/fuzz.sh`) runs longer.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue, Uri, Version};
use proptest::prelude::*;
use sluicegate::config::Config;
use sluicegate::conn::ClientAddr;
use sluicegate::proxy::headers::{prepare_request, prepare_response};
use sluicegate::rate_limit::KeySource;
use sluicegate::rate_limit::{ClientKey, KeyExtractor};

/// Lines that look like sluicegate config, some right, some subtly wrong.
fn config_line() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "[server]",
        "[[route]]",
        "[route.admission]",
        "[route.circuit]",
        "[route.rate_limit]",
        "[[route.rate_limit.tier]]",
        "[route.admission.adaptive]",
        "[route.circuit.fallback]",
        "listen",
        "admin_listen",
        "upstream",
        "path_prefix",
        "host",
        "name",
        "timeout_ms",
        "max_inflight",
        "queue_capacity",
        "failure_threshold",
        "per_second",
        "burst",
        "key",
        "trusted_proxies",
        "keys",
        "algorithm",
        "min_limit",
        "status",
        "max_body_bytes",
        "failure_statuses",
        "admin_token",
        "read_timeout_ms",
        "max_header_bytes",
    ]);
    let values = prop::sample::select(vec![
        "0",
        "1",
        "-1",
        "16",
        "1e9",
        "0.5",
        "\"adaptive\"",
        "\"ip\"",
        "\"header:x-k\"",
        "\"http://127.0.0.1:9000\"",
        "\"/\"",
        "\"127.0.0.1:0\"",
        "[500, 503]",
        "[]",
        "[\"10.0.0.0/8\"]",
        "\"gradient\"",
        "true",
        "\"\"",
        "\"x\"",
        "{ status = 200 }",
        "99999999999999999999",
        "\"\\u0000\"",
    ]);
    (keys, values, any::<bool>()).prop_map(|(k, v, section)| {
        if k.starts_with('[') && section {
            k.to_string()
        } else {
            format!("{} = {v}", k.trim_matches(['[', ']']))
        }
    })
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics_the_config_parser(text in "\\PC{0,400}") {
        let _ = Config::parse("fuzz.toml", &text);
    }

    #[test]
    fn config_like_text_parses_or_names_a_problem(lines in prop::collection::vec(config_line(), 0..30)) {
        let text = lines.join("\n");
        match Config::parse("fuzz.toml", &text) {
            Ok(config) => prop_assert!(!config.routes.is_empty()),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("fuzz.toml"), "{msg}");
                prop_assert!(msg.len() > "fuzz.toml: ".len(), "{msg}");
            }
        }
    }

    #[test]
    fn header_rewriting_never_panics_and_drops_every_hop_by_hop_header(
        headers in prop::collection::vec(("[a-zA-Z0-9-]{1,20}", "[ -~]{0,40}"), 0..20),
        connection in "[a-zA-Z0-9, -]{0,60}",
        ip in any::<[u8; 4]>(),
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in &headers {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
                map.append(n, v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&connection) {
            map.append(http::header::CONNECTION, v);
        }
        let named: Vec<HeaderName> = connection
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        let mut request = map.clone();
        let client = sluicegate::conn::ClientAddr::new(std::net::SocketAddr::new(IpAddr::from(ip), 4000));
        prepare_request(&mut request, Version::HTTP_11, &Uri::from_static("/"), Some(&client));
        let mut response = map;
        prepare_response(&mut response, Version::HTTP_11);
        for out in [&request, &response] {
            for hop in ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection"] {
                prop_assert!(!out.contains_key(hop), "{hop} survived");
            }
            for name in &named {
                let forwarded = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "host"];
                if !forwarded.contains(&name.as_str()) {
                    prop_assert!(!out.contains_key(name), "{name} named by Connection survived");
                }
            }
        }
        let xff = request.get("x-forwarded-for").unwrap().to_str().unwrap();
        prop_assert!(xff.ends_with(&IpAddr::from(ip).to_string()));
    }

    #[test]
    fn forwarded_for_from_an_untrusted_peer_never_picks_the_key(
        lines in prop::collection::vec("[ -~]{0,80}", 0..5),
        peer in any::<[u8; 4]>(),
    ) {
        let keys = KeyExtractor::new(&KeySource::Ip, vec!["10.0.0.0/8".parse().unwrap()]);
        let mut headers = HeaderMap::new();
        for line in &lines {
            if let Ok(v) = HeaderValue::from_str(line) {
                headers.append("x-forwarded-for", v);
            }
        }
        let peer = IpAddr::from(peer);
        let mut ext = http::Extensions::new();
        ext.insert(ClientAddr::new(SocketAddr::new(peer, 1)));
        let key = keys.key(&headers, &ext);
        if !matches!(peer, IpAddr::V4(v4) if v4.octets()[0] == 10) {
            prop_assert_eq!(key, ClientKey::Ip(peer));
        }
    }
}
