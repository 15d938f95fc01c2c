//! A real OTLP client: the OpenTelemetry SDK's gRPC exporter sends spans
//! through sluicegate to an OTLP receiver. Overloaded, the proxy refuses
//! exports with RESOURCE_EXHAUSTED and a RetryInfo (the OTLP throttling
//! signal); the exporter waits the delay and retries, and every span arrives.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::support::grpc::{Answer, spawn_receiver};
use crate::support::*;
use opentelemetry::InstrumentationScope;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry_otlp::{RetryPolicy, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};

fn batch(exporter: u64, n: u64) -> Vec<SpanData> {
    (0..n)
        .map(|i| SpanData {
            span_context: SpanContext::new(
                TraceId::from(u128::from(exporter) + 1),
                SpanId::from(i + 1),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: format!("ingest {i}").into(),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("sluicegate-test").build(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opentelemetry_exporter_is_throttled_and_every_span_arrives() {
    let (receiver, addr) = spawn_receiver().await;
    // Two at a time and nobody waits: a burst of exporters is refused.
    let route = "upstream_protocol = \"http2\"\n[route.admission]\nmax_inflight = 2\n\
                 queue_capacity = 0\nretry_after_min_s = 1\nretry_after_max_s = 2\n";
    let proxy = sluicegate::start(config(addr, "/", route)).await.unwrap();
    receiver.answer(Answer::Ok);
    let exporter = Arc::new(
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://{}", proxy.proxy_addr()))
            .with_timeout(Duration::from_secs(30))
            .with_retry_policy(RetryPolicy::recommended().with_max_retries(10))
            .build()
            .unwrap(),
    );
    let (exporters, batches, spans) = (8u64, 5u64, 10u64);
    let tasks: Vec<_> = (0..exporters)
        .map(|e| {
            let exporter = exporter.clone();
            tokio::spawn(async move {
                for _ in 0..batches {
                    exporter.export(batch(e, spans)).await?;
                }
                Ok::<_, opentelemetry_sdk::error::OTelSdkError>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().expect("an export failed for good");
    }
    assert_eq!(
        receiver.spans.load(Ordering::SeqCst),
        exporters * batches * spans,
        "spans lost"
    );
    // And it was refused on the way: the retries were the proxy's doing.
    let (_, metrics) = get(&format!("http://{}/metrics", proxy.admin_addr())).await;
    let refused = metric(
        &String::from_utf8_lossy(&metrics),
        r#"sluicegate_requests_total{route="test",outcome="queue_full"}"#,
    )
    .unwrap_or(0.0);
    assert!(refused > 0.0, "never refused: the test proves nothing");
    eprintln!(
        "{} spans in {} exports arrived; {refused} refusals along the way",
        exporters * batches * spans,
        exporters * batches
    );
    proxy.shutdown().await;
}
