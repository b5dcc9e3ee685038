//! What the agent asks of the Kubernetes API: removing this node's startup taint once it serves
//! ([`taint`]), Events on pods whose credential requests fail ([`events`], aggregated and
//! rate-limited by [`events::correlator`]), and the node's pods for the names of their callers
//! ([`pod_view`]).
//!
//! The client (kube-rs, configured like every Kubernetes client: `KUBECONFIG` or
//! `~/.kube/config`, else the pod's service account and `KUBERNETES_SERVICE_HOST`) is created
//! only when one of the features is on, and in the background: with all of them off nothing here
//! runs, and with any on the agent's start-up does not wait for the API. No failure here ever
//! blocks a credential answer: the API is only called from tasks of this module, each call with
//! a deadline (the pod view's watch, a long stream, on a client of its own).

mod client;
pub mod events;
#[cfg(test)]
mod fake;
pub mod pod_view;
pub mod taint;

use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

pub use client::{
    ApiErrors, ClientError, DeadlineExceeded, Deadlined, KubeApi, Operation, client, client_from,
    infer, status_code,
};

use crate::config::{KubernetesConfig, PodViewMode};
use crate::listener::Readiness;
use crate::metrics::Metrics;
use events::{EventInbox, EventRecorder, PodNames};
use pod_view::PodView;
use pod_view::reflect::ViewMetrics;

/// The component name on the Events the agent posts (`source.component`, `reportingComponent`).
pub const COMPONENT: &str = "eks-pod-identity-agent";

/// The Kubernetes features, set up before the endpoint (which needs the Events and pod view
/// handles) and started once the server is assembled.
pub struct Kubernetes {
    config: KubernetesConfig,
    node_name: Option<String>,
    metrics: Metrics,
    inbox: Option<EventInbox>,
    pod_view: Option<PodView>,
}

/// What the request path gets of the Kubernetes features.
#[derive(Default)]
pub struct Handles {
    /// `--pod-events`.
    pub events: Option<EventRecorder>,
    /// `--pod-view`: empty until the task has listed the node's pods.
    pub pod_view: Option<PodView>,
}

impl Kubernetes {
    /// `None` when every feature is off: then nothing of this module runs.
    pub fn new(
        config: &KubernetesConfig,
        node_name: Option<String>,
        metrics: &Metrics,
    ) -> Option<(Kubernetes, Handles)> {
        if !config.enabled() {
            return None;
        }
        let (recorder, inbox) = if config.pod_events {
            let (recorder, inbox) = events::channel(config.event_queue, metrics);
            (Some(recorder), Some(inbox))
        } else {
            (None, None)
        };
        let pod_view = match (config.pod_view.mode, &node_name) {
            (PodViewMode::Off, _) => None,
            (_, Some(_)) => Some(PodView::new()),
            (PodViewMode::Auto, None) => None,
            (PodViewMode::On, None) => {
                tracing::error!(
                    "--pod-view on needs this node's name (--node-name or NODE_NAME): audit records carry no pod names"
                );
                None
            }
        };
        let kubernetes = Kubernetes {
            config: config.clone(),
            node_name,
            metrics: metrics.clone(),
            inbox,
            pod_view: pod_view.clone(),
        };
        Some((
            kubernetes,
            Handles {
                events: recorder,
                pod_view,
            },
        ))
    }

    /// Makes the client, then removes the startup taint once `readiness` holds, posts Events and
    /// keeps the pod view until `shutdown`. A client that cannot be made is logged and counted
    /// (unless only the pod view's `auto` wanted it), and the agent serves on without these
    /// features.
    pub async fn run(self, readiness: Readiness, names: PodNames, shutdown: CancellationToken) {
        let errors = ApiErrors::new(&self.metrics.kubernetes_api_errors);
        // 0 from the start: an agent that cannot remove the taint shows it (and alerts).
        let removed = self.config.startup_taint.as_ref().map(|key| {
            let removed = self.metrics.startup_taint_removed.with_label_values(&[key]);
            removed.set(0);
            removed
        });
        let kube_config = tokio::select! {
            () = shutdown.cancelled() => return,
            kube_config = infer() => kube_config,
        };
        let clients = kube_config.and_then(|mut kube_config| {
            let api = client_from(&mut kube_config, &self.config)?;
            let watch = match &self.pod_view {
                Some(_) => Some(pod_view::watch::client(kube_config, &self.config)?),
                None => None,
            };
            Ok((
                Deadlined {
                    api,
                    deadline: self.config.call_timeout,
                },
                watch,
            ))
        });
        let (client, watch_client) = match clients {
            Ok(clients) => clients,
            Err(e) if !self.config.required() => {
                tracing::info!(reason = %crate::error_chain(&e), "pod view: no Kubernetes API; audit records carry no pod names");
                return;
            }
            Err(e) => {
                errors.count(Operation::Client);
                tracing::error!(error = %crate::error_chain(&e), "no Kubernetes API: the startup taint stays, no Events are posted and audit records carry no pod names");
                return;
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        if let (Some(view), Some(watch_client), Some(node)) =
            (self.pod_view, watch_client, self.node_name.clone())
        {
            tasks.spawn(pod_view::watch::run(
                watch_client,
                node,
                self.config.clone(),
                view,
                ViewMetrics::new(&self.metrics),
                shutdown.clone(),
            ));
        }
        if let (Some(key), Some(removed)) = (self.config.startup_taint.clone(), removed) {
            match self.node_name.clone() {
                Some(node) => {
                    tasks.spawn(taint::remove_when_ready(
                        client.clone(),
                        taint::Removal {
                            node,
                            key,
                            backoff: self.config.retry_backoff,
                        },
                        readiness,
                        TaintMetrics {
                            removed,
                            errors: errors.clone(),
                        },
                        shutdown.clone(),
                    ));
                }
                None => tracing::error!(
                    "--remove-startup-taint needs this node's name (--node-name or NODE_NAME): the taint stays"
                ),
            }
        }
        if let Some(inbox) = self.inbox {
            tasks.spawn(events::run(
                client,
                inbox,
                events::Reporter {
                    host: self.node_name.unwrap_or_default(),
                },
                names,
                self.config.retry_backoff,
                errors,
                shutdown,
            ));
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// What the taint removal reports.
#[derive(Clone)]
pub struct TaintMetrics {
    /// `pod_identity_startup_taint_removed{key}`.
    pub removed: IntGauge,
    pub errors: ApiErrors,
}

#[cfg(test)]
mod tests {
    /// The in-cluster shape: https to the API server's service address, its CA given. Building the
    /// client sets up rustls with the one crypto provider linked in (aws-lc-rs).
    #[tokio::test]
    async fn an_https_client_builds_with_a_given_ca() {
        let mut config = kube::Config::new("https://10.100.0.1:443".parse().unwrap());
        config.root_cert = Some(vec![CA_DER.to_vec()]);
        config.auth_info.token = Some("token".to_owned().into());
        kube::Client::try_from(config).unwrap();
        let native = kube::Config::new("https://10.100.0.1:443".parse().unwrap());
        kube::Client::try_from(native).unwrap();
    }

    /// A hung call ends at its deadline, as an error the callers count.
    #[tokio::test(start_paused = true)]
    async fn a_hung_call_ends_at_its_deadline() {
        use super::{DeadlineExceeded, Deadlined, KubeApi};
        let api = super::fake::FakeApi::with_node("n", vec![]);
        api.state().hang = true;
        let deadline = std::time::Duration::from_secs(10);
        let deadlined = Deadlined {
            api: api.clone(),
            deadline,
        };
        let started = tokio::time::Instant::now();
        let e = deadlined.get_node("n").await.unwrap_err();
        assert_eq!(started.elapsed(), deadline);
        assert!(
            matches!(&e, kube::Error::Service(inner) if inner.is::<DeadlineExceeded>()),
            "{e:?}"
        );
        api.state().hang = false;
        assert!(deadlined.get_node("n").await.is_ok());
    }

    /// kube-rs's own retry of 429, 503 and 504 is off in the agent's client.
    #[tokio::test]
    async fn the_client_has_no_built_in_retry() {
        let mut kube_config = kube::Config::new("https://10.100.0.1:443".parse().unwrap());
        assert!(kube_config.default_retry, "kube-rs's default");
        let config = crate::config::KubernetesConfig {
            startup_taint: None,
            pod_events: true,
            call_timeout: std::time::Duration::from_secs(10),
            retry_backoff: crate::backoff::Backoff::new(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(30),
            ),
            event_queue: 8,
            pod_view: crate::config::PodViewConfig {
                mode: crate::config::PodViewMode::Off,
                capacity: 440,
                watch_timeout: std::time::Duration::from_secs(290),
            },
        };
        super::client_from(&mut kube_config, &config).unwrap();
        assert!(!kube_config.default_retry);
        assert_eq!(kube_config.read_timeout, Some(config.call_timeout));
    }

    /// A self-signed CA certificate (DER), only parsed.
    const CA_DER: &[u8] = include_bytes!("testdata/ca.der");
}
