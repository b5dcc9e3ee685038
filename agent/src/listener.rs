//! Listeners: bind, accept, serve HTTP/1 connections, and drain them on shutdown.
//!
//! Mechanism only: what a request gets is the handler's business ([`crate::http`]), and who the
//! peer is, the `identify` function's ([`crate::attribution`]).

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

/// Binds a listening socket (IPv6 sockets take IPv6 only, so v4 and v6 listeners coexist).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
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
    socket.listen(1024).map_err(err)
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

/// Serves `listener` until `shutdown` is cancelled, then waits up to `drain` for open
/// connections to finish their requests.
///
/// `identify` runs once per connection, in the connection's own task, with the peer and local
/// addresses; `handle` once per request with what `identify` returned.
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
    IF: Future<Output = C> + Send + 'static,
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
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let local = stream.local_addr().ok().or(local).unwrap_or(peer);
        let identified = identify(peer, local);
        let handle = handle.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let context = Arc::new(identified.await);
            let service = service_fn(move |req| {
                let handle = handle.clone();
                let context = context.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, context).await) }
            });
            let conn = http1::Builder::new()
                .max_buf_size(MAX_HEAD_BYTES)
                .max_headers(MAX_HEADERS)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
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
