//! Quotas shared by every replica on a real Redis (`[cluster]`,
//! `scope = "cluster"`): three proxies admit one key's quota together, Redis
//! down or frozen is decided by the fallback within the timeout, and the Lua
//! GCRA decides as governor does.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::redis::RedisServer;
use crate::support::*;
use http::{Request, StatusCode};
use sluicegate::server::Running;
use tokio::time::Instant;

const RATE: f64 = 20.0;
const BURST: u32 = 10;

fn cluster_config(upstream: SocketAddr, redis: &str, scope: &str, extra: &str) -> String {
    rated_config(upstream, redis, scope, RATE, BURST, extra)
}

fn rated_config(
    upstream: SocketAddr,
    redis: &str,
    scope: &str,
    rate: f64,
    burst: u32,
    extra: &str,
) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [cluster]\nredis_url = \"{redis}\"\ntimeout_ms = 50\n\
         [[route]]\nname = \"test\"\nupstream = \"http://{upstream}\"\n\
         [route.rate_limit]\nkey = \"header:x-api-key\"\nper_second = {rate}\nburst = {burst}\n\
         scope = \"{scope}\"\n{extra}"
    )
}

async fn start(text: &str) -> Running {
    let config = sluicegate::config::Config::parse("cluster.toml", text).unwrap();
    sluicegate::server::start(config).await.unwrap()
}

async fn call(proxy: &Running, key: &str) -> StatusCode {
    let req = Request::get(format!("http://{}/x", proxy.proxy_addr()))
        .header("x-api-key", key)
        .body(full(""))
        .unwrap();
    client()
        .request(req)
        .await
        .map_or(StatusCode::from_u16(599).unwrap(), |r| r.status())
}

async fn metrics(proxy: &Running) -> String {
    let (_, body) = get(&format!("http://{}/metrics", proxy.admin_addr())).await;
    String::from_utf8_lossy(&body).into_owned()
}

/// Waits (bounded, real time) until Redis is seen up by `proxy`.
async fn until_up(proxy: &Running) {
    for _ in 0..250 {
        if metric(&metrics(proxy).await, "sluicegate_cluster_up") == Some(1.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the cluster never came up");
}

/// A replica on `upstream` sharing `redis` (`extra` in its rate limit),
/// once it sees Redis up.
async fn replica(upstream: SocketAddr, redis: &RedisServer, extra: &str) -> Running {
    let proxy = start(&cluster_config(upstream, &redis.url(), "cluster", extra)).await;
    until_up(&proxy).await;
    proxy
}

/// Sends one key's requests round robin over `proxies` for `window`:
/// (admitted, what one shared bucket admits over the time actually taken).
async fn hammer(proxies: &[Running], key: &str, window: Duration) -> (u64, f64) {
    hammer_at(proxies, key, window, RATE, BURST).await
}

/// [`hammer`] for a route of `rate` and `burst`.
async fn hammer_at(
    proxies: &[Running],
    key: &str,
    window: Duration,
    rate: f64,
    burst: u32,
) -> (u64, f64) {
    let start = Instant::now();
    let mut admitted = 0;
    let mut i = 0;
    while start.elapsed() < window {
        let status = call(&proxies[i % proxies.len()], key).await;
        assert!(status == 200 || status == 429, "{status}");
        admitted += u64::from(status == 200);
        i += 1;
    }
    let quota = f64::from(burst) + rate * start.elapsed().as_secs_f64();
    (admitted, quota)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_admit_one_quota_together() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (up, _) = spawn_upstream().await;
    let upstream = up.addr.unwrap();
    let mut shared = Vec::new();
    for _ in 0..3 {
        shared.push(start(&cluster_config(upstream, &redis.url(), "cluster", "")).await);
    }
    for proxy in &shared {
        until_up(proxy).await;
    }
    let (admitted, quota) = hammer(&shared, "fleet-key", Duration::from_secs(3)).await;
    let error = (admitted as f64 - quota) / quota;
    eprintln!(
        "cluster: the fleet admitted {admitted} against {quota:.1} ({:+.1} %)",
        error * 100.0
    );
    assert!(
        error.abs() <= 0.05,
        "the fleet admitted {admitted} against a quota of {quota:.1} ({:+.1} %)",
        error * 100.0
    );
    // Every replica answered with the same RateLimit fields' policy.
    let (res, _) = send(
        &client(),
        Request::get(format!("http://{}/x", shared[0].proxy_addr()))
            .header("x-api-key", "other")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(res.headers()["ratelimit-policy"], "\"default\";q=10;w=1");
    for proxy in shared {
        assert_eq!(
            metric(
                &metrics(&proxy).await,
                r#"sluicegate_cluster_fallback_total{route="test"}"#
            ),
            Some(0.0)
        );
        proxy.shutdown().await;
    }

    // The same fleet with local buckets admits about three times as much.
    let mut local = Vec::new();
    for _ in 0..3 {
        local.push(start(&cluster_config(upstream, &redis.url(), "local", "")).await);
    }
    let (admitted, quota) = hammer(&local, "fleet-key", Duration::from_secs(3)).await;
    eprintln!(
        "local: three limiters admitted {admitted} against {quota:.1} ({:.2}x)",
        admitted as f64 / quota
    );
    assert!(
        admitted as f64 > 2.5 * quota,
        "three local limiters admitted {admitted} against one quota of {quota:.1}"
    );
    for proxy in local {
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_falls_back_without_a_5xx_and_shares_again_when_back() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (up, _) = spawn_upstream().await;
    let proxy = replica(up.addr.unwrap(), &redis, "").await;
    assert_eq!(call(&proxy, "k").await, StatusCode::OK);
    redis.kill();
    // Decided by the local bucket meanwhile: never a 5xx, and limited.
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(call(&proxy, "k").await);
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS));
    let text = metrics(&proxy).await;
    assert_eq!(metric(&text, "sluicegate_cluster_up"), Some(0.0));
    let fallbacks = metric(&text, r#"sluicegate_cluster_fallback_total{route="test"}"#).unwrap();
    assert!(fallbacks >= 39.0, "{fallbacks}");
    let (_, status) = get(&format!("http://{}/status", proxy.admin_addr())).await;
    assert_eq!(json(&status)["cluster"]["up"], false);

    redis.restart();
    until_up(&proxy).await;
    let before = metric(
        &metrics(&proxy).await,
        r#"sluicegate_cluster_fallback_total{route="test"}"#,
    );
    assert_eq!(call(&proxy, "fresh").await, StatusCode::OK);
    let after = metric(
        &metrics(&proxy).await,
        r#"sluicegate_cluster_fallback_total{route="test"}"#,
    );
    assert_eq!(
        before, after,
        "decided by the fallback although Redis is back"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_fallbacks_decide_while_redis_is_gone() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let url = redis.url();
    redis.kill();
    let (up, _) = spawn_upstream().await;
    let allow = start(&cluster_config(
        up.addr.unwrap(),
        &url,
        "cluster",
        "fallback = \"allow\"\n",
    ))
    .await;
    let deny = start(&cluster_config(
        up.addr.unwrap(),
        &url,
        "cluster",
        "fallback = \"deny\"\n",
    ))
    .await;
    for _ in 0..30 {
        assert_eq!(call(&allow, "k").await, StatusCode::OK);
        assert_eq!(call(&deny, "k").await, StatusCode::TOO_MANY_REQUESTS);
    }
    allow.shutdown().await;
    deny.shutdown().await;
}

/// Redis frozen (SIGSTOP: connections open, nothing answered): a request is
/// decided by the fallback within the timeout, not when Redis wakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_decided_within_the_timeout() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (up, _) = spawn_upstream().await;
    let proxy = replica(up.addr.unwrap(), &redis, "fallback = \"allow\"\n").await;
    assert_eq!(call(&proxy, "k").await, StatusCode::OK);
    redis.pause();
    let started = Instant::now();
    let status = call(&proxy, "k").await;
    let took = started.elapsed();
    redis.resume();
    assert_eq!(status, StatusCode::OK);
    // timeout_ms = 50; generous for a loaded machine, far below "when Redis
    // wakes" (never, here, until resumed).
    assert!(took < Duration::from_millis(500), "{took:?}");
    let text = metrics(&proxy).await;
    assert!(metric(&text, r#"sluicegate_cluster_fallback_total{route="test"}"#).unwrap() >= 1.0);
    proxy.shutdown().await;
}

/// One command timing out (a client can provoke one: a huge key, a slow
/// moment) does not switch the shared limit off for everyone: only commands
/// failing in a row, or a failed probe, mark Redis down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_command_does_not_mark_redis_down() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (up, _) = spawn_upstream().await;
    let proxy = replica(up.addr.unwrap(), &redis, "fallback = \"deny\"\n").await;
    assert_eq!(call(&proxy, "k").await, StatusCode::OK);
    redis.pause();
    // This one waits past timeout_ms: its own fallback (deny) decides it.
    assert_eq!(call(&proxy, "k").await, StatusCode::TOO_MANY_REQUESTS);
    redis.resume();
    // Redis is still taken as up: the next request is decided there, not
    // by the fallback until the next probe.
    assert_eq!(call(&proxy, "k").await, StatusCode::OK);
    let text = metrics(&proxy).await;
    assert_eq!(metric(&text, "sluicegate_cluster_up"), Some(1.0));
    proxy.shutdown().await;
}

/// The Lua script decides every arrival as governor does for the same
/// quota, with Redis's TIME replaced by the arrival's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lua_gcra_decides_as_governor_does() {
    use std::num::NonZeroU32;

    use governor::clock::FakeRelativeClock;
    use governor::{Quota, RateLimiter};
    use proptest::prelude::*;
    use proptest::test_runner::{Config as Cases, TestRunner};
    use sluicegate::cluster::{Cluster, ClusterSettings};

    let Some(redis) = RedisServer::start() else {
        return;
    };
    let registry = sluicegate::metrics::Registry::new();
    let cluster = Cluster::new(
        ClusterSettings {
            redis_url: redis.url(),
            timeout: Duration::from_secs(2),
            key_prefix: "prop".into(),
        },
        &registry,
    )
    .unwrap();
    cluster.spawn_prober();
    for _ in 0..250 {
        if cluster.is_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cluster.is_up());

    // Rates of a second or slower, so that each key's TTL (in Redis's real
    // time) outlives the case.
    let cases = (
        1u64..=4,                                          // period, seconds
        1u32..=5,                                          // burst
        proptest::collection::vec(0u64..3_000_000, 1..40), // gaps between arrivals, µs
    );
    let mut runner = TestRunner::new(Cases::with_cases(64));
    let handle = tokio::runtime::Handle::current();
    let case = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&cases, |(period_s, burst, gaps)| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("case-{n}").into_bytes();
        let period = Duration::from_secs(period_s);
        let quota = Quota::with_period(period)
            .unwrap()
            .allow_burst(NonZeroU32::new(burst).unwrap());
        let clock = FakeRelativeClock::default();
        let local = RateLimiter::direct_with_clock(quota, clock.clone());
        let tau = period * (burst - 1);
        // Far from zero, as Redis's clock is.
        let mut now = Duration::from_secs(1_700_000_000);
        for gap in gaps {
            now += Duration::from_micros(gap);
            clock.advance(Duration::from_micros(gap));
            let want = local.check().is_ok();
            let got = tokio::task::block_in_place(|| {
                handle.block_on(cluster.gcra(&key, period, tau, 1, Some(now)))
            })
            .unwrap()
            .allowed();
            prop_assert_eq!(
                got,
                want,
                "period {:?} burst {} at {:?}",
                period,
                burst,
                now
            );
        }
        Ok(())
    });
    result.unwrap();
}

/// Calls of the GCRA script Redis has served (`INFO commandstats`).
async fn script_calls(redis: &RedisServer) -> u64 {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Tiers keep their own rate and their own shared bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_work_unchanged_on_shared_buckets() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (up, _) = spawn_upstream().await;
    let tier = "[[route.rate_limit.tier]]\nname = \"trial\"\nkeys = [\"trial-key\"]\nper_second = 1\nburst = 1\n";
    let a = start(&cluster_config(
        up.addr.unwrap(),
        &redis.url(),
        "cluster",
        tier,
    ))
    .await;
    let b = start(&cluster_config(
        up.addr.unwrap(),
        &redis.url(),
        "cluster",
        tier,
    ))
    .await;
    until_up(&a).await;
    until_up(&b).await;
    assert_eq!(call(&a, "trial-key").await, StatusCode::OK);
    // The other replica shares the trial bucket: its one token is spent.
    let req = Request::get(format!("http://{}/x", b.proxy_addr()))
        .header("x-api-key", "trial-key")
        .body(full(""))
        .unwrap();
    let (res, _) = send(&client(), req).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["ratelimit-policy"], "\"trial\";q=1;w=1");
    assert!(res.headers().contains_key("retry-after"));
    // Default keys keep the route's rate.
    for _ in 0..5 {
        assert_eq!(call(&b, "plain").await, StatusCode::OK);
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Sends `n` requests of `key` round robin over `proxies`, one at a time:
/// how many were admitted. Counts only: no window, no pace.
async fn send_n(proxies: &[Running], key: &str, n: usize) -> u64 {
    let mut admitted = 0;
    for i in 0..n {
        let status = call(&proxies[i % proxies.len()], key).await;
        assert!(status == 200 || status == 429, "{status}");
        admitted += u64::from(status == 200);
    }
    admitted
}

/// Below the limit a replica spends its batch without asking Redis: a round
/// trip per batch, and batches double while each is spent in time. Counted,
/// not timed: `sync_ms` outlasts the run on any machine (a batch never
/// expires, so the sizes are 1, 2, 4, …), and the burst holds every token
/// the fleet could take, so the quota never binds however fast the requests
/// come. 300 requests a replica are 9 batches (1 + 2 + … + 256 ≥ 300).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_tokens_take_a_round_trip_per_batch_below_the_limit() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (up, _) = spawn_upstream().await;
    const PER_REPLICA: usize = 300;
    let mut calls = Vec::new();
    for (mode, extra) in [("exact", ""), ("batched", "sync_ms = 60000\n")] {
        let mut fleet = Vec::new();
        for _ in 0..3 {
            let text = rated_config(
                up.addr.unwrap(),
                &redis.url(),
                "cluster",
                1000.0,
                2000,
                extra,
            );
            fleet.push(start(&text).await);
        }
        for proxy in &fleet {
            until_up(proxy).await;
        }
        let before = script_calls(&redis).await;
        let admitted = send_n(&fleet, &format!("count-{mode}"), 3 * PER_REPLICA).await;
        let made = script_calls(&redis).await - before;
        eprintln!("{mode}: {admitted} admitted, {made} script calls");
        assert_eq!(admitted, 3 * PER_REPLICA as u64, "{mode}: the quota bound");
        calls.push(made);
        for proxy in fleet {
            proxy.shutdown().await;
        }
    }
    // Exact: a round trip a request (and one more where the script was not
    // loaded yet: EVALSHA refused, then EVAL).
    let n = 3 * PER_REPLICA as u64;
    assert!(
        (n..=n + 3).contains(&calls[0]),
        "exact: {} round trips",
        calls[0]
    );
    // 9 batches a replica; one more each for the script's first load.
    assert!(calls[1] <= 3 * (9 + 1), "batched: {} round trips", calls[1]);
}

/// At the limit, batched or not, the fleet never admits more than one bucket
/// (over the time actually taken: Redis's clock), and admits what it was
/// offered up to that. Offered is counted, so a slow machine that cannot
/// reach the rate is judged on what it sent, not failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_tokens_stay_within_the_quota() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (up, _) = spawn_upstream().await;
    let (rate, burst) = (50.0, 10);
    let mut shares = Vec::new();
    for (mode, extra) in [("exact", ""), ("batched", "sync_ms = 50\n")] {
        let mut fleet = Vec::new();
        for _ in 0..3 {
            let text = rated_config(
                up.addr.unwrap(),
                &redis.url(),
                "cluster",
                rate,
                burst,
                extra,
            );
            fleet.push(start(&text).await);
        }
        for proxy in &fleet {
            until_up(proxy).await;
        }
        let key = format!("quota-{mode}");
        let start = Instant::now();
        let (mut sent, mut admitted) = (0u64, 0u64);
        while start.elapsed() < Duration::from_secs(2) {
            let status = call(&fleet[sent as usize % 3], &key).await;
            assert!(status == 200 || status == 429, "{status}");
            admitted += u64::from(status == 200);
            sent += 1;
        }
        let quota = f64::from(burst) + rate * start.elapsed().as_secs_f64();
        eprintln!("{mode}: sent {sent}, admitted {admitted}, quota {quota:.1}");
        assert!(
            admitted as f64 <= quota * 1.02,
            "{mode}: {admitted} > {quota:.1}"
        );
        shares.push(admitted as f64 / quota.min(sent as f64));
        for proxy in fleet {
            proxy.shutdown().await;
        }
    }
    assert!(
        shares[0] >= 0.95,
        "exact: {:.3} of what it could admit",
        shares[0]
    );
    assert!(
        shares[1] >= 0.85,
        "batched: {:.3} of what it could admit",
        shares[1]
    );
}
