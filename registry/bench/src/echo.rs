//! The ceiling: a no-op tonic service served by this process on its own
//! runtime thread(s), so it competes for the cores the way a separate
//! registry process does, while the client side stays identical.

use std::{net::SocketAddr, thread::JoinHandle};

use registry_api::bench::{
    EchoRequest, EchoResponse,
    echo_server::{Echo, EchoServer},
};
use tokio::sync::oneshot;
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

use super::BenchError;

/// Answers every call with its own payload and does nothing else.
#[derive(Debug, Default)]
struct NoOp;

#[tonic::async_trait]
impl Echo for NoOp {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(EchoResponse {
            payload: request.into_inner().payload,
        }))
    }
}

/// A running echo server; told to stop on drop. The thread is not joined:
/// graceful shutdown waits for client connections to close, which happens on
/// the caller's runtime, so joining from there could deadlock. It ends on its
/// own once the clients are gone.
#[derive(Debug)]
pub(crate) struct EchoService {
    /// Where it listens.
    pub(crate) url: String,
    shutdown: Option<oneshot::Sender<()>>,
    _thread: JoinHandle<()>,
}

impl EchoService {
    /// Starts the server on a free loopback port, on a multi-threaded runtime
    /// with as many workers as the registry daemon gets by default (one per
    /// core), in a thread of its own.
    pub(crate) fn start() -> Result<Self, BenchError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| BenchError::Io { what, source }
        };
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding the echo server"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(io("configuring the echo listener"))?;
        let addr: SocketAddr = std_listener
            .local_addr()
            .map_err(io("reading the echo address"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("echo")
            .build()
            .map_err(io("starting the echo runtime"))?;
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("echo-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("echo listener: {e}");
                            return;
                        }
                    };
                    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                    let served = Server::builder()
                        .add_service(EchoServer::new(NoOp))
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = rx.await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!("echo server: {e}");
                    }
                });
            })
            .map_err(io("spawning the echo thread"))?;
        Ok(Self {
            url: format!("http://{addr}"),
            shutdown: Some(tx),
            _thread: thread,
        })
    }
}

impl Drop for EchoService {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
