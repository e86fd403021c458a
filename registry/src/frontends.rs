//! The front ends beside gRPC: the HTTP API ([`crate::http`]) and DNS
//! ([`crate::dns`]). [`Listeners::bind`] binds what the config asks for
//! (tests bind ephemeral ports themselves and fill [`Listeners`] directly);
//! [`Frontends::spawn`] serves them on the registry's tasks, and they stop
//! with the registry's shutdown token, like the gRPC server's streams.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, UdpSocket},
    task::JoinHandle,
};
use tracing::error;

use crate::{
    auth::{Auth, RateLimit},
    config::Config,
    core::Registry,
    error::{Error, Result},
};

/// Bound sockets of the front ends; `None` leaves one off.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The HTTP API.
    pub http: Option<TcpListener>,
    /// DNS over UDP.
    pub dns_udp: Option<UdpSocket>,
    /// DNS over TCP (for answers too large for UDP).
    pub dns_tcp: Option<TcpListener>,
}

fn bind_error(flag: &str, addr: SocketAddr, e: std::io::Error) -> Error {
    Error::Io(std::io::Error::new(
        e.kind(),
        format!("cannot listen on {addr} ({flag}): {e}"),
    ))
}

impl Listeners {
    /// Binds `config.http_listen` and `config.dns_listen` (UDP and TCP on
    /// the same address).
    pub async fn bind(config: &Config) -> Result<Self> {
        let mut out = Self::default();
        if let Some(addr) = config.http_listen {
            out.http = Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| bind_error("--http-listen", addr, e))?,
            );
        }
        if let Some(addr) = config.dns_listen {
            let udp = UdpSocket::bind(addr)
                .await
                .map_err(|e| bind_error("--dns-listen", addr, e))?;
            // Same port as UDP (which may have been chosen by the OS).
            let tcp_addr = udp.local_addr()?;
            out.dns_tcp = Some(
                TcpListener::bind(tcp_addr)
                    .await
                    .map_err(|e| bind_error("--dns-listen", tcp_addr, e))?,
            );
            out.dns_udp = Some(udp);
        }
        Ok(out)
    }
}

/// The running front ends.
#[derive(Debug)]
pub struct Frontends {
    tasks: Vec<JoinHandle<()>>,
}

impl Frontends {
    /// Serves the bound front ends until the registry shuts down.
    pub fn spawn(
        registry: &Registry,
        listeners: Listeners,
        auth: Option<Arc<Auth>>,
        rate: Option<Arc<RateLimit>>,
    ) -> Result<Self> {
        let mut tasks = Vec::new();
        if let Some(listener) = listeners.http {
            let api = crate::http::HttpApi::new(
                registry.clone(),
                auth.clone(),
                rate,
                listener.local_addr()?,
            );
            let stop = registry.shutdown_token().clone().cancelled_owned();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = crate::http::serve(listener, api, stop).await {
                    error!(error = %e, "HTTP API failed");
                }
            }));
        }
        if listeners.dns_udp.is_some() || listeners.dns_tcp.is_some() {
            let server = crate::dns::DnsServer::new(
                registry.clone(),
                auth.is_some(),
                listeners.dns_udp,
                listeners.dns_tcp,
            )?;
            tasks.push(tokio::spawn(server.run()));
        }
        Ok(Self { tasks })
    }

    /// Waits for every front end to finish (after the registry's shutdown).
    pub async fn stopped(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
