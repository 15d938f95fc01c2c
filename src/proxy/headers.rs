//! Header rewriting at the proxy hop (RFC 9110 §7.6): hop-by-hop headers are
//! removed both ways, forwarding headers are added to requests, `Via` to both.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Uri, Version};

use crate::conn::ClientAddr;

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
    // One pass over the names (no hashing) finds which fixed ones are there;
    // most messages carry none, or only `Connection`.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        remove_connection_named(headers);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes the headers `Connection` names. Its usual tokens (`keep-alive`,
/// `close`) name a fixed hop-by-hop header or none, so nothing is collected
/// unless a token names another header that is there.
fn remove_connection_named(headers: &mut HeaderMap) {
    let is_named = |token: &str| {
        let token = token.trim();
        !token.eq_ignore_ascii_case("host")
            && !HOP_BY_HOP
                .iter()
                .any(|h| token.eq_ignore_ascii_case(h.as_str()))
            && headers.contains_key(token)
    };
    let tokens = || {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
    };
    if !tokens().any(is_named) {
        return;
    }
    let named: Vec<HeaderName> = tokens()
        .filter(|t| is_named(t))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// Rewrites a request's headers for the upstream hop.
///
/// `client` is the peer that sent the request (its address formatted once
/// per connection, and whether it came over TLS); the host is the authority
/// the client asked for (the `Host` header, or the HTTP/2 `:authority`).
pub fn prepare_request(
    headers: &mut HeaderMap,
    version: Version,
    uri: &Uri,
    client: Option<&ClientAddr>,
) {
    remove_hop_by_hop(headers);
    let host = match headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        // HTTP/2 clients send `:authority` instead of Host; the upstream hop
        // is HTTP/1.1 and must keep the name the client asked for.
        None => uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .inspect(|host| {
                headers.insert(header::HOST, host.clone());
            }),
    };
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    if let Some(client) = client {
        append_list(headers, &X_FORWARDED_FOR, client.ip_header());
    }
    let proto = client.map_or(HeaderValue::from_static("http"), ClientAddr::proto_header);
    headers.insert(X_FORWARDED_PROTO.clone(), proto);
    append_list(headers, &header::VIA, &via_entry(version));
}

/// Rewrites a response's headers for the client hop.
pub fn prepare_response(headers: &mut HeaderMap, upstream_version: Version) {
    remove_hop_by_hop(headers);
    append_list(headers, &header::VIA, &via_entry(upstream_version));
}

fn via_entry(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 sluicegate",
        Version::HTTP_10 => "1.0 sluicegate",
        Version::HTTP_2 => "2 sluicegate",
        Version::HTTP_3 => "3 sluicegate",
        _ => "1.1 sluicegate",
    })
}

/// Appends `item` to a comma-separated list header, folding several header lines
/// into one (as HAProxy and nginx do for `X-Forwarded-For`).
fn append_list(headers: &mut HeaderMap, name: &HeaderName, item: &HeaderValue) {
    let mut existing = headers
        .get_all(name)
        .iter()
        .filter(|v| !v.as_bytes().trim_ascii().is_empty())
        .peekable();
    if existing.peek().is_none() {
        headers.insert(name.clone(), item.clone());
        return;
    }
    let mut joined = Vec::with_capacity(64);
    for value in existing {
        joined.extend_from_slice(value.as_bytes().trim_ascii());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(item.as_bytes());
    // Joined from valid header values with ", ": valid too; keep the old
    // value if not.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
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
        let client = ClientAddr::new("192.0.2.1:5000".parse().unwrap());
        prepare_request(&mut h, Version::HTTP_11, &uri, Some(&client));
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.1, 192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["host"], "api.example.com");
        assert_eq!(h["via"], "1.1 edge, 1.1 sluicegate");
        // Over TLS the client used https, whatever it claimed.
        let mut h = map(&[("x-forwarded-proto", "http")]);
        let tls = ClientAddr::tls("192.0.2.1:5000".parse().unwrap());
        prepare_request(&mut h, Version::HTTP_2, &uri, Some(&tls));
        assert_eq!(h["x-forwarded-proto"], "https");
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
