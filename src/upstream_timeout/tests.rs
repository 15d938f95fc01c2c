use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use super::*;
use crate::body::BoxError;
use crate::body::testing::Trickle;
use crate::dispatch::Dispatch;
use crate::error::{Reason, Rejection};
use crate::exchange::UpstreamLatency;

/// Reads the whole request body, then answers after `work` (never if None).
async fn upstream<B>(req: Request<B>, work: Option<Duration>) -> Result<Response<()>, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    req.into_body().collect().await.map_err(Into::into)?;
    match work {
        Some(work) => tokio::time::sleep(work).await,
        None => std::future::pending().await,
    }
    Ok(Response::new(()))
}

fn timeout_of(err: &BoxError) -> Reason {
    err.downcast_ref::<Rejection>()
        .expect("a rejection")
        .reason()
}

#[tokio::test(start_paused = true)]
async fn a_slow_upload_does_not_count_against_the_deadline() {
    let svc =
        UpstreamTimeoutLayer::new(Duration::from_millis(100)).layer(tower::service_fn(|req| {
            upstream(req, Some(Duration::from_millis(90)))
        }));
    // Ten frames 50 ms apart: the upload alone is five times the deadline.
    let req = Request::new(Trickle::new(10, Duration::from_millis(50)));
    let res = svc.oneshot(req).await.expect("answered in time");
    assert_eq!(
        res.extensions().get(),
        Some(&UpstreamLatency(Duration::from_millis(90)))
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_runs_from_the_end_of_the_body() {
    let svc = UpstreamTimeoutLayer::new(Duration::from_millis(100))
        .layer(tower::service_fn(|req| upstream(req, None)));
    let start = Instant::now();
    let req = Request::new(Trickle::new(10, Duration::from_millis(50)));
    let err = svc
        .oneshot(req)
        .await
        .expect_err("the upstream never answers");
    assert_eq!(timeout_of(&err), Reason::UpstreamTimeout);
    assert_eq!(start.elapsed(), Duration::from_millis(600));
}

#[tokio::test(start_paused = true)]
async fn without_a_body_the_clock_starts_at_once() {
    let svc = UpstreamTimeoutLayer::new(Duration::from_millis(100))
        .layer(tower::service_fn(|req| upstream(req, None)));
    let start = Instant::now();
    let err = svc
        .oneshot(Request::new(Empty::<Bytes>::new()))
        .await
        .expect_err("the upstream never answers");
    assert_eq!(timeout_of(&err), Reason::UpstreamTimeout);
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn a_body_dropped_unsent_still_arms_the_deadline() {
    // An inner service that drops the body at once and never answers.
    let svc = UpstreamTimeoutLayer::new(Duration::from_millis(100)).layer(tower::service_fn(
        |req: Request<SentBody<Trickle>>| async move {
            drop(req);
            std::future::pending::<Result<Response<()>, BoxError>>().await
        },
    ));
    let start = Instant::now();
    let req = Request::new(Trickle::new(10, Duration::from_millis(50)));
    let err = svc.oneshot(req).await.expect_err("times out");
    assert_eq!(timeout_of(&err), Reason::UpstreamTimeout);
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

/// Takes the first frame of the request body, then stops reading: a hung
/// worker, or a body larger than the socket buffers.
async fn stops_reading<B>(req: Request<B>) -> Result<Response<()>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut body = req.into_body();
    body.frame().await;
    std::future::pending().await
}

fn cause_of(err: &BoxError) -> String {
    let rejection = err.downcast_ref::<Rejection>().expect("a rejection");
    rejection
        .cause()
        .map(ToString::to_string)
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_stops_taking_the_body_is_cut_at_the_write_timeout() {
    let svc = UpstreamTimeoutLayer::new(Duration::from_secs(30))
        .write_timeout(Duration::from_millis(500))
        .layer(tower::service_fn(stops_reading));
    let start = Instant::now();
    // The client has every byte ready: only the upstream holds the upload.
    let req = Request::new(Trickle::new(1000, Duration::from_millis(1)));
    let err = svc.oneshot(req).await.expect_err("cut");
    assert_eq!(timeout_of(&err), Reason::UpstreamTimeout);
    assert!(
        cause_of(&err).contains("took no request bytes"),
        "{}",
        cause_of(&err)
    );
    // The first frame came at 1 ms and was taken; the upstream never asked
    // for the second.
    assert_eq!(start.elapsed(), Duration::from_millis(501));
}

#[tokio::test(start_paused = true)]
async fn a_request_never_taken_is_cut_at_the_write_timeout() {
    // Waiting for a connection or an HTTP/2 stream that never comes.
    let svc = UpstreamTimeoutLayer::new(Duration::from_secs(30))
        .write_timeout(Duration::from_millis(500))
        .layer(tower::service_fn(
            |req: Request<SentBody<Trickle>>| async move {
                let _held = req;
                std::future::pending::<Result<Response<()>, BoxError>>().await
            },
        ));
    let start = Instant::now();
    let req = Request::new(Trickle::new(10, Duration::from_millis(1)));
    let err = svc.oneshot(req).await.expect_err("cut");
    assert!(cause_of(&err).contains("took no request bytes"));
    assert_eq!(start.elapsed(), Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn a_slow_client_is_not_the_upstreams_write_stall() {
    // Frames 300 ms apart with a 100 ms write timeout: every wait is the
    // client's, and the upstream takes each frame at once.
    let svc = UpstreamTimeoutLayer::new(Duration::from_millis(100))
        .write_timeout(Duration::from_millis(100))
        .layer(tower::service_fn(|req| {
            upstream(req, Some(Duration::from_millis(50)))
        }));
    let req = Request::new(Trickle::new(10, Duration::from_millis(300)));
    let res = svc.oneshot(req).await.expect("answered");
    assert_eq!(
        res.extensions().get(),
        Some(&UpstreamLatency(Duration::from_millis(50)))
    );
}

#[tokio::test(start_paused = true)]
async fn the_clients_deadline_bounds_the_upload_too() {
    let svc =
        UpstreamTimeoutLayer::new(Duration::from_secs(30)).layer(tower::service_fn(stops_reading));
    let start = Instant::now();
    let mut req = Request::new(Trickle::new(1000, Duration::from_millis(1)));
    req.extensions_mut()
        .insert(Deadline(start + Duration::from_millis(250)));
    let err = svc.oneshot(req).await.expect_err("cut");
    let rejection = err.downcast_ref::<Rejection>().unwrap();
    assert!(crate::body::find_cause::<crate::deadline::ClientDeadline>(rejection).is_some());
    assert_eq!(start.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn the_wait_before_dispatch_is_not_the_upstreams_time() {
    // A request without a body waits 2 s for a way to the upstream (an
    // HTTP/2 stream), then the upstream answers in 50 ms: inside a 100 ms
    // deadline, measured from the dispatch.
    let svc = UpstreamTimeoutLayer::new(Duration::from_millis(100))
        .from_dispatch(true)
        .layer(tower::service_fn(
            |req: Request<SentBody<Empty<Bytes>>>| async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                req.extensions()
                    .get::<Dispatch>()
                    .expect("a dispatch")
                    .sent();
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, BoxError>(Response::new(()))
            },
        ));
    let res = svc
        .oneshot(Request::new(Empty::<Bytes>::new()))
        .await
        .expect("answered in time");
    assert_eq!(
        res.extensions().get(),
        Some(&UpstreamLatency(Duration::from_millis(50)))
    );
}
