//! An in-test OTLP/gRPC trace collector: the collector's `TraceService`
//! from `opentelemetry-proto` as a tonic server on 127.0.0.1:0, keeping
//! every span it is sent, flattened with its resource's `service.name`.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;

/// OTLP span kinds (`opentelemetry.proto.trace.v1.Span.SpanKind`).
pub const KIND_SERVER: i32 = 2;
/// See [`KIND_SERVER`].
pub const KIND_CLIENT: i32 = 3;

/// One received span.
#[derive(Clone)]
pub struct Span {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// Every resource attribute, as text.
    pub resource: HashMap<String, String>,
    pub name: String,
    pub kind: i32,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    /// Empty for a root span.
    pub parent_span_id: Vec<u8>,
    /// Span attributes, as text (numbers in decimal).
    pub attributes: HashMap<String, String>,
    /// `Status.code`: 0 unset, 1 ok, 2 error.
    pub status: i32,
}

impl Span {
    /// An attribute's text, if set.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} kind={} trace={} span={} parent={} status={} {:?}",
            self.service,
            self.name,
            self.kind,
            hex(&self.trace_id),
            hex(&self.span_id),
            hex(&self.parent_span_id),
            self.status,
            self.attributes
        )
    }
}

/// Lower-case hex of bytes (trace and span ids as `traceparent` has them).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(kv: &KeyValue) -> (String, String) {
    let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    };
    (kv.key.clone(), value)
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<Span>>,
    arrived: Notify,
}

struct Sink(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut new = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource: HashMap<String, String> = rs
                .resource
                .map(|r| r.attributes.iter().map(text).collect())
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    new.push(Span {
                        service: service.clone(),
                        resource: resource.clone(),
                        name: s.name,
                        kind: s.kind,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        attributes: s.attributes.iter().map(text).collect(),
                        status: s.status.map_or(0, |st| st.code),
                    });
                }
            }
        }
        self.0.spans.lock().unwrap().extend(new);
        self.0.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The collector; stops when dropped.
pub struct Collector {
    /// `http://127.0.0.1:port`: the OTLP endpoint to give exporters.
    pub url: String,
    received: Arc<Received>,
    task: JoinHandle<()>,
}

impl Collector {
    /// Starts a collector on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Received::default());
        let sink = Sink(received.clone());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(sink))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .expect("OTLP collector failed");
        });
        Self {
            url: format!("http://{addr}"),
            received,
            task,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received.spans.lock().unwrap().clone()
    }

    /// Waits until the spans received satisfy `done`, failing after
    /// `limit` with what did arrive.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        mut done: impl FnMut(&[Span]) -> bool,
    ) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let arrived = self.received.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!("timed out after {limit:?} waiting for {what}; received: {spans:#?}");
            }
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
