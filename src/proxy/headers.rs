//! Header rewriting at the proxy hop (RFC 9110 §7.6): hop-by-hop headers are
//! removed both ways, forwarding headers are added to requests, `Via` to both.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus
/// the non-standard ones proxies have always dropped.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including every header the `Connection` header
/// names, except `Host`: a client must not be able to make the upstream see a
/// request without the host it was routed by.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than nine
    // hashed removals.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| name != header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Rewrites a request's headers for the upstream hop.
///
/// `client` is the address of the peer that sent the request; `host` the
/// authority the client asked for (the `Host` header, or the HTTP/2 `:authority`).
pub fn prepare_request(
    headers: &mut HeaderMap,
    version: Version,
    uri: &Uri,
    client: Option<IpAddr>,
) {
    remove_hop_by_hop(headers);
    let host = headers.get(header::HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Some(host) = host {
        // HTTP/2 clients send `:authority` instead of Host; the upstream hop is
        // HTTP/1.1 and must keep the name the client asked for.
        headers.insert(header::HOST, host.clone());
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    if let Some(ip) = client {
        append_list(headers, &X_FORWARDED_FOR, &ip.to_string());
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    append_list(headers, &header::VIA, via_entry(version));
}

/// Rewrites a response's headers for the client hop.
pub fn prepare_response(headers: &mut HeaderMap, upstream_version: Version) {
    remove_hop_by_hop(headers);
    append_list(headers, &header::VIA, via_entry(upstream_version));
}

fn via_entry(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9 sluicegate",
        Version::HTTP_10 => "1.0 sluicegate",
        Version::HTTP_2 => "2 sluicegate",
        Version::HTTP_3 => "3 sluicegate",
        _ => "1.1 sluicegate",
    }
}

/// Appends `item` to a comma-separated list header, folding several header lines
/// into one (as HAProxy and nginx do for `X-Forwarded-For`).
fn append_list(headers: &mut HeaderMap, name: &HeaderName, item: &str) {
    if !headers.contains_key(name) {
        if let Ok(value) = HeaderValue::from_str(item) {
            headers.insert(name.clone(), value);
        }
        return;
    }
    let existing: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let value = if existing.is_empty() {
        HeaderValue::from_str(item)
    } else {
        HeaderValue::from_str(&format!("{}, {item}", existing.join(", ")))
    };
    // `item` is an IP address or a fixed token and `existing` came from valid
    // header values, so the joined value is valid too; keep the old one if not.
    if let Ok(value) = value {
        headers.insert(name.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn removes_fixed_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "close, X-Custom-Hop, Host"),
            ("host", "kept.example"),
            ("x-custom-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic abc"),
            ("x-end-to-end", "kept"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
        assert_eq!(h["host"], "kept.example");
    }

    #[test]
    fn forwarding_headers() {
        let mut h = map(&[
            ("host", "api.example.com"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "10.0.0.1"),
            ("via", "1.1 edge"),
        ]);
        let uri: Uri = "/ingest".parse().unwrap();
        prepare_request(
            &mut h,
            Version::HTTP_11,
            &uri,
            Some("192.0.2.1".parse().unwrap()),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.1, 192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["host"], "api.example.com");
        assert_eq!(h["via"], "1.1 edge, 1.1 sluicegate");
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut h = HeaderMap::new();
        let uri: Uri = "http://api.example.com:8080/x".parse().unwrap();
        prepare_request(&mut h, Version::HTTP_2, &uri, None);
        assert_eq!(h["host"], "api.example.com:8080");
        assert_eq!(h["via"], "2 sluicegate");
        assert!(h.get("x-forwarded-for").is_none());
    }

    #[test]
    fn response_loses_hop_headers_and_gains_via() {
        let mut h = map(&[("connection", "keep-alive"), ("content-type", "text/plain")]);
        prepare_response(&mut h, Version::HTTP_11);
        assert!(h.get("connection").is_none());
        assert_eq!(h["via"], "1.1 sluicegate");
    }
}
