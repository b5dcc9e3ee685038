//! Shutdown: SIGTERM or SIGINT stops the listeners; in-flight requests get a bounded time to
//! finish.

use tokio_util::sync::CancellationToken;

/// Resolves on SIGTERM or SIGINT (or if the signal handlers cannot be installed, which leaves
/// the process to be killed the hard way: say so).
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (term, int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
            return std::future::pending().await;
        }
    };
    let (mut term, mut int) = (term, int);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// A token cancelled when a shutdown signal arrives.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        signal().await;
        cancel.cancel();
    });
    token
}
