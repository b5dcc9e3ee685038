//! The probe and metrics ports' listener: as hard as the credential listener, with limits cut to
//! what a probe or a scrape needs, so that whoever reaches the port (any pod, on the metrics
//! port's default address) cannot grow the agent's memory or keep Prometheus out.
//!
//! - A few connections (`max_connections`), one request each (`Connection: close`): at most
//!   `max_head_bytes` read from each (a scrape's head is a few hundred bytes; a longer one is
//!   cut, and the connection closed at once), sent within `header_read_timeout`.
//! - When every slot is taken, the connection that has waited longest for its head (among those
//!   that have had their turn to read it) is closed to make room: a client that never finishes its
//!   head cannot hold the port, and a scrape, which sends its head at once, gets in.
//!   Connections are accepted as they come, so the kernel's accept queue does not fill behind
//!   slow clients.
//! - The unspecified address (`--metrics-address 0.0.0.0`, the default, or `::`) serves IPv4 and
//!   IPv6 on one dual-stack socket (`[::]`, `IPV6_V6ONLY` off); where the host has no IPv6, IPv4
//!   only, with a warning. Any other address binds just that.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::listener::{self, BindError};
use crate::probes::Probes;

/// How much a probe or metrics listener gives its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most; past it, the oldest still sending its head is closed.
    pub max_connections: usize,
    /// Bytes read from a connection at most: its request's head.
    pub max_head_bytes: usize,
    /// Time a client gets to send its head, and then to read the answer.
    pub header_read_timeout: Duration,
}

/// A scrape or a probe needs one connection for a moment and a head of a few hundred bytes.
pub const LIMITS: Limits = Limits {
    max_connections: 128,
    max_head_bytes: 4 * 1024,
    header_read_timeout: Duration::from_secs(2),
};

/// Binds `addr` and listens; the unspecified address serves IPv4 and IPv6 (see the module).
///
/// # Errors
/// Which step failed, with the address.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    if !addr.ip().is_unspecified() {
        return crate::listener::bind_and_listen(addr);
    }
    let dual = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addr.port());
    match bind_dual_stack(dual) {
        Ok(listener) => Ok(listener),
        Err(e) if e.address_missing() => {
            tracing::warn!(%addr, error = %e.source, "no IPv6 on this host: serving IPv4 only");
            crate::listener::bind_and_listen(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                addr.port(),
            ))
        }
        Err(e) => Err(e),
    }
}

fn bind_dual_stack(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let err = |source| BindError { addr, source };
    let socket = TcpSocket::new_v6().map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket2::SockRef::from(&socket)
        .set_only_v6(false)
        .map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// The connections still sending their heads, oldest first, and how many are open in all.
#[derive(Default)]
struct Connections {
    waiting: Mutex<BTreeMap<u64, CancellationToken>>,
    open: AtomicUsize,
}

impl Connections {
    fn waiting(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, CancellationToken>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts a connection open while it lives, and forgets its wait.
struct Open {
    connections: Arc<Connections>,
    seq: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.connections.waiting().remove(&self.seq);
        self.connections.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `probes` on `listener` within `limits` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    probes: Probes,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(Connections::default());
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(false)
        // hyper's smallest buffer; the reads are cut at `max_head_bytes` below.
        .max_buf_size(8 * 1024)
        .max_headers(32)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut seq = 0u64;
    loop {
        let Some((stream, peer)) = listener::accept(&listener, &shutdown).await else {
            break;
        };
        if connections.open.load(Ordering::Relaxed) >= limits.max_connections {
            // Room is made, or comes: answers end within their timeout, and connections not
            // yet read from are read at the runtime's next turn.
            loop {
                let oldest = connections.waiting().pop_first();
                if let Some((_, close)) = oldest {
                    close.cancel();
                    break;
                }
                if shutdown.is_cancelled() {
                    return;
                }
                tokio::task::yield_now().await;
                if connections.open.load(Ordering::Relaxed) < limits.max_connections {
                    break;
                }
            }
        }
        seq += 1;
        let close = shutdown.child_token();
        connections.open.fetch_add(1, Ordering::Relaxed);
        let open = Open {
            connections: connections.clone(),
            seq,
        };
        let probes = probes.clone();
        let answer_within = limits.header_read_timeout;
        // Past its head, a connection's reads end (hyper then sees an incomplete head and closes).
        let (read, write) = stream.into_split();
        let io = tokio::io::join(
            read.take(u64::try_from(limits.max_head_bytes).unwrap_or(u64::MAX)),
            write,
        );
        let conn = builder.serve_connection(
            TokioIo::new(io),
            service_fn(move |req| {
                // The head is in: no longer the first to be closed for room.
                open.connections.waiting().remove(&open.seq);
                let response = probes.handle(&req);
                async move { Ok::<_, std::convert::Infallible>(response) }
            }),
        );
        let waiting = connections.clone();
        tokio::spawn(async move {
            // Only now, at its first turn to read, may it be closed for room: one accepted just
            // before a burst is not closed before its head could be read.
            waiting.waiting().insert(seq, close.clone());
            tokio::select! {
                () = close.cancelled() => {}
                done = tokio::time::timeout(2 * answer_within, conn) => {
                    if let Ok(Err(e)) = done {
                        tracing::debug!(%peer, error = %e, "probe connection ended with an error");
                    }
                }
            }
        });
    }
}
