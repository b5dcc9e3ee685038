//! The task that keeps the view: kube-rs's watcher on this node's pods.
//!
//! A watch is a long stream: the API server ends each call after `timeoutSeconds`, and between
//! events (bookmarks included) it may be quiet for a minute or more. So the watch runs on a client
//! of its own whose read timeout outlasts the call (the other features' client gives up on a read
//! after 10 s), and the watcher's own idle timeout (the call's timeout and a few seconds) notices
//! a connection that died without a word.
//!
//! Errors are the watcher's to recover from (a watch that ends is resumed from the last version
//! seen; 410 Gone starts a new list; any other failure is retried with kube-rs's default backoff,
//! 0.8 s doubling to 30 s with jitter). Here they are counted by reason, and logged once per
//! spell of failures (403, missing RBAC, once for the agent's life), while the view keeps what it
//! had. The view counts as in step again at the next list or change, or once
//! [`QUIET_RECOVERY`] has passed without a failure.

use std::time::Duration;

use tokio::time::Instant;

use futures::StreamExt as _;
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, watcher};
use tokio_util::sync::CancellationToken;

use super::PodView;
use super::pod::WatchedPod;
use super::reflect::{Reflector, ViewMetrics};
use crate::config::KubernetesConfig;
use crate::kubernetes::ClientError;

/// How much longer than a watch call the view's client waits for a read: more than the watcher's
/// own idle timeout (the call's timeout and 5 s), so that the watcher, not the socket, decides.
const READ_TIMEOUT_MARGIN: Duration = Duration::from_secs(15);

/// The view's client (see [`client_config`]).
pub fn client(
    kube_config: kube::Config,
    config: &KubernetesConfig,
) -> Result<kube::Client, ClientError> {
    kube::Client::try_from(client_config(kube_config, config)).map_err(ClientError::Client)
}

/// `kube_config` with the agent's connect and write timeouts and no built-in retry, but a read
/// timeout longer than a watch call.
pub fn client_config(mut kube_config: kube::Config, config: &KubernetesConfig) -> kube::Config {
    kube_config.default_retry = false;
    kube_config.connect_timeout = Some(config.call_timeout);
    kube_config.write_timeout = Some(config.call_timeout);
    kube_config.read_timeout = Some(config.pod_view.watch_timeout + READ_TIMEOUT_MARGIN);
    kube_config
}

/// How long after a failure, with no failure since, the watch counts as resumed: a watch that
/// resumes quietly says nothing (the watcher passes on no bookmark), while a failing one fails
/// again within kube-rs's longest backoff (30 s, with jitter) and a call's connect timeout.
const QUIET_RECOVERY: Duration = Duration::from_secs(90);

/// What the watcher is asked: this node's pods, listed from the API server's cache (as client-go's
/// informers do: no read from etcd), each watch call ending after `watch_timeout`.
pub fn watcher_config(node: &str, watch_timeout: Duration) -> watcher::Config {
    watcher::Config::default()
        .fields(&format!("spec.nodeName={node}"))
        .timeout(u32::try_from(watch_timeout.as_secs()).unwrap_or(u32::MAX))
        .any_semantic()
}

/// Why a watch failed, as `pod_identity_pod_view_errors_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 403: the agent may not list or watch pods (RBAC).
    Forbidden,
    /// 410 Gone: the version the watch resumed from is too old; a new list follows.
    Expired,
    /// Anything else: the API server unreachable, an error status, a broken stream.
    Unavailable,
}

impl Failure {
    pub fn of(e: &watcher::Error) -> Failure {
        let code = match e {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => crate::kubernetes::status_code(e),
            watcher::Error::WatchError(status) => Some(status.code),
            watcher::Error::NoResourceVersion => None,
        };
        match code {
            Some(403) => Failure::Forbidden,
            Some(410) => Failure::Expired,
            _ => Failure::Unavailable,
        }
    }
}

/// Keeps `view` in step with this node's pods until `shutdown`.
pub async fn run(
    client: kube::Client,
    node: String,
    config: KubernetesConfig,
    view: PodView,
    metrics: ViewMetrics,
    shutdown: CancellationToken,
) {
    let api = Api::<WatchedPod>::all(client);
    let events =
        watcher(api, watcher_config(&node, config.pod_view.watch_timeout)).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut reflector = Reflector::new(view.clone(), config.pod_view.capacity, metrics.clone());
    let mut failing = false;
    let mut forbidden_logged = false;
    // After a failure, when a quiet resumed watch counts as in step again.
    let mut quiet_until: Option<Instant> = None;
    tracing::info!(node = %node, "pod view: watching this node's pods");
    loop {
        let quiet = async move {
            match quiet_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            () = quiet => {
                quiet_until = None;
                if reflector.resumed() && failing {
                    failing = false;
                    tracing::info!(pods = view.len(), "pod view: watching again");
                }
                continue;
            }
            next = events.next() => next,
        };
        match next {
            Some(Ok(event)) => {
                let synced = matches!(
                    event,
                    watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)
                );
                reflector.apply(event);
                if failing && synced {
                    failing = false;
                    tracing::info!(
                        pods = view.len(),
                        "pod view: in step with the API server again"
                    );
                }
            }
            Some(Err(e)) => {
                reflector.failed();
                let failure = Failure::of(&e);
                match failure {
                    Failure::Forbidden => metrics.forbidden.inc(),
                    Failure::Expired => metrics.expired.inc(),
                    Failure::Unavailable => metrics.unavailable.inc(),
                }
                if failure == Failure::Forbidden {
                    if !forbidden_logged {
                        forbidden_logged = true;
                        tracing::error!(
                            error = %crate::error_chain(&e),
                            "pod view: forbidden to list or watch pods (the agent's role needs get, list and watch on pods); audit records carry no pod names meanwhile"
                        );
                    }
                } else if failure == Failure::Expired {
                    tracing::debug!("pod view: the watch's version expired; listing again");
                } else if !failing {
                    tracing::warn!(
                        error = %crate::error_chain(&e),
                        pods = view.len(),
                        "pod view: the watch failed; keeping the last view and retrying"
                    );
                }
                failing = failing || failure != Failure::Expired;
                quiet_until = Some(Instant::now() + QUIET_RECOVERY);
            }
            // The watcher's stream never ends.
            None => return,
        }
    }
}
