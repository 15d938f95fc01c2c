//! One host and one path per request, decided once before routing, so that the
//! route and the upstream can never read the same request two ways.
//!
//! - Host (RFC 9112 §3.2): an absolute-form target's authority (or HTTP/2's
//!   `:authority`) wins and replaces any `Host` header; otherwise exactly one
//!   valid `Host` is required on HTTP/1.1 (none is allowed on HTTP/1.0).
//!   Several `Host` lines, or one that is not an authority, are refused with
//!   `400`, as HAProxy and nginx do.
//! - Path (RFC 3986 §6.2.2): percent-encoded unreserved characters are decoded
//!   (`%2e` → `.`, `%41` → `A`), runs of `/` are merged (nginx's
//!   `merge_slashes`), and `.` and `..` segments are resolved. A path that
//!   climbs above the root is refused with `400`. Encoded slashes (`%2F`) and
//!   every other escape are left as they are: they are data, not structure.
//!   The normalized path is what routing matches and what the upstream gets,
//!   so `/public/../ingest` is the `/ingest` route's, never `/`'s.

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Version};

/// Why a request was refused: the text goes to the log, the client gets 400.
pub type Invalid = &'static str;

/// Puts `req`'s one host in `Host` and its path in normal form.
pub fn request<B>(req: &mut Request<B>) -> Result<(), Invalid> {
    host(req)?;
    if let Some(path) = normal_path(req.uri().path())? {
        let uri = req.uri();
        let path_and_query = match uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let mut parts = uri.clone().into_parts();
        parts.path_and_query =
            Some(PathAndQuery::try_from(path_and_query).map_err(|_| "invalid path")?);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| "invalid path")?;
    }
    Ok(())
}

fn host<B>(req: &mut Request<B>) -> Result<(), Invalid> {
    if let Some(authority) = req.uri().authority() {
        if authority.as_str().contains('@') {
            return Err("the request target carries user information");
        }
        let value = HeaderValue::from_str(authority.as_str()).map_err(|_| "invalid authority")?;
        req.headers_mut().insert(header::HOST, value);
        return Ok(());
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err("more than one Host header"),
        (Some(value), None) if is_host_port(value.as_bytes()) => Ok(()),
        (Some(_), None) => Err("the Host header is not a host[:port]"),
        (None, _) if req.version() == Version::HTTP_11 => Err("an HTTP/1.1 request without Host"),
        (None, _) => Ok(()),
    }
}

/// Whether `host` is a `host[:port]` (RFC 3986 §3.2.2): a name or an IPv4
/// address of unreserved, sub-delim and `%` bytes, or a bracketed IP literal,
/// then an optional port of digits. Checked in place, without copying.
fn is_host_port(host: &[u8]) -> bool {
    let (name, port) = match host.iter().rposition(|&c| c == b':') {
        Some(i) if !host[i..].contains(&b']') => (&host[..i], Some(&host[i + 1..])),
        _ => (host, None),
    };
    let name_ok = match name {
        [b'[', literal @ .., b']'] => {
            !literal.is_empty()
                && literal
                    .iter()
                    .all(|&c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'))
        }
        _ => {
            !name.is_empty()
                && name
                    .iter()
                    .all(|&c| c.is_ascii_alphanumeric() || is_name_mark(c))
        }
    };
    name_ok && port.is_none_or(|p| p.iter().all(u8::is_ascii_digit))
}

/// The marks a registered name may hold besides letters and digits:
/// unreserved, sub-delims and `%` (RFC 3986 §3.2.2).
fn is_name_mark(c: u8) -> bool {
    matches!(
        c,
        b'-' | b'.'
            | b'_'
            | b'~'
            | b'%'
            | b'!'
            | b'$'
            | b'&'
            | b'\''
            | b'('
            | b')'
            | b'*'
            | b'+'
            | b','
            | b';'
            | b'='
    )
}

/// The normal form of `path`, or `None` when it already is.
fn normal_path(path: &str) -> Result<Option<String>, Invalid> {
    if !path.starts_with('/') || !needs_work(path.as_bytes()) {
        return Ok(None);
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = true;
        match segment {
            // `//` merged, `.` dropped; both leave a directory.
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err("the path climbs above the root");
                }
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        normal.push('/');
    }
    Ok((normal != path).then_some(normal))
}

/// Whether `path` may change: an escape, a `//`, or a dot segment.
fn needs_work(path: &[u8]) -> bool {
    path.contains(&b'%')
        || path.windows(2).any(|w| w == b"//")
        || path
            .split(|&c| c == b'/')
            .any(|segment| segment == b"." || segment == b"..")
}

/// Decodes `%XX` escapes of unreserved characters (ALPHA, DIGIT, `-._~`).
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(c) = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c))
        {
            out.push(c);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Only ASCII was decoded; every other byte is copied as it was.
    String::from_utf8(out).unwrap_or_else(|_| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for (path, normal) in [
            ("/ingest", None),
            ("/ingest/", None),
            ("/", None),
            ("/public/../ingest", Some("/ingest")),
            ("/public/%2e%2e/ingest", Some("/ingest")),
            ("/public/.%2E/ingest", Some("/ingest")),
            ("/a/./b", Some("/a/b")),
            ("//ingest", Some("/ingest")),
            ("/a//b///c/", Some("/a/b/c/")),
            ("/a/b/..", Some("/a/")),
            ("/a/.", Some("/a/")),
            ("/a/..", Some("/")),
            ("/%69ngest", Some("/ingest")),
            ("/a%2Fb", None),
            ("/a%2F..%2Fb", None),
            ("/a%20b", None),
            ("/a%zz", None),
            ("/a%2", None),
            ("/...", None),
            ("/a..b/.c", None),
        ] {
            let got = normal_path(path).unwrap();
            assert_eq!(got.as_deref(), normal, "{path}");
        }
        for path in ["/..", "/../ingest", "/a/../../b", "/%2e%2e/x"] {
            assert!(normal_path(path).is_err(), "{path}");
        }
    }

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn one_host() {
        // The absolute-form authority wins and replaces Host.
        let mut r = req(Version::HTTP_11, "http://a.example/x", &["b.example"]);
        request(&mut r).unwrap();
        assert_eq!(r.headers()[header::HOST], "a.example");
        assert_eq!(r.headers().get_all(header::HOST).iter().count(), 1);
        // HTTP/2 `:authority` the same.
        let mut r = req(Version::HTTP_2, "http://a.example:8080/x", &[]);
        request(&mut r).unwrap();
        assert_eq!(r.headers()[header::HOST], "a.example:8080");
        // Origin form: the one Host stays.
        let mut r = req(Version::HTTP_11, "/x", &["a.example"]);
        request(&mut r).unwrap();
        assert_eq!(r.headers()[header::HOST], "a.example");
        for (version, hosts) in [
            (Version::HTTP_11, &[][..]),
            (Version::HTTP_11, &["a", "b"][..]),
            (Version::HTTP_10, &["a", "a"][..]),
            (Version::HTTP_11, &["a b"][..]),
            (Version::HTTP_11, &["u@a"][..]),
            (Version::HTTP_11, &["a/b"][..]),
        ] {
            assert!(
                request(&mut req(version, "/x", hosts)).is_err(),
                "{version:?} {hosts:?}"
            );
        }
        assert!(request(&mut req(Version::HTTP_10, "/x", &[])).is_ok());
        for host in [
            "a.example",
            "a.example:8080",
            "10.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "a_b",
        ] {
            assert!(is_host_port(host.as_bytes()), "{host}");
        }
        for host in [
            "", ":80", "a:b", "[::1", "a/b", "a?b", "a#b", "u@a", "[x]", "a b",
        ] {
            assert!(!is_host_port(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn the_query_is_kept() {
        let mut r = req(Version::HTTP_11, "/a/../b?x=/../y", &["h"]);
        request(&mut r).unwrap();
        assert_eq!(r.uri(), "/b?x=/../y");
    }
}
