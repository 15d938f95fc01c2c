//! The dashboard in a real browser: Debian's Chromium driven over WebDriver
//! (chromedriver), against a proxy in front of the simulator under overload.
//!
//! It must see the token prompt (the admin listener is off loopback with an
//! `admin_token`), then the route, charts with data points, and a circuit
//! transition once the upstream fails. It saves a screenshot (the README's)
//! to `target/dashboard.png`, and to `$SLUICEGATE_SCREENSHOT` when set.
//!
//! Skipped with a message where `chromedriver` is missing, unless
//! `SLUICEGATE_REQUIRE_CHROMIUM=1` (CI sets it and installs the packages).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::keys::reserve_addr;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use sluicegate::config::Config;
use sluicegate::loadgen::{self, LoadPlan};
use sluicegate::sim::{self, Mode, SimOptions};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const TOKEN: &str = "dashboard-test-token-0123456789";

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
    _profile: tempdir::Dir,
}

mod tempdir {
    /// A fresh directory under the target dir, removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(name: &str) -> Self {
            let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Option<Self> {
        if !std::path::Path::new(CHROMEDRIVER).exists() {
            assert!(
                std::env::var_os("SLUICEGATE_REQUIRE_CHROMIUM").is_none(),
                "SLUICEGATE_REQUIRE_CHROMIUM is set but {CHROMEDRIVER} is missing"
            );
            eprintln!(
                "skipped: {CHROMEDRIVER} not installed (apt-get install chromium chromium-driver)"
            );
            return None;
        }
        let port = reserve_addr().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        Some(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _profile: tempdir::Dir::new("chromium-profile"),
        })
    }

    /// A browser session, once chromedriver answers.
    async fn session(&self) -> Client {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-quic", "--window-size=1400,1100",
                    format!("--user-data-dir={}", self._profile.0.display()),
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let mut last = None;
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&self.url)
                .await
            {
                Ok(client) => return client,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no browser session: {last:?}");
    }
}

/// Evaluates `script` until it returns true, or fails after `within`.
async fn eventually(browser: &Client, what: &str, script: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let value = browser.execute(script, vec![]).await.unwrap();
        if value == Value::Bool(true) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let page = browser
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap();
            panic!("{what}: not seen within {within:?}; the page says:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_load_shedding_and_the_circuit_in_a_browser() {
    let Some(driver) = Driver::start() else {
        return;
    };
    let sim = sim::spawn(
        "127.0.0.1:0".parse().unwrap(),
        SimOptions {
            workers: 4,
            service_time: Duration::from_millis(20),
        },
    )
    .await
    .unwrap();
    // Off loopback with a token: the page must ask for it.
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "0.0.0.0:0"
admin_token = "{TOKEN}"

[[route]]
name = "ingest"
path_prefix = "/"
upstream = "http://{}"
[route.admission]
max_inflight = 4
queue_capacity = 8
queue_timeout_ms = 100
[route.circuit]
failure_threshold = 5
open_ms = 2000
"#,
        sim.addr()
    );
    let proxy = sluicegate::start(Config::parse("dashboard.toml", &text).unwrap())
        .await
        .unwrap();
    // Twice what four workers at 20 ms serve: the queue fills and sheds.
    let load = tokio::spawn(loadgen::run(
        LoadPlan {
            url: format!("http://{}/ingest", proxy.proxy_addr())
                .parse()
                .unwrap(),
            rates: vec![400.0; 40],
            max_outstanding: 256,
            client_timeout: Duration::from_secs(2),
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::new(),
        },
        |_, _| {},
    ));

    let browser = driver.session().await;
    let page = format!("http://127.0.0.1:{}/", proxy.admin_addr().port());
    browser.goto(&page).await.unwrap();
    // The token prompt, then the data behind it.
    let login = browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#login:not([hidden])"))
        .await
        .expect("the token prompt never showed");
    let input = login.find(Locator::Id("token")).await.unwrap();
    input.send_keys(TOKEN).await.unwrap();
    login
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let routes = r#"return document.querySelector('section.route[data-route="ingest"]') !== null
        && document.querySelector('#routes tr[data-route="ingest"]') !== null"#;
    eventually(&browser, "the route", routes, Duration::from_secs(10)).await;
    // Charts with points: uPlot's data for offered and shed requests, the
    // limit and the upstream's latency, drawn on canvases.
    let charted = r#"
        const e = charts.get("ingest");
        if (!e) return false;
        const series = (id, label) => {
            const p = e.plots.find((p) => p.spec[0] === id).plot;
            const i = p.series.findIndex((s) => s.label === label);
            return i > 0 ? p.data[i].filter((v) => v > 0).length : 0;
        };
        return document.querySelectorAll('section.route canvas').length >= 3
            && series("requests", "offered") >= 3
            && series("requests", "shed: queue_full") + series("requests", "shed: queue_timeout") >= 1
            && series("load", "limit") >= 3
            && series("latency", "upstream p50") >= 3"#;
    eventually(
        &browser,
        "charts with data",
        charted,
        Duration::from_secs(20),
    )
    .await;

    // The upstream fails: the circuit opens, and the band marks it.
    sim.set_mode(Mode::Fail);
    let opened = r#"
        const box = document.querySelector('[data-chart="circuit"]');
        return box !== null && Number(box.dataset.transitions) >= 1
            && charts.get("ingest").band.plot.data[1].includes(2)
            && box.textContent.includes("→ open")"#;
    eventually(
        &browser,
        "a circuit transition",
        opened,
        Duration::from_secs(15),
    )
    .await;
    // Back to health, so the picture has recovery in it too.
    sim.set_mode(Mode::Ok);
    let recovered = r#"
        const box = document.querySelector('[data-chart="circuit"]');
        return box.textContent.includes("→ closed")"#;
    eventually(
        &browser,
        "the circuit closing",
        recovered,
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a few more healthy points

    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&target, &png).unwrap();
    if let Some(path) = std::env::var_os("SLUICEGATE_SCREENSHOT") {
        std::fs::write(path, &png).unwrap();
    }
    eprintln!("screenshot: {}", target.display());

    browser.close().await.unwrap();
    load.abort();
    proxy.shutdown().await;
    sim.abort();
}
