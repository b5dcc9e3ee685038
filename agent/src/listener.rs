//! Listeners: bind, listen, accept, serve HTTP/1 connections, and drain them on shutdown.
//!
//! Mechanism only: what a request gets is the handler's business ([`crate::http`]), and who the
//! peer is — and whether its connection is kept at all — the `identify` function's
//! ([`crate::attribution`]).
//!
//! Binding and listening are two steps ([`bind`], then [`Bound::listen`]): a bound socket that
//! does not listen refuses connections (RST), so the server can attach what attributes
//! connections in between, and no connection is accepted, nor queued in the backlog, before.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Open connections per listener before new ones wait.
const MAX_CONNECTIONS: usize = 10_000;
/// Bound on a request's head (request line and headers).
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Time a client gets to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding {addr}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

impl BindError {
    /// The address is not on this host (yet): IPv6 off, `initialize` not run.
    pub fn address_missing(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
        )
    }
}

/// A bound socket that does not listen yet: connections to it are refused.
pub struct Bound {
    socket: TcpSocket,
    addr: SocketAddr,
}

impl Bound {
    /// The bound address (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts listening: from now on the kernel completes handshakes and queues connections.
    ///
    /// # Errors
    /// `listen()` failed.
    pub fn listen(self) -> Result<TcpListener, BindError> {
        let addr = self.addr;
        self.socket
            .listen(1024)
            .map_err(|source| BindError { addr, source })
    }
}

/// Binds and listens at once, for sockets nothing needs to watch first (probes, metrics).
///
/// # Errors
/// Which step failed, with the address.
pub fn bind_and_listen(addr: SocketAddr) -> Result<TcpListener, BindError> {
    bind(addr)?.listen()
}

/// Binds a socket without listening (IPv6 sockets take IPv6 only, so v4 and v6 listeners
/// coexist).
///
/// # Errors
/// Which step failed, with the address ([`BindError::address_missing`] when it is not here).
pub fn bind(addr: SocketAddr) -> Result<Bound, BindError> {
    let err = |source| BindError { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    if addr.is_ipv6() {
        socket2::SockRef::from(&socket)
            .set_only_v6(true)
            .map_err(err)?;
    }
    socket.bind(addr).map_err(err)?;
    let addr = socket.local_addr().map_err(err)?;
    Ok(Bound { socket, addr })
}

/// Set while a listener's accept loop runs: what `/readyz` reports.
#[derive(Clone, Default)]
pub struct Accepting(Arc<AtomicBool>);

impl Accepting {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, accepting: bool) {
        self.0.store(accepting, Ordering::Relaxed);
    }
}

/// Whether every credential listener is accepting: what `/readyz` answers, and what the startup
/// taint waits for. Here beside [`Accepting`] so that whoever waits for readiness needs no more
/// than the listeners.
#[derive(Clone, Default)]
pub struct Readiness {
    listeners: Vec<Accepting>,
}

impl Readiness {
    pub fn new(listeners: Vec<Accepting>) -> Self {
        Readiness { listeners }
    }

    pub fn is_ready(&self) -> bool {
        !self.listeners.is_empty() && self.listeners.iter().all(Accepting::get)
    }
}

/// How every connection speaks HTTP/1: bounded request heads, and a deadline to send one. Public
/// for the fuzz targets, which serve in-memory connections with it.
pub fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
}

/// Serves `listener` until `shutdown` is cancelled, then waits up to `drain` for open
/// connections to finish their requests.
///
/// The next connection, or `None` at shutdown. A failed `accept()` (out of file descriptors and
/// the like) is logged and waited out briefly rather than retried in a spin.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// `identify` runs once per connection, in the connection's own task, with the peer and local
/// addresses; `None` closes the connection at once. `handle` runs once per request with what
/// `identify` returned, which lives as long as the connection.
pub async fn serve<C, I, IF, H, F>(
    listener: TcpListener,
    identify: I,
    handle: H,
    accepting: Accepting,
    shutdown: CancellationToken,
    drain: Duration,
) where
    C: Send + Sync + 'static,
    I: Fn(SocketAddr, SocketAddr) -> IF,
    IF: Future<Output = Option<C>> + Send + 'static,
    H: Fn(Request<Incoming>, Arc<C>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let local = listener.local_addr().ok();
    accepting.set(true);
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let Some((stream, peer)) = accept(&listener, &shutdown).await else {
            break;
        };
        let local = stream.local_addr().ok().or(local).unwrap_or(peer);
        let identified = identify(peer, local);
        let handle = handle.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some(context) = identified.await else {
                // Dropping the stream closes it, and the permit frees the slot.
                return;
            };
            let context = Arc::new(context);
            let service = service_fn(move |req| {
                let handle = handle.clone();
                let context = context.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, context).await) }
            });
            let conn = http1_builder().serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    accepting.set(false);
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "connections still open after the drain timeout; closing them"
        );
    }
}
