//! Controller behaviour on tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::error::Reason;

fn controller(max: usize, capacity: usize, timeout_ms: u64) -> Arc<Controller> {
    Controller::new(AdmissionSettings {
        max_inflight: max,
        queue_capacity: capacity,
        queue_timeout: Duration::from_millis(timeout_ms),
        retry_after_min_s: 1,
        retry_after_max_s: 60,
    })
}

/// Spawns a waiter and lets it reach the queue.
async fn waiter(
    c: &Arc<Controller>,
    p: Priority,
) -> tokio::task::JoinHandle<Result<Permit, Reason>> {
    let c = c.clone();
    let handle = tokio::spawn(async move { c.acquire(p).await.map_err(|r| r.reason()) });
    tokio::task::yield_now().await;
    handle
}

#[tokio::test(start_paused = true)]
async fn freed_slots_go_to_the_highest_class_first_fifo_within() {
    let c = controller(1, 10, 60_000);
    let first = c.acquire(Priority::Normal).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, p) in [
        ("b1", Priority::Batch),
        ("n1", Priority::Normal),
        ("c1", Priority::Critical),
        ("n2", Priority::Normal),
        ("c2", Priority::Critical),
    ] {
        let (c, order) = (c.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let permit = c.acquire(p).await.unwrap();
            order.lock().unwrap().push(name);
            drop(permit);
        }));
        tokio::task::yield_now().await;
    }
    assert_eq!(c.snapshot().queued, 5);
    drop(first);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), ["c1", "c2", "n1", "n2", "b1"]);
    assert_eq!((c.snapshot().inflight, c.snapshot().queued), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_evicts_the_newest_lower_waiter_for_a_higher_arrival() {
    let c = controller(1, 2, 60_000);
    let _held = c.acquire(Priority::Normal).await.unwrap();
    let normal = waiter(&c, Priority::Normal).await;
    let batch = waiter(&c, Priority::Batch).await;
    // Equal class: the arrival itself is refused.
    let refused = c.acquire(Priority::Batch).await.unwrap_err();
    assert_eq!(refused.reason(), Reason::QueueFull);
    // Higher class: the newest waiter of the lowest class goes.
    let critical = waiter(&c, Priority::Critical).await;
    assert_eq!(batch.await.unwrap().unwrap_err(), Reason::QueueFull);
    assert_eq!(c.snapshot().queued, 2);
    assert!(!normal.is_finished() && !critical.is_finished());
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_refuses_after_the_timeout() {
    let c = controller(1, 4, 100);
    let _held = c.acquire(Priority::Normal).await.unwrap();
    let start = tokio::time::Instant::now();
    let err = c.acquire(Priority::Normal).await.unwrap_err();
    assert_eq!(err.reason(), Reason::QueueTimeout);
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(c.snapshot().queued, 0);
    assert_eq!(c.snapshot().shed_queue_timeout, 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_the_queue_and_leaks_no_slot() {
    let c = controller(1, 1, 60_000);
    let held = c.acquire(Priority::Normal).await.unwrap();
    let w = waiter(&c, Priority::Normal).await;
    assert_eq!(c.snapshot().queued, 1);
    w.abort();
    let _ = w.await;
    assert_eq!(c.snapshot().queued, 0);
    // Its place is free for another, and the slot still reaches that one.
    let next = waiter(&c, Priority::Normal).await;
    drop(held);
    let permit = next.await.unwrap().unwrap();
    assert_eq!(c.snapshot().inflight, 1);
    drop(permit);
    assert_eq!(c.snapshot().inflight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_predicted_wait_beyond_the_timeout_is_refused_at_once() {
    let c = controller(1, 10, 100);
    // Teach the estimator: one completion per second.
    for _ in 0..5 {
        let p = c.acquire(Priority::Normal).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(p);
    }
    let _held = c.acquire(Priority::Normal).await.unwrap();
    let start = tokio::time::Instant::now();
    let err = c.acquire(Priority::Normal).await.unwrap_err();
    assert_eq!(err.reason(), Reason::QueueFull);
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "it waited instead of refusing"
    );
    // Retry-After: (queued 0 + in flight 1) at ~1/s, jittered ±20 %, rounded up.
    let res = err.into_response();
    let secs: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&secs), "{secs}");
}

#[tokio::test(start_paused = true)]
async fn no_queue_means_refusal_at_the_limit() {
    let c = controller(2, 0, 100);
    let _a = c.acquire(Priority::Normal).await.unwrap();
    let _b = c.acquire(Priority::Critical).await.unwrap();
    let err = c.acquire(Priority::Critical).await.unwrap_err();
    assert_eq!(err.reason(), Reason::QueueFull);
    assert_eq!(c.snapshot().shed_queue_full, 1);
}

/// A response body that sends one chunk, then ends only when told to.
struct SlowBody {
    first: Option<bytes::Bytes>,
    ended: std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>,
}

impl http_body::Body for SlowBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if let Some(chunk) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        std::future::Future::poll(self.ended.as_mut(), cx).map(|()| None)
    }
}

#[tokio::test(start_paused = true)]
async fn the_slot_is_held_until_a_streaming_body_ends() {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};

    let end = Arc::new(tokio::sync::Notify::new());
    let layer = AdmissionLayer::with_controller(controller(1, 4, 60_000));
    let c = layer.controller().clone();
    let e = end.clone();
    let svc = layer.layer(tower::service_fn(move |_req: http::Request<()>| {
        let end = e.clone();
        async move {
            let ended = Box::pin(end.notified_owned());
            Ok::<_, std::convert::Infallible>(http::Response::new(SlowBody {
                first: Some(bytes::Bytes::from_static(b"part")),
                ended,
            }))
        }
    }));

    let res = svc.clone().oneshot(http::Request::new(())).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "part");
    // Headers and a first chunk are out, the body is not done: still held.
    assert_eq!(c.snapshot().inflight, 1);
    let second = tokio::spawn(svc.clone().oneshot(http::Request::new(())));
    tokio::task::yield_now().await;
    assert_eq!(
        c.snapshot().queued,
        1,
        "the second request was admitted early"
    );

    end.notify_waiters();
    assert!(body.frame().await.is_none());
    // The end of the body frees the slot for the waiter, before the body is dropped.
    let res = second.await.unwrap().unwrap();
    assert_eq!(c.snapshot().inflight, 1);
    drop((res, body));
    assert_eq!((c.snapshot().inflight, c.snapshot().queued), (0, 0));
}

#[tokio::test]
async fn unlimited_admits_everything_and_counts_it() {
    let c = Controller::new(AdmissionSettings::UNLIMITED);
    let permits: Vec<_> = acquire_many(&c, 1000).await;
    assert_eq!(c.snapshot().inflight, 1000);
    assert_eq!(c.snapshot().limit, None);
    drop(permits);
    assert_eq!(c.snapshot().inflight, 0);
}

async fn acquire_many(c: &Arc<Controller>, n: usize) -> Vec<Permit> {
    let mut permits = Vec::with_capacity(n);
    for _ in 0..n {
        permits.push(c.acquire(Priority::Batch).await.unwrap());
    }
    permits
}

#[tokio::test(start_paused = true)]
async fn a_shrinking_limit_cancels_nothing_and_a_growing_one_admits_waiters() {
    let c = controller(4, 8, 10_000);
    let held = acquire_many(&c, 4).await;
    c.set_limit(2);
    assert_eq!(
        c.snapshot().inflight,
        4,
        "requests in flight keep their slot"
    );
    let queued = waiter(&c, Priority::Normal).await;
    let mut held = held.into_iter();
    drop(held.next());
    drop(held.next());
    assert_eq!(c.snapshot().inflight, 2);
    assert_eq!(c.snapshot().queued, 1, "still over the new limit");
    c.set_limit(3);
    let permit = queued.await.unwrap().unwrap();
    assert_eq!(c.snapshot().inflight, 3);
    drop(permit);
}

#[tokio::test(start_paused = true)]
async fn an_adaptive_limit_learns_from_recorded_samples_only() {
    use crate::adaptive::{AdaptiveSettings, AimdSettings, Bounds};
    let bounds = Bounds {
        min: 1,
        max: 50,
        initial: 4,
    };
    let aimd = AimdSettings {
        min_samples: 4,
        ..AimdSettings::default()
    };
    let c = Controller::adaptive(
        AdmissionSettings::UNLIMITED,
        AdaptiveSettings::Aimd(bounds, aimd),
        AdmissionMetrics::new("t", &crate::metrics::Registry::new()),
    );
    assert_eq!(c.snapshot().limit, Some(4));
    tokio::time::advance(Duration::from_millis(300)).await;
    // Four requests the client abandoned: no samples, no change.
    drop(acquire_many(&c, 4).await);
    assert_eq!(c.snapshot().limit, Some(4));
    // Four answered in time: a window without overload, one more slot.
    tokio::time::advance(Duration::from_millis(300)).await;
    for mut p in acquire_many(&c, 4).await {
        p.record(Duration::from_millis(20), false);
    }
    assert_eq!(c.snapshot().limit, Some(5));
    assert_eq!(c.snapshot().adaptive.unwrap().algorithm, "aimd");
    // Two windows of timeouts: back off, 5 × 0.9 × 0.9 = 4.05.
    for _ in 0..2 {
        tokio::time::advance(Duration::from_millis(300)).await;
        for mut p in acquire_many(&c, 4).await {
            p.record(Duration::from_secs(30), true);
        }
    }
    assert_eq!(c.snapshot().limit, Some(4));
}

#[tokio::test(start_paused = true)]
async fn a_lull_spanned_by_one_slow_request_leaves_retry_after_honest() {
    let c = controller(2, 2, 60_000);
    // Saturated at 100 completions per second: two slots, one freed and
    // retaken every 10 ms.
    let mut slots = vec![
        c.acquire(Priority::Normal).await.unwrap(),
        c.acquire(Priority::Normal).await.unwrap(),
    ];
    for _ in 0..200 {
        tokio::time::advance(Duration::from_millis(10)).await;
        slots.remove(0);
        slots.push(c.acquire(Priority::Normal).await.unwrap());
    }
    slots.clear();
    // A lull: one request, alone below the limit, takes 30 s.
    let slow = c.acquire(Priority::Normal).await.unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    drop(slow);
    // Saturated again, queue full: four requests ahead at 100/s drain in
    // 40 ms, so Retry-After is the minimum, not a minute.
    let _held = [
        c.acquire(Priority::Normal).await.unwrap(),
        c.acquire(Priority::Normal).await.unwrap(),
    ];
    let _queued = [
        waiter(&c, Priority::Normal).await,
        waiter(&c, Priority::Normal).await,
    ];
    let refused = c.acquire(Priority::Normal).await.unwrap_err();
    assert_eq!(refused.reason(), Reason::QueueFull);
    let res = refused.into_response();
    assert_eq!(res.headers()["retry-after"], "1");
}
