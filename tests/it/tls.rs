//! TLS on the proxy listener: HTTPS over HTTP/1.1 and h2 by ALPN, mutual TLS,
//! certificate rotation by reload, plain HTTP on the TLS port, the handshake
//! bounded by `header_read_timeout_ms`. Certificates are made in the test.

use std::path::Path;
use std::time::Duration;

use crate::support::process::scratch_dir;
use crate::support::tls::{Ca, connect, connector, get_over, write};
use crate::support::*;
use http::{Request, StatusCode};
use sluicegate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn tls_config(dir: &Path, upstream: std::net::SocketAddr, mtls: bool, extra: &str) -> String {
    let ca = if mtls {
        format!("client_ca_file = \"{}\"\n", dir.join("ca.pem").display())
    } else {
        String::new()
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}\n\
         [server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{ca}\n\
         [[route]]\nupstream = \"http://{upstream}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_over_http1_and_h2_chosen_by_alpn() {
    let (up, _) = spawn_upstream().await;
    let ca = Ca::new("test CA");
    let dir = scratch_dir("tls-alpn");
    write(&dir, &ca.issue(&["localhost", "127.0.0.1"]), &ca);
    let text = tls_config(&dir, up.addr.unwrap(), false, "");
    let proxy = sluicegate::start(Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    for (alpn, version) in [
        (&b"http/1.1"[..], http::Version::HTTP_11),
        (&b"h2"[..], http::Version::HTTP_2),
    ] {
        let stream = connect(
            &connector(&ca, &[alpn], None),
            proxy.proxy_addr(),
            "localhost",
        )
        .await
        .unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn));
        let (res, body) = get_over(stream, "/echo").await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.version(), version);
        let echo = json(&body);
        // The upstream learns the client came over TLS, whatever it claims.
        assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https", "{echo}");
    }
    // TLS 1.2 too.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = connect(
        &tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls12)),
        proxy.proxy_addr(),
        "localhost",
    )
    .await
    .unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(
        get_over(stream, "/x").await.unwrap().0.status(),
        StatusCode::OK
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_valid_certificate() {
    let (up, _) = spawn_upstream().await;
    let ca = Ca::new("test CA");
    let dir = scratch_dir("tls-mtls");
    write(&dir, &ca.issue(&["localhost"]), &ca);
    let text = tls_config(&dir, up.addr.unwrap(), true, "");
    let proxy = sluicegate::start(Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    let alpn: &[&[u8]] = &[b"http/1.1"];
    // A certificate from the CA: served.
    let client = ca.issue(&["client.example"]);
    let stream = connect(
        &connector(&ca, alpn, Some(&client)),
        proxy.proxy_addr(),
        "localhost",
    )
    .await
    .unwrap();
    assert_eq!(
        get_over(stream, "/x").await.unwrap().0.status(),
        StatusCode::OK
    );
    // None, or one from another CA: refused at the handshake (with TLS 1.3
    // the client learns it at its first read), never served.
    let other = Ca::new("other CA").issue(&["client.example"]);
    for cert in [None, Some(&other)] {
        let refused =
            match connect(&connector(&ca, alpn, cert), proxy.proxy_addr(), "localhost").await {
                Err(_) => true,
                Ok(stream) => get_over(stream, "/x").await.is_err(),
            };
        assert!(refused, "served without a valid client certificate");
    }
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    let (_, metrics) = get(&format!("http://{}/metrics", proxy.admin_addr())).await;
    let failed = metric(
        &String::from_utf8_lossy(&metrics),
        "sluicegate_tls_handshake_failures_total",
    );
    assert_eq!(failed, Some(2.0));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_certificate_and_refuses_a_broken_one() {
    let (up, _) = spawn_upstream().await;
    let ca = Ca::new("test CA");
    let dir = scratch_dir("tls-rotate");
    let first = ca.issue(&["localhost"]);
    write(&dir, &first, &ca);
    let path = dir.join("sluicegate.toml");
    std::fs::write(&path, tls_config(&dir, up.addr.unwrap(), false, "")).unwrap();
    let config = Config::load(&path).unwrap();
    let proxy = sluicegate::server::start_from(config, Some(path.clone()))
        .await
        .unwrap();
    let tls_client = connector(&ca, &[b"http/1.1"], None);
    let served_cert = || async {
        let stream = connect(&tls_client, proxy.proxy_addr(), "localhost")
            .await
            .unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    assert_eq!(served_cert().await, first.der);
    let reload = || async {
        let req = Request::post(format!("http://{}/reload", proxy.admin_addr()))
            .header("content-type", "application/json")
            .body(full(""))
            .unwrap();
        send(&client(), req).await
    };
    // Rotated in place, as cert-manager does: new connections get the new one.
    let second = ca.issue(&["localhost"]);
    write(&dir, &second, &ca);
    let (res, body) = reload().await;
    assert_eq!(res.status(), StatusCode::OK, "{body:?}");
    assert_eq!(served_cert().await, second.der);
    // A broken key: refused, naming the key; the second keeps serving.
    std::fs::write(dir.join("key.pem"), "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
    let (res, body) = reload().await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let error = json(&body)["error"].as_str().unwrap().to_string();
    assert!(error.contains("server.tls.key_file"), "{error}");
    assert_eq!(served_cert().await, second.der);
    // A certificate that does not match the key: refused too.
    let third = ca.issue(&["localhost"]);
    std::fs::write(dir.join("key.pem"), &second.key_pem).unwrap();
    std::fs::write(dir.join("cert.pem"), &third.cert_pem).unwrap();
    let (res, body) = reload().await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(
        String::from_utf8_lossy(&body).contains("does not match"),
        "{body:?}"
    );
    assert_eq!(served_cert().await, second.der);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_gets_a_400_that_says_why() {
    let (up, _) = spawn_upstream().await;
    let ca = Ca::new("test CA");
    let dir = scratch_dir("tls-plain");
    write(&dir, &ca.issue(&["localhost"]), &ca);
    let text = tls_config(&dir, up.addr.unwrap(), false, "");
    let proxy = sluicegate::start(Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    let mut tcp = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("use https://"), "{answer}");
    assert_eq!(up.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_cut_at_the_head_timeout() {
    let (up, _) = spawn_upstream().await;
    let ca = Ca::new("test CA");
    let dir = scratch_dir("tls-silent");
    write(&dir, &ca.issue(&["localhost"]), &ca);
    let text = tls_config(
        &dir,
        up.addr.unwrap(),
        false,
        "header_read_timeout_ms = 1000",
    );
    let proxy = sluicegate::start(Config::parse("t.toml", &text).unwrap())
        .await
        .unwrap();
    // Connected, and never a byte of handshake.
    let mut tcp = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
    let mut buf = [0u8; 16];
    let early = tokio::time::timeout(Duration::from_millis(900), tcp.read(&mut buf)).await;
    assert!(early.is_err(), "closed before the timeout");
    let closed = tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf))
        .await
        .expect("still open past header_read_timeout_ms");
    assert_eq!(closed.unwrap_or(0), 0);
    proxy.shutdown().await;
}

#[test]
fn broken_files_are_named_at_start_and_by_check_config() {
    let dir = scratch_dir("tls-check");
    let ca = Ca::new("test CA");
    write(&dir, &ca.issue(&["localhost"]), &ca);
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    let text = tls_config(&dir, "127.0.0.1:9".parse().unwrap(), false, "");
    let path = dir.join("sluicegate.toml");
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluicegate"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.tls.key_file"), "{stderr}");
    let missing = text.replace("cert.pem", "missing.pem");
    let started = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(sluicegate::start(
            Config::parse("t.toml", &missing).unwrap(),
        ));
    let error = started.unwrap_err().to_string();
    assert!(
        error.contains("server.tls.cert_file") && error.contains("cannot read"),
        "{error}"
    );
}
