use super::*;

fn err(text: &str) -> ConfigError {
    Config::parse("t.toml", text).expect_err("config should be refused")
}

const ROUTE: &str = "[[route]]\nupstream = \"http://127.0.0.1:9000\"\n";

/// Each `(lines, key, problem)`: `head` + `lines` is refused at `section.key`
/// with `problem` in the message.
fn assert_refused(head: &str, section: &str, cases: &[(&str, &str, &str)]) {
    for (lines, key, problem) in cases {
        let e = err(&format!("{head}{lines}\n"));
        let want = format!("{section}.{key}");
        assert_eq!(e.key(), Some(want.as_str()), "{lines}: {e}");
        assert!(e.to_string().contains(problem), "{lines}: {e}");
    }
}

#[test]
fn embedded_default_is_valid() {
    let config = Config::embedded_default().unwrap();
    assert_eq!(config.routes[0].display_name(), "ingest");
}

#[test]
fn minimal_config_gets_defaults() {
    let config = Config::parse("t.toml", ROUTE).unwrap();
    let route = &config.routes[0];
    assert_eq!(route.display_name(), "/");
    assert_eq!(route.timeout_ms.get(), std::time::Duration::from_secs(30));
    assert_eq!(
        route.write_timeout_ms.get(),
        std::time::Duration::from_secs(60)
    );
    assert_eq!(route.max_body_bytes.get(), 10 * 1024 * 1024);
    assert_eq!(config.server.listen.port(), 8080);
}

#[test]
fn unknown_key_is_named_with_its_path() {
    let e = err(&format!("{ROUTE}timeout_mss = 5\n"));
    assert_eq!(e.key(), Some("route[0].timeout_mss"));
    let e = err(&format!("[server]\nlisten_addr = \"x\"\n{ROUTE}"));
    assert_eq!(e.key(), Some("server.listen_addr"));
    let e = err(&format!("{ROUTE}[route.admision]\n"));
    assert_eq!(e.key(), Some("route[0].admision"));
    let e = err(&format!("[serv]\n{ROUTE}"));
    assert_eq!(e.key(), Some("serv"));
}

#[test]
fn upstream_tls_and_protocol() {
    // https:// builds the client side with the webpki roots and SNI from the
    // host; h2 over TLS offers ALPN h2.
    let text = "[[route]]\nupstream = \"https://api.example.com\"\nupstream_protocol = \"http2\"\n";
    let config = Config::parse("t.toml", text).unwrap();
    let route = &config.routes[0];
    assert_eq!(route.upstream_protocol, UpstreamProtocol::Http2);
    let tls = route.upstream_client_tls.as_ref().unwrap();
    assert_eq!(
        format!("{:?}", tls.server_name),
        "DnsName(\"api.example.com\")"
    );
    assert_eq!(tls.config.alpn_protocols, vec![b"h2".to_vec()]);
    let plain = Config::parse("t.toml", ROUTE).unwrap();
    assert!(plain.routes[0].upstream_client_tls.is_none());
    let https = "[[route]]\nupstream = \"https://127.0.0.1:8443\"\n";
    assert_refused(
        https,
        "route[0]",
        &[
            (
                "upstream_protocol = \"http3\"",
                "upstream_protocol",
                "http1",
            ),
            (
                "[route.upstream_tls]\nca_file = \"/nonexistent/ca.pem\"",
                "upstream_tls.ca_file",
                "cannot read",
            ),
            (
                "[route.upstream_tls]\ncert_file = \"/x.pem\"",
                "upstream_tls.key_file",
                "needed with cert_file",
            ),
            (
                "[route.upstream_tls]\nserver_name = \"not a name!\"",
                "upstream_tls.server_name",
                "not a DNS name",
            ),
        ],
    );
    assert_refused(
        ROUTE,
        "route[0]",
        &[(
            "[route.upstream_tls]\nserver_name = \"x\"",
            "upstream_tls",
            "needs an https:// upstream",
        )],
    );
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        ("upstream = \"ftp://x:1\"", "route[0].upstream", "scheme"),
        (
            "upstream = \"http://127.0.0.1:9000/base\"",
            "route[0].upstream",
            "path",
        ),
        ("upstream = \"not a url\"", "route[0].upstream", "not a URL"),
        (
            "upstream = \"127.0.0.1:9000\"",
            "route[0].upstream",
            "scheme",
        ),
        (
            "upstream = \"http://u:p@h:1\"",
            "route[0].upstream",
            "credentials",
        ),
    ];
    for (line, key, words) in cases {
        let e = err(&format!("[[route]]\n{line}\n"));
        assert_eq!(e.key(), Some(key), "{line}: {e}");
        assert!(e.message().contains(words), "{line}: {e}");
    }
    let limits = [
        ("timeout_ms = 0", "route[0].timeout_ms"),
        ("timeout_ms = -5", "route[0].timeout_ms"),
        ("max_body_bytes = 0", "route[0].max_body_bytes"),
        ("connect_timeout_ms = -1", "route[0].connect_timeout_ms"),
        ("write_timeout_ms = 0", "route[0].write_timeout_ms"),
    ];
    for (line, key) in limits {
        let e = err(&format!("{ROUTE}{line}\n"));
        assert_eq!(e.key(), Some(key), "{line}: {e}");
        assert!(e.message().contains("greater than 0"), "{line}: {e}");
    }
    let e = err(&format!("[server]\nmax_connections = 0\n{ROUTE}"));
    assert_eq!(e.key(), Some("server.max_connections"));
    for key in [
        "http2_idle_timeout_ms",
        "body_min_bytes_per_s",
        "send_min_bytes_per_s",
    ] {
        let e = err(&format!("[server]\n{key} = 0\n{ROUTE}"));
        assert_eq!(e.key(), Some(format!("server.{key}").as_str()), "{e}");
    }
    let e = err(&format!(
        "{ROUTE}write_timeout_ms = 1000\nconnect_timeout_ms = 2000\n"
    ));
    assert_eq!(e.key(), Some("route[0].write_timeout_ms"), "{e}");
    assert!(e.message().contains("at least connect_timeout_ms"), "{e}");
    let e = err(&format!("{ROUTE}[route.circuit]\nprobe_timeout_ms = 0\n"));
    assert_eq!(e.key(), Some("route[0].circuit.probe_timeout_ms"), "{e}");
    let e = err(&format!("[server]\nlisten = \"localhost:80\"\n{ROUTE}"));
    assert_eq!(e.key(), Some("server.listen"));
    assert!(e.message().contains("IP:port"), "{e}");
    let e = err(&format!("[server]\ndrain_timeout_ms = -1\n{ROUTE}"));
    assert_eq!(e.key(), Some("server.drain_timeout_ms"));
    let e = err("[[route]]\nupstream = \"http://h:1\"\npath_prefix = \"api\"\n");
    assert_eq!(e.key(), Some("route[0].path_prefix"));
}

#[test]
fn missing_upstream_is_named() {
    let e = err("[[route]]\nname = \"a\"\n");
    assert!(e.to_string().contains("upstream"), "{e}");
    assert!(e.to_string().contains("route[0]"), "{e}");
}

#[test]
fn cross_key_rules() {
    let e = err("");
    assert_eq!(e.key(), Some("route"));
    let e = err(&format!(
        "{ROUTE}name = \"a\"\n{ROUTE}name = \"a\"\npath_prefix = \"/b\"\n"
    ));
    assert_eq!(e.key(), Some("route[1].name"));
    let e = err(&format!("{ROUTE}name = \"a\"\n{ROUTE}name = \"b\"\n"));
    assert_eq!(e.key(), Some("route[1].path_prefix"));
    let e = err(&format!(
        "[server]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:1\"\n{ROUTE}"
    ));
    assert_eq!(e.key(), Some("server.admin_listen"));
}

#[test]
fn syntax_error_has_a_position() {
    let e = err("[server\n");
    assert!(e.to_string().starts_with("t.toml:1:"), "{e}");
    assert!(e.message().contains("TOML"), "{e}");
}

#[test]
fn host_normalization() {
    assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
    assert_eq!(normalize_host("[::1]:80"), "[::1]");
    assert_eq!(normalize_host("::1"), "::1");
}

#[test]
fn admission_section() {
    let c = Config::parse(
        "t.toml",
        &format!("{ROUTE}[route.admission]\nmax_inflight = 16\npriority_header = \"X-Class\"\n"),
    )
    .unwrap();
    let a = c.routes[0].admission.as_ref().unwrap();
    assert_eq!(a.max_inflight.fixed().map(|l| l.get()), Some(16));
    assert_eq!(a.queue_capacity, 64);
    assert_eq!(
        a.queue_timeout_ms.get(),
        std::time::Duration::from_millis(200)
    );
    assert_eq!(a.priority_header, "x-class");
    let cases = [
        (
            "max_inflight = 0",
            "route[0].admission.max_inflight",
            "greater than 0",
        ),
        (
            "max_inflight = \"auto\"",
            "route[0].admission.max_inflight",
            "neither a number nor \"adaptive\"",
        ),
        (
            "max_inflight = 4\n[route.admission.adaptive]",
            "route[0].admission.adaptive",
            "only applies",
        ),
        (
            "max_inflight = 4\nqueue_timeout_ms = 0",
            "route[0].admission.queue_timeout_ms",
            "greater than 0",
        ),
        (
            "max_inflight = 4\nqueue_capacity = -1",
            "route[0].admission.queue_capacity",
            "invalid value",
        ),
        (
            "max_inflight = 4\npriority_header = \"bad header\"",
            "route[0].admission.priority_header",
            "header name",
        ),
        (
            "max_inflight = 4\nretry_after_min_s = 9\nretry_after_max_s = 3",
            "route[0].admission.retry_after_min_s",
            "must not exceed",
        ),
        (
            "priority_trusted_proxies = [\"10.0.0.0/40\"]",
            "route[0].admission.priority_trusted_proxies",
            "CIDR",
        ),
        (
            "tenant_key = \"cookie\"",
            "route[0].admission.tenant_key",
            "expected \"ip\" or \"header:<name>\"",
        ),
        (
            "max_inflight_per_tenant = 2",
            "route[0].admission.max_inflight_per_tenant",
            "needs tenant_key",
        ),
        (
            "max_inflight = 4\ntenant_key = \"ip\"\nmax_inflight_per_tenant = 5",
            "route[0].admission.max_inflight_per_tenant",
            "must not exceed max_inflight (5 > 4)",
        ),
        (
            "unknown_length_bytes = 1000",
            "route[0].admission.unknown_length_bytes",
            "only applies with max_inflight_bytes",
        ),
        (
            "max_inflight_bytes = 1000\nunknown_length_bytes = 2000",
            "route[0].admission.unknown_length_bytes",
            "must not exceed max_inflight_bytes (2000 > 1000)",
        ),
        (
            "max_inflight_bytes = 1000",
            "route[0].admission.max_inflight_bytes",
            "set unknown_length_bytes too",
        ),
        (
            "max_inflight_bytes = 0",
            "route[0].admission.max_inflight_bytes",
            "greater than 0",
        ),
        (
            "queue_discipline = \"lifo\"",
            "route[0].admission.queue_discipline",
            "unknown variant",
        ),
        (
            "codel_target_ms = 5",
            "route[0].admission.codel_target_ms",
            "only applies with queue_discipline = \"codel\"",
        ),
        (
            "queue_discipline = \"codel\"\ncodel_interval_ms = 50\ncodel_target_ms = 50",
            "route[0].admission.codel_target_ms",
            "must be below codel_interval_ms (50 >= 50)",
        ),
        (
            "queue_discipline = \"codel\"\nqueue_timeout_ms = 5",
            "route[0].admission.codel_target_ms",
            "must be below queue_timeout_ms (5 >= 5)",
        ),
        (
            "tenant_key = \"ip\"\nmax_inflight_per_tenant = 0",
            "route[0].admission.max_inflight_per_tenant",
            "greater than 0",
        ),
    ];
    for (body, key, words) in cases {
        let e = err(&format!("{ROUTE}[route.admission]\n{body}\n"));
        assert_eq!(e.key(), Some(key), "{body}: {e}");
        assert!(e.message().contains(words), "{body}: {e}");
    }
}

#[test]
fn an_empty_admission_section_turns_admission_on_with_defaults() {
    let c = Config::parse("t.toml", &format!("{ROUTE}[route.admission]\n")).unwrap();
    let a = c.routes[0].admission.as_ref().unwrap();
    assert_eq!(
        (a.max_inflight.fixed().map(|l| l.get()), a.queue_capacity),
        (Some(16), 64)
    );
    assert_eq!((a.retry_after_min_s, a.retry_after_max_s), (1, 60));
}

#[test]
fn circuit_section_gets_defaults() {
    let config = Config::parse("t.toml", &format!("{ROUTE}[route.circuit]\n")).unwrap();
    let c = config.routes[0].circuit.as_ref().unwrap();
    assert_eq!(c.failure_threshold.get(), 5);
    assert_eq!(c.failure_statuses, [500, 502, 503, 504]);
    assert_eq!(c.open_ms.get().as_millis(), 5000);
    assert_eq!(c.success_threshold.get(), 3);
    assert_eq!(c.min_half_open_ms, 1000);
    assert!(config.routes[0].admission.is_none());
}

/// An empty `[route.admission]` is the controller's own default, written once
/// in `admission`.
#[test]
fn an_empty_admission_section_is_the_runtime_default() {
    use crate::admission::{AdmissionSettings, DEFAULT_PRIORITY_HEADER, PriorityRule};
    let c = Config::parse("t.toml", &format!("{ROUTE}[route.admission]\n")).unwrap();
    let a = c.routes[0].admission.as_ref().unwrap();
    assert_eq!(AdmissionSettings::from(a), AdmissionSettings::DEFAULT);
    assert_eq!(a.priority_header, DEFAULT_PRIORITY_HEADER);
    // Nobody's header is believed until a proxy is trusted.
    assert_eq!(
        c.routes[0].priority_rule(),
        PriorityRule::header(DEFAULT_PRIORITY_HEADER).trusted_peers(Vec::new())
    );
}

#[test]
fn the_priority_rule_takes_trusted_proxies_and_tier_classes() {
    use crate::admission::Priority;
    let text = format!(
        "{ROUTE}[route.admission]\npriority_header = \"X-Class\"\n\
         priority_trusted_proxies = [\"10.0.0.0/8\", \"fd00::1\"]\n\
         [route.rate_limit]\nper_second = 10\n\
         [[route.rate_limit.tier]]\nkeys = [\"10.0.0.1\"]\nper_second = 5\npriority = \"Batch\"\n\
         [[route.rate_limit.tier]]\nname = \"plain\"\nkeys = [\"10.0.0.2\"]\nper_second = 5\n"
    );
    let c = Config::parse("t.toml", &text).unwrap();
    let want = PriorityRule::header(http::HeaderName::from_static("x-class"))
        .trusted_peers(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::1/128".parse().unwrap(),
        ])
        .tier("tier0", Priority::Batch);
    assert_eq!(c.routes[0].priority_rule(), want);
}

/// A `[route.rate_limit]` with only its rate is the limiter's defaults.
#[test]
fn a_minimal_rate_limit_section_is_the_runtime_default() {
    use crate::rate_limit::{KeySource, Rate, RateLimitSettings};
    let text = format!("{ROUTE}[route.rate_limit]\nper_second = 5\n");
    let c = Config::parse("t.toml", &text).unwrap();
    let settings = RateLimitSettings::from(c.routes[0].rate_limit.as_ref().unwrap());
    let want = RateLimitSettings {
        key: KeySource::Ip,
        rate: Rate {
            per_second: 5.0,
            burst: None,
        },
        trusted_proxies: Vec::new(),
        max_keys: RateLimitSettings::DEFAULT_MAX_KEYS,
        per_ip: None,
        ipv6_prefix: 64,
        tiers: Vec::new(),
        scope: crate::rate_limit::Scope::Local,
    };
    assert_eq!(settings, want);
}

#[test]
fn a_per_ip_ceiling_needs_header_keys_and_a_sane_prefix() {
    let e = err(&format!(
        "{ROUTE}[route.rate_limit]
per_second = 5
per_ip_per_second = 50
"
    ));
    assert_eq!(
        e.key(),
        Some("route[0].rate_limit.per_ip_per_second"),
        "{e}"
    );
    let e = err(&format!(
        "{ROUTE}[route.rate_limit]
per_second = 5
key = \"header:x-api-key\"
per_ip_burst = 5
"
    ));
    assert_eq!(e.key(), Some("route[0].rate_limit.per_ip_burst"), "{e}");
    let e = err(&format!(
        "{ROUTE}[route.rate_limit]
per_second = 5
ipv6_prefix = 0
"
    ));
    assert_eq!(e.key(), Some("route[0].rate_limit.ipv6_prefix"), "{e}");
    assert!(e.to_string().contains("1 to 128"), "{e}");
}

#[test]
fn a_cluster_scope_needs_a_cluster_and_takes_its_fallback() {
    use crate::rate_limit::{ClusterFallback, RateLimitSettings, Scope};
    let cluster = "[cluster]\nredis_url = \"redis://127.0.0.1:6379/0\"\n";
    let route = format!("{ROUTE}[route.rate_limit]\nper_second = 5\nscope = \"cluster\"\n");
    let e = err(&route);
    assert_eq!(e.key(), Some("route[0].rate_limit.scope"), "{e}");
    assert!(e.to_string().contains("needs a [cluster] section"), "{e}");
    let c = Config::parse("t.toml", &format!("{cluster}{route}")).unwrap();
    let cfg = c.cluster.as_ref().unwrap();
    assert_eq!(cfg.timeout_ms.get(), std::time::Duration::from_millis(20));
    assert_eq!(cfg.key_prefix, "sluicegate");
    let settings = RateLimitSettings::from(c.routes[0].rate_limit.as_ref().unwrap());
    assert_eq!(
        settings.scope,
        Scope::Cluster {
            fallback: ClusterFallback::Local,
            sync: None
        }
    );
    let deny = format!("{cluster}{route}fallback = \"deny\"\nsync_ms = 10\n");
    let c = Config::parse("t.toml", &deny).unwrap();
    let settings = RateLimitSettings::from(c.routes[0].rate_limit.as_ref().unwrap());
    assert_eq!(
        settings.scope,
        Scope::Cluster {
            fallback: ClusterFallback::Deny,
            sync: Some(std::time::Duration::from_millis(10))
        }
    );
    let local_sync = format!("{ROUTE}[route.rate_limit]\nper_second = 5\nsync_ms = 10\n");
    let e = err(&local_sync);
    assert_eq!(e.key(), Some("route[0].rate_limit.sync_ms"), "{e}");
    let cases = [
        (
            "redis_url = \"rediss://h:1/0\"",
            "redis_url",
            "not built in",
        ),
        (
            "redis_url = \"http://h:1/0\"",
            "redis_url",
            "expected redis://",
        ),
        (
            "redis_url = \"redis://h:1/0\"\nkey_prefix = \"a b\"",
            "key_prefix",
            "without spaces",
        ),
    ];
    for (lines, key, problem) in cases {
        let e = err(&format!("[cluster]\n{lines}\n{ROUTE}"));
        assert_eq!(e.key(), Some(format!("cluster.{key}").as_str()), "{e}");
        assert!(e.to_string().contains(problem), "{e}");
    }
    let local = format!("{ROUTE}[route.rate_limit]\nper_second = 5\nfallback = \"allow\"\n");
    let e = err(&local);
    assert_eq!(e.key(), Some("route[0].rate_limit.fallback"), "{e}");
}

/// An empty `[route.circuit]` is the breaker's own default, written once in
/// `circuit` (and the failure-rate fallbacks too, once the rate is set).
#[test]
fn an_empty_circuit_section_is_the_runtime_default() {
    use crate::circuit::{CircuitSettings, FailurePolicy, FailureRate};
    let config = Config::parse("t.toml", &format!("{ROUTE}[route.circuit]\n")).unwrap();
    let c = config.routes[0].circuit.as_ref().unwrap();
    assert_eq!(CircuitSettings::from(c), CircuitSettings::default());
    assert_eq!(FailurePolicy::from(c), FailurePolicy::default());
    let text = format!("{ROUTE}[route.circuit]\nfailure_rate_threshold = 50.0\n");
    let config = Config::parse("t.toml", &text).unwrap();
    let rate = CircuitSettings::from(config.routes[0].circuit.as_ref().unwrap()).failure_rate;
    assert_eq!(
        rate,
        Some(FailureRate {
            threshold: 0.5,
            window: FailureRate::DEFAULT_WINDOW,
            min_calls: FailureRate::DEFAULT_MIN_CALLS,
        })
    );
}

#[test]
fn bad_circuit_values_name_their_key() {
    let cases = [
        (
            "failure_rate_threshold = 150.0",
            "failure_rate_threshold",
            "percentage",
        ),
        (
            "failure_rate_threshold = 0.0",
            "failure_rate_threshold",
            "percentage",
        ),
        (
            "window_ms = 5000",
            "window_ms",
            "without failure_rate_threshold",
        ),
        (
            "min_calls = 5",
            "min_calls",
            "without failure_rate_threshold",
        ),
        ("failure_statuses = []", "failure_statuses", "at least one"),
        ("failure_statuses = [500, 700]", "failure_statuses", "700"),
        (
            "open_ms = 10000\nmax_open_ms = 5000",
            "max_open_ms",
            "below open_ms",
        ),
        ("slow_start_ms = 1000", "slow_start_ms", "[route.admission]"),
        (
            "success_threshold = 0",
            "success_threshold",
            "greater than 0",
        ),
        ("fallback = { status = 99 }", "fallback.status", "200..=599"),
        (
            "fallback = { status = 200, content_type = \"a\\nb\" }",
            "fallback.content_type",
            "header",
        ),
        ("failure_treshold = 3", "failure_treshold", "unknown"),
    ];
    assert_refused(
        &format!("{ROUTE}[route.circuit]\n"),
        "route[0].circuit",
        &cases,
    );
}

#[test]
fn bad_rate_limit_values_name_their_key() {
    let cases = [
        ("per_second = 0", "per_second", "above 0"),
        ("per_second = -1", "per_second", "above 0"),
        ("per_second = 10\nkey = \"cookie\"", "key", "header:<name>"),
        (
            "per_second = 10\nkey = \"header:bad header\"",
            "key",
            "not a header name",
        ),
        ("per_second = 10\nburst = 0", "burst", "greater than 0"),
        // governor's period × burst, in nanoseconds, would overflow.
        (
            "per_second = 0.1\nburst = 2000000000",
            "burst",
            "days to refill",
        ),
        (
            "per_second = 10\n[[route.rate_limit.tier]]\nkeys = [\"10.0.0.1\"]\n\
             per_second = 0.1\nburst = 4000000000",
            "tier[0].burst",
            "days to refill",
        ),
        (
            "per_second = 10\nmax_keys = 0",
            "max_keys",
            "greater than 0",
        ),
        (
            "per_second = 10\ntrusted_proxies = [\"10.0.0.0/33\"]",
            "trusted_proxies",
            "CIDR",
        ),
        ("per_second = 10\nper_minute = 5", "per_minute", "unknown"),
        (
            "per_second = 10\n[[route.rate_limit.tier]]\nkeys = [\"nope\"]\nper_second = 5",
            "tier[0].keys",
            "not an IP address",
        ),
        (
            "per_second = 10\nkey = \"header:x-k\"\n[[route.rate_limit.tier]]\nkeys = [\"a\"]\n\
             per_second = 5\n[[route.rate_limit.tier]]\nkeys = [\"a\"]\nper_second = 50",
            "tier[1].keys",
            "already in tier[0]",
        ),
        (
            "per_second = 10\n[[route.rate_limit.tier]]\nkeys = [\"10.0.0.1\"]\n\
             per_second = 5\npriority = \"urgent\"",
            "tier[0].priority",
            "expected \"critical\", \"normal\" or \"batch\"",
        ),
        (
            "per_second = 10\n[[route.rate_limit.tier]]\nkeys = [\"10.0.0.1\"]\n\
             per_second = 5\npriority = \"critical\"",
            "tier[0].priority",
            "needs [route.admission]",
        ),
    ];
    assert_refused(
        &format!("{ROUTE}[route.rate_limit]\n"),
        "route[0].rate_limit",
        &cases,
    );
    let e = err(&format!("{ROUTE}[route.rate_limit]\nkey = \"ip\"\n"));
    assert!(e.to_string().contains("per_second"), "{e}");
}

#[test]
fn rate_limit_accepts_plain_addresses_as_trusted_proxies() {
    let text = format!(
        "{ROUTE}[route.rate_limit]\nper_second = 0.5\ntrusted_proxies = [\"10.0.0.1\", \"fd00::/8\"]\n"
    );
    let config = Config::parse("t.toml", &text).unwrap();
    let r = config.routes[0].rate_limit.as_ref().unwrap();
    assert_eq!(r.trusted_proxies[0].to_string(), "10.0.0.1/32");
    assert_eq!(r.max_keys, 100_000);
}

#[test]
fn adaptive_max_inflight_with_and_without_its_section() {
    use crate::adaptive::AdaptiveSettings;
    let c = Config::parse(
        "t.toml",
        &format!("{ROUTE}[route.admission]\nmax_inflight = \"adaptive\"\n"),
    )
    .unwrap();
    let a = c.routes[0].admission.as_ref().unwrap();
    let Some(AdaptiveSettings::Gradient(bounds, _)) = a.adaptive_settings() else {
        panic!("gradient by default");
    };
    assert_eq!((bounds.min, bounds.initial, bounds.max), (1, 10, 1000));
    let text = format!(
        "{ROUTE}[route.admission]\nmax_inflight = \"adaptive\"\n[route.admission.adaptive]\n\
         algorithm = \"aimd\"\nmin_limit = 2\nmax_limit = 64\ninitial_limit = 4\nincrease = 2\n"
    );
    let c = Config::parse("t.toml", &text).unwrap();
    let a = c.routes[0].admission.as_ref().unwrap();
    let Some(AdaptiveSettings::Aimd(bounds, s)) = a.adaptive_settings() else {
        panic!("aimd");
    };
    assert_eq!(
        (bounds.min, bounds.initial, bounds.max, s.increase),
        (2, 4, 64, 2.0)
    );
}

#[test]
fn bad_adaptive_values_name_their_key() {
    let cases = [
        (
            "min_limit = 10\nmax_limit = 5",
            "min_limit",
            "must not exceed",
        ),
        ("initial_limit = 2000", "initial_limit", "within"),
        ("backoff = 1.5", "backoff", "below 1"),
        ("algorithm = \"vegas\"", "algorithm", "unknown variant"),
        ("increase = 2", "increase", "algorithm = \"aimd\""),
        (
            "algorithm = \"aimd\"\ntolerance = 2",
            "tolerance",
            "algorithm = \"gradient\"",
        ),
        ("tolerance = 0.5", "tolerance", "1.0..=10.0"),
        ("smoothing = 0", "smoothing", "above 0"),
        ("window = 5", "window", "unknown field"),
    ];
    let head = format!(
        "{ROUTE}[route.admission]\nmax_inflight = \"adaptive\"\n[route.admission.adaptive]\n"
    );
    assert_refused(&head, "route[0].admission.adaptive", &cases);
}

#[test]
fn a_tenant_key_gives_the_route_tenants_and_their_share() {
    use crate::admission::AdmissionSettings;
    let text = format!(
        "{ROUTE}[route.admission]\nmax_inflight = 8\ntenant_key = \"header:X-Api-Key\"\n\
         max_inflight_per_tenant = 3\n"
    );
    let c = Config::parse("t.toml", &text).unwrap();
    let route = &c.routes[0];
    let settings = AdmissionSettings::from(route.admission.as_ref().unwrap());
    assert!(settings.by_tenant);
    assert_eq!(settings.max_inflight_per_tenant, Some(3));
    let keys = route.tenant_extractor().expect("tenants");
    let mut headers = http::HeaderMap::new();
    headers.insert("x-api-key", "team-a".parse().unwrap());
    assert_eq!(
        keys.key(&headers, &http::Extensions::new()),
        crate::client_key::ClientKey::Value(b"team-a"[..].into())
    );
    let plain = Config::parse("t.toml", &format!("{ROUTE}[route.admission]\n")).unwrap();
    assert!(plain.routes[0].tenant_extractor().is_none());
}

#[test]
fn codel_takes_its_defaults_or_the_given_times() {
    use crate::admission::{AdmissionSettings, Discipline};
    use std::time::Duration;
    let parse = |extra: &str| {
        let c = Config::parse("t.toml", &format!("{ROUTE}[route.admission]\n{extra}")).unwrap();
        AdmissionSettings::from(c.routes[0].admission.as_ref().unwrap()).discipline
    };
    assert_eq!(parse(""), Discipline::Fifo);
    assert_eq!(
        parse("queue_discipline = \"codel\"\n"),
        Discipline::Codel {
            interval: Duration::from_millis(100),
            target: Duration::from_millis(5)
        }
    );
    assert_eq!(
        parse("queue_discipline = \"codel\"\ncodel_interval_ms = 200\ncodel_target_ms = 10\n"),
        Discipline::Codel {
            interval: Duration::from_millis(200),
            target: Duration::from_millis(10)
        }
    );
}

#[test]
fn a_byte_budget_reaches_the_controller() {
    use crate::admission::AdmissionSettings;
    let text = format!(
        "{ROUTE}[route.admission]\nmax_inflight_bytes = 4194304\nunknown_length_bytes = 1024\n"
    );
    let c = Config::parse("t.toml", &text).unwrap();
    let settings = AdmissionSettings::from(c.routes[0].admission.as_ref().unwrap());
    assert_eq!(
        (settings.max_inflight_bytes, settings.unknown_length_bytes),
        (Some(4 << 20), 1024)
    );
    let plain = Config::parse("t.toml", &format!("{ROUTE}[route.admission]\n")).unwrap();
    let settings = AdmissionSettings::from(plain.routes[0].admission.as_ref().unwrap());
    assert_eq!(settings.max_inflight_bytes, None);
    assert_eq!(
        settings.unknown_length_bytes,
        AdmissionSettings::DEFAULT.unknown_length_bytes
    );
}

#[test]
fn a_minimal_spool_section_gets_its_defaults() {
    let text = format!("{ROUTE}[route.spool]\ndir = \"/tmp/s\"\nmax_bytes = 1024\n");
    let config = Config::parse("t.toml", &text).unwrap();
    let settings = crate::spool::SpoolSettings::from(config.routes[0].spool.as_ref().unwrap());
    assert_eq!(settings.max_bytes, 1024);
    assert_eq!(settings.methods, [http::Method::POST, http::Method::PUT]);
    assert_eq!(
        settings.on,
        [
            crate::error::Reason::CircuitOpen,
            crate::error::Reason::QueueFull,
            crate::error::Reason::QueueTimeout,
            crate::error::Reason::UpstreamUnavailable
        ]
    );
    assert_eq!(
        settings.max_attempts,
        crate::spool::SpoolSettings::DEFAULT_MAX_ATTEMPTS
    );
    assert_eq!(settings.idempotency_header, "idempotency-key");
    assert_eq!(settings.durability, crate::spool::Durability::Always);
    let batch = format!("{text}fsync = \"batch\"\n");
    let config = Config::parse("t.toml", &batch).unwrap();
    let settings = crate::spool::SpoolSettings::from(config.routes[0].spool.as_ref().unwrap());
    assert_eq!(
        settings.durability,
        crate::spool::Durability::Batch(crate::spool::SpoolSettings::DEFAULT_FSYNC_INTERVAL)
    );
}

#[test]
fn bad_spool_values_name_their_key() {
    let head = format!("{ROUTE}[route.spool]\n");
    let cases = [
        (
            "dir = \"/tmp/s\"\nmax_bytes = 0",
            "max_bytes",
            "greater than 0",
        ),
        (
            "dir = \"/tmp/s\"\nmax_bytes = 10\nmethods = [\"GET\"]",
            "methods",
            "cannot be spooled",
        ),
        (
            "dir = \"/tmp/s\"\nmax_bytes = 10\nmethods = []",
            "methods",
            "at least one",
        ),
        (
            "dir = \"/tmp/s\"\nmax_bytes = 10\non = [\"rate_limited\"]",
            "on",
            "not a refusal that can be spooled",
        ),
        (
            "dir = \"/tmp/s\"\nmax_bytes = 10\nfsync = \"sometimes\"",
            "fsync",
            "unknown variant",
        ),
        (
            "dir = \"/tmp/s\"\nmax_bytes = 10\nfsync_interval_ms = 5",
            "fsync_interval_ms",
            "only applies with fsync = \"batch\"",
        ),
        (
            "dir = \"/tmp/s\"\nmax_bytes = 10\nmax_attempts = 100000",
            "max_attempts",
            "at most 65535",
        ),
    ];
    assert_refused(&head, "route[0].spool", &cases);
    for (lines, missing) in [("dir = \"/tmp/s\"", "max_bytes"), ("max_bytes = 10", "dir")] {
        let e = err(&format!("{head}{lines}\n"));
        assert_eq!(e.key(), Some("route[0].spool"), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("missing field `{missing}`")),
            "{e}"
        );
    }
    let two = "[[route]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"http://127.0.0.1:9\"\n\
               [route.spool]\ndir = \"/tmp/s\"\nmax_bytes = 10\n\
               [[route]]\nname = \"b\"\npath_prefix = \"/b\"\nupstream = \"http://127.0.0.1:9\"\n\
               [route.spool]\ndir = \"/tmp/s\"\nmax_bytes = 10\n";
    let e = err(two);
    assert_eq!(e.key(), Some("route[1].spool.dir"), "{e}");
    assert!(e.to_string().contains("its own directory"), "{e}");
}
