//! A registry with its HTTP API and DNS on ephemeral ports, and a minimal
//! HTTP/1.1 client (hyper) with a Server-Sent Events reader, for the
//! `tests/http_*.rs`, `prometheus_sd.rs`, `dns.rs` and `dashboard.rs` suites.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use registry::{Config, frontends::Listeners};
use registry_api::v1::registry_client::RegistryClient;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tonic::transport::Channel;

use super::{OwnRuntime, TestServer};

/// A registry serving gRPC, HTTP and DNS on its own runtime.
pub struct HttpServer {
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP API address.
    pub http: SocketAddr,
    /// DNS address (UDP and TCP).
    pub dns: SocketAddr,
    served: OwnRuntime,
}

impl HttpServer {
    /// Starts with [`TestServer::no_warmup_config`].
    pub async fn start() -> Self {
        Self::start_with(TestServer::no_warmup_config()).await
    }

    /// Starts with `config` (its listen addresses are ignored: every socket
    /// is bound on an ephemeral loopback port).
    pub async fn start_with(config: Config) -> Self {
        let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (udp, tcp) = bind_dns();
        grpc.set_nonblocking(true).unwrap();
        http.set_nonblocking(true).unwrap();
        let addrs = (
            grpc.local_addr().unwrap(),
            http.local_addr().unwrap(),
            udp.local_addr().unwrap(),
        );
        let served = OwnRuntime::spawn(|stop| async move {
            let registry = registry::Registry::open(config).await.unwrap();
            let listeners = Listeners {
                http: Some(TcpListener::from_std(http).unwrap()),
                dns_udp: Some(UdpSocket::from_std(udp).unwrap()),
                dns_tcp: Some(TcpListener::from_std(tcp).unwrap()),
            };
            registry::server::serve_with(
                TcpListener::from_std(grpc).unwrap(),
                registry,
                listeners,
                async {
                    let _ = stop.await;
                },
            )
            .await
            .expect("registry server failed");
        });
        Self {
            grpc: addrs.0,
            http: addrs.1,
            dns: addrs.2,
            served,
        }
    }

    /// `http://127.0.0.1:port` of the HTTP API.
    pub fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    /// A raw gRPC client.
    pub async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to test registry")
    }

    /// Graceful stop; returns once the server task has finished.
    pub async fn stop(mut self) {
        self.served.stop().await;
    }
}

/// UDP and TCP sockets on one free port (retrying if the TCP port of a
/// fresh UDP port is taken).
fn bind_dns() -> (std::net::UdpSocket, std::net::TcpListener) {
    for _ in 0..20 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Ok(tcp) = std::net::TcpListener::bind(udp.local_addr().unwrap()) {
            udp.set_nonblocking(true).unwrap();
            tcp.set_nonblocking(true).unwrap();
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// A complete HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> hyper::Response<Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect HTTP");
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .unwrap();
    sender.send_request(req).await.expect("HTTP request")
}

/// Sends one request (on a connection of its own) and reads the whole
/// answer, within 30 s.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Answer {
    tokio::time::timeout(Duration::from_secs(30), async {
        let resp = send(addr, method, path, headers, body).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("read body")
            .to_bytes()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("HTTP answer within 30 s")
}

/// `GET path`.
pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path, &[], None).await
}

/// `POST path` with a JSON body.
pub async fn post_json(addr: SocketAddr, path: &str, body: &str, extra: &[(&str, &str)]) -> Answer {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    request(addr, "POST", path, &headers, Some(body)).await
}

/// One Server-Sent Events message.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

impl SseEvent {
    /// The data as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("SSE data is JSON")
    }
}

/// An open event stream.
pub struct Sse {
    pub status: u16,
    pub headers: http::HeaderMap,
    body: Incoming,
    buf: String,
}

impl Sse {
    /// Opens `GET path` as an event stream.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        let resp = send(addr, "GET", path, headers, None).await;
        Self {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next message with data (comments and retry-only blocks are
    /// skipped), or `None` when the stream ended; panics after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<SseEvent> {
        tokio::time::timeout(limit, async {
            loop {
                while let Some(cut) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..cut + 2).collect();
                    let mut ev = SseEvent {
                        event: "message".into(),
                        ..Default::default()
                    };
                    let mut data = Vec::new();
                    for line in block.lines() {
                        if line.starts_with(':') {
                            continue;
                        }
                        let (field, value) = line.split_once(':').unwrap_or((line, ""));
                        let value = value.strip_prefix(' ').unwrap_or(value);
                        match field {
                            "event" => ev.event = value.to_string(),
                            "data" => data.push(value.to_string()),
                            "id" => ev.id = Some(value.to_string()),
                            _ => {}
                        }
                    }
                    if !data.is_empty() {
                        ev.data = data.join("\n");
                        return Some(ev);
                    }
                }
                match self.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.buf.push_str(&String::from_utf8_lossy(&data));
                        }
                    }
                    _ => return None,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no SSE message within {limit:?}"))
    }

    /// The next message that is not `progress`.
    pub async fn next_change(&mut self, limit: Duration) -> Option<SseEvent> {
        loop {
            let ev = self.next(limit).await?;
            if ev.event != "progress" {
                return Some(ev);
            }
        }
    }
}
