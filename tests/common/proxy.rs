//! A loopback TCP proxy for fault injection: a registry node reaches etcd
//! through it, and the test cuts, black-holes or slows that one link while
//! everything else (the node's clients, the other nodes) stays untouched.
//!
//! Modes, switched at any time:
//! - [`Proxy::heal`]: bytes pass both ways (the start state).
//! - [`Proxy::cut`]: every open connection is closed at once and new ones
//!   are accepted and closed straight away: the node sees resets, as when
//!   etcd's host is up but the route to it is refused.
//! - [`Proxy::blackhole`]: connections stay open but nothing passes either
//!   way, and new connections are accepted but never forwarded: a partition
//!   the node only notices by its timeouts. Connections held through a
//!   black hole are closed on heal, as a long partition's would have timed
//!   out; the node reconnects on fresh ones.
//! - [`Proxy::delay`]: bytes from the node towards etcd are held back by a
//!   fixed delay (answers come back at once), so a write the node sends now
//!   lands later than writes other nodes send meanwhile.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, watch},
    task::JoinSet,
    time::Instant,
};

/// What the proxy does with bytes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Pass everything.
    Open,
    /// Close everything, refuse new connections.
    Cut,
    /// Keep connections, pass nothing.
    Blackhole,
    /// Pass everything, bytes towards upstream late by this much.
    Delay(Duration),
}

impl Mode {
    fn forwards(self) -> bool {
        matches!(self, Mode::Open | Mode::Delay(_))
    }
}

/// A running proxy; stops (closing every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    /// Where the proxy listens (127.0.0.1, ephemeral port).
    pub addr: SocketAddr,
    /// `http://addr`, what the node is given as its etcd endpoint.
    pub url: String,
    mode: watch::Sender<Mode>,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream` on a free loopback port, in `Open` mode.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Open);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, upstream, rx));
        Self {
            addr,
            url: format!("http://{addr}"),
            mode,
            tasks,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Closes every connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Passes nothing, closes nothing, until [`Proxy::heal`].
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Holds bytes towards upstream back by `delay`.
    pub fn delay(&self, delay: Duration) {
        self.mode.send_replace(Mode::Delay(delay));
    }

    /// Back to passing everything.
    pub fn heal(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, mode: watch::Receiver<Mode>) {
    // Connection tasks live in this set: dropping the accept loop (proxy
    // dropped) drops them and with them every socket.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let _ = client.set_nodelay(true);
                conns.spawn(connection(client, upstream, mode.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Waits until the mode satisfies `pred` (or the proxy is gone).
async fn until(mode: &mut watch::Receiver<Mode>, pred: impl Fn(Mode) -> bool) {
    let _ = mode.wait_for(|m| pred(*m)).await;
}

async fn connection(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let now = *mode.borrow_and_update();
    match now {
        Mode::Cut => return,
        Mode::Blackhole => {
            // Accepted, never forwarded; closed once the black hole ends.
            until(&mut mode, |m| m != Mode::Blackhole).await;
            return;
        }
        Mode::Open | Mode::Delay(_) => {}
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    {
        let forwarding = async {
            tokio::join!(
                upstream_pump(&mut cr, &mut sw, mode.clone()),
                pump(&mut sr, &mut cw)
            )
        };
        let mut faults = mode.clone();
        tokio::select! {
            _ = forwarding => return,
            () = until(&mut faults, |m| !m.forwards()) => {}
        }
    }
    // The pumps are gone: nothing passes any more. A cut closes now; a
    // black hole keeps the sockets open (silent) until it ends.
    if *mode.borrow_and_update() == Mode::Blackhole {
        until(&mut mode, |m| m != Mode::Blackhole).await;
    }
    drop((cr, cw, sr, sw));
}

/// Copies `from` to `to` until either side closes.
async fn pump(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Node-to-etcd direction: like [`pump`], but each chunk is written no
/// earlier than its arrival plus the delay in force when it arrived. Reading
/// and writing are separate loops so delays do not add up.
async fn upstream_pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mode: watch::Receiver<Mode>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let delay = match *mode.borrow() {
                        Mode::Delay(d) => d,
                        _ => Duration::ZERO,
                    };
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
