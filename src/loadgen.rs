//! An open-loop load generator: requests start on a fixed schedule whatever the
//! responses (unlike wrk, whose closed loop slows down with the server and so
//! hides overload). Used by `sluicegate demo` and the overload benchmark.
//!
//! Bounded: at most `max_outstanding` requests are open at once (more are
//! counted as `client_dropped`, as a real client pool would refuse them), and
//! each gives up after `client_timeout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Requests answered 2xx within this count as goodput.
pub const GOOD_LATENCY: Duration = Duration::from_millis(250);

/// What happened in one second of a run (answers counted in the second they
/// arrived, offers in the second they started).
#[derive(Debug, Clone, Default)]
pub struct Second {
    /// Requests started.
    pub offered: u64,
    /// 2xx answers.
    pub ok: u64,
    /// 2xx answers within [`GOOD_LATENCY`].
    pub good: u64,
    /// 503 answers.
    pub shed: u64,
    /// 503 answers that carried `Retry-After`.
    pub shed_with_retry_after: u64,
    /// Other statuses, connection errors and client timeouts.
    pub errors: u64,
    /// Requests not started because `max_outstanding` were open.
    pub client_dropped: u64,
    /// Latencies of 2xx answers, microseconds.
    pub ok_latency_us: Vec<u64>,
    /// Latencies of 503 answers, microseconds.
    pub shed_latency_us: Vec<u64>,
}

impl Second {
    fn merge(&mut self, other: &Second) {
        self.offered += other.offered;
        self.ok += other.ok;
        self.good += other.good;
        self.shed += other.shed;
        self.shed_with_retry_after += other.shed_with_retry_after;
        self.errors += other.errors;
        self.client_dropped += other.client_dropped;
        self.ok_latency_us.extend_from_slice(&other.ok_latency_us);
        self.shed_latency_us
            .extend_from_slice(&other.shed_latency_us);
    }

    /// Sums several seconds.
    pub fn total<'a>(seconds: impl IntoIterator<Item = &'a Second>) -> Second {
        let mut all = Second::default();
        for s in seconds {
            all.merge(s);
        }
        all
    }
}

/// The `q` quantile (0..=1) of `samples`, in milliseconds.
pub fn quantile_ms(samples: &[u64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1] as f64 / 1000.0)
}

/// A load run's shape and bounds.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Where requests go.
    pub url: http::Uri,
    /// Requests per second for each whole second of the run.
    pub rates: Vec<f64>,
    /// Most requests open at once.
    pub max_outstanding: usize,
    /// A request still unanswered after this is an error.
    pub client_timeout: Duration,
    /// Sent with every request (a tenant's API key, say).
    pub headers: http::HeaderMap,
    /// Each request's body: empty for a GET, else POSTed.
    pub body: Bytes,
}

enum Event {
    Offered,
    Dropped,
    Done {
        status: Option<StatusCode>,
        latency: Duration,
        retry_after: bool,
    },
}

/// Runs `plan`, calling `each_second` with every finished second as it ends.
/// Returns all seconds; requests still open at the end are abandoned.
pub async fn run(plan: LoadPlan, mut each_second: impl FnMut(usize, &Second)) -> Vec<Second> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(plan.max_outstanding)
        .build(HttpConnector::new());
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Event)>();
    let outstanding = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let seconds = plan.rates.len();
    let mut results = vec![Second::default(); seconds];
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = 0.0f64;
    let mut due = 0.0f64;
    let mut last = start;
    let mut reported = 0;
    let tick = Duration::from_millis(1);
    loop {
        let now = Instant::now();
        let elapsed = now - start;
        let second = elapsed.as_secs() as usize;
        // Fold in what the request tasks reported.
        while let Ok((at, event)) = rx.try_recv() {
            record(&mut results, at, event, now, start);
        }
        while reported < second.min(seconds) {
            each_second(reported, &results[reported]);
            reported += 1;
        }
        if second >= seconds {
            break;
        }
        due += plan.rates[second] * (now - last).as_secs_f64();
        last = now;
        while sent + 1.0 <= due {
            sent += 1.0;
            if outstanding.load(Ordering::Relaxed) >= plan.max_outstanding {
                let _ = tx.send((second, Event::Dropped));
                continue;
            }
            outstanding.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send((second, Event::Offered));
            let (client, tx, outstanding) = (client.clone(), tx.clone(), outstanding.clone());
            let url = plan.url.clone();
            let headers = plan.headers.clone();
            let body = plan.body.clone();
            let timeout = plan.client_timeout;
            tasks.spawn(async move {
                let began = Instant::now();
                let method = if body.is_empty() {
                    http::Method::GET
                } else {
                    http::Method::POST
                };
                let req = Request::builder()
                    .method(method)
                    .uri(url)
                    .body(Full::new(body))
                    .map(|mut req| {
                        *req.headers_mut() = headers;
                        req
                    });
                let answer = match req {
                    Ok(req) => tokio::time::timeout(timeout, async {
                        let res = client.request(req).await.ok()?;
                        let status = res.status();
                        let retry_after = res.headers().contains_key(http::header::RETRY_AFTER);
                        res.into_body().collect().await.ok()?;
                        Some((status, retry_after))
                    })
                    .await
                    .ok()
                    .flatten(),
                    Err(_) => None,
                };
                outstanding.fetch_sub(1, Ordering::Relaxed);
                let (status, retry_after) = answer.map_or((None, false), |(s, r)| (Some(s), r));
                let done = Event::Done {
                    status,
                    latency: began.elapsed(),
                    retry_after,
                };
                let _ = tx.send((0, done));
            });
        }
        // Reap finished tasks so the set stays as small as what is open.
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(tick).await;
    }
    tasks.abort_all();
    results
}

fn record(results: &mut [Second], offered_at: usize, event: Event, now: Instant, start: Instant) {
    let last = results.len() - 1;
    match event {
        Event::Offered => results[offered_at.min(last)].offered += 1,
        Event::Dropped => results[offered_at.min(last)].client_dropped += 1,
        Event::Done {
            status,
            latency,
            retry_after,
        } => {
            let s = &mut results[((now - start).as_secs() as usize).min(last)];
            let us = latency.as_micros() as u64;
            match status {
                Some(st) if st.is_success() => {
                    s.ok += 1;
                    if latency <= GOOD_LATENCY {
                        s.good += 1;
                    }
                    s.ok_latency_us.push(us);
                }
                Some(StatusCode::SERVICE_UNAVAILABLE) => {
                    s.shed += 1;
                    s.shed_with_retry_after += u64::from(retry_after);
                    s.shed_latency_us.push(us);
                }
                _ => s.errors += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let samples: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(quantile_ms(&samples, 0.5), Some(50.0));
        assert_eq!(quantile_ms(&samples, 0.99), Some(99.0));
        assert_eq!(quantile_ms(&[], 0.99), None);
    }
}
