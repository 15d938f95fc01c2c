//! A real gRPC upstream and client (tonic), speaking OTLP's trace service:
//! the receiver stub counts the spans it takes and answers as told.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Answer {
    Ok = 0,
    Unavailable = 1,
    InvalidArgument = 2,
    /// Answers OK after two seconds.
    Slow = 3,
    /// Answers OK after 100 ms.
    Busy = 4,
}

/// What the receiver saw, and its switch.
#[derive(Default)]
pub struct Receiver {
    pub calls: AtomicU64,
    pub spans: AtomicU64,
    answer: AtomicU8,
}

impl Receiver {
    pub fn answer(&self, answer: Answer) {
        self.answer.store(answer as u8, Ordering::SeqCst);
    }
}

/// The receiver's service, to serve as a test likes.
pub struct Stub(Arc<Receiver>);

/// A receiver and its service.
pub fn receiver_service() -> (Arc<Receiver>, Stub) {
    let state = Arc::new(Receiver::default());
    (state.clone(), Stub(state))
}

#[tonic::async_trait]
impl TraceService for Stub {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        match self.0.answer.load(Ordering::SeqCst) {
            1 => return Err(Status::unavailable("receiver down")),
            2 => return Err(Status::invalid_argument("bad spans")),
            3 => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
            4 => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            _ => {}
        }
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.spans.fetch_add(spans as u64, Ordering::SeqCst);
        let mut res = Response::new(ExportTraceServiceResponse {
            partial_success: None,
        });
        res.metadata_mut()
            .insert("x-receiver", "stub".parse().unwrap());
        Ok(res)
    }
}

/// An OTLP/gRPC receiver on 127.0.0.1:0 (h2c), until the test ends.
pub async fn spawn_receiver() -> (Arc<Receiver>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (state, stub) = receiver_service();
    let service = TraceServiceServer::new(stub);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (state, addr)
}

/// A request of `n` spans.
pub fn spans(n: usize) -> ExportTraceServiceRequest {
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: (0..n)
                    .map(|i| Span {
                        trace_id: vec![1; 16],
                        span_id: (i as u64 + 1).to_be_bytes().to_vec(),
                        name: format!("span {i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}
