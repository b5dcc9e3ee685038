//! The Kubernetes client and the seam the features call through: making the client
//! ([`client`], [`infer`], [`client_from`]), the calls the agent makes ([`KubeApi`]), a deadline on
//! each ([`Deadlined`]), and the errors counted by operation ([`ApiErrors`]). Calls nothing else of
//! the crate but its config and metrics.

use std::future::Future;

use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};
use prometheus::{IntCounter, IntCounterVec};

use crate::config::KubernetesConfig;

/// Why the Kubernetes client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no Kubernetes configuration (neither KUBECONFIG, ~/.kube/config nor in-cluster)")]
    Config(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// The client, configured as kube-rs infers it, with the agent's deadlines and without kube-rs's
/// own retry of 429, 503 and 504 (on by default: up to 15 tries backing off to 1000 s, so one
/// call could outlive its deadline by minutes, uncounted). The callers retry, with their backoff.
pub async fn client(config: &KubernetesConfig) -> Result<Deadlined<kube::Client>, ClientError> {
    let mut kube_config = infer().await?;
    Ok(Deadlined {
        api: client_from(&mut kube_config, config)?,
        deadline: config.call_timeout,
    })
}

/// The configuration every Kubernetes client infers (`KUBECONFIG`, `~/.kube/config`, in-cluster).
pub async fn infer() -> Result<kube::Config, ClientError> {
    kube::Config::infer().await.map_err(ClientError::Config)
}

/// `kube_config` with the agent's timeouts and no built-in retry, made a client.
pub fn client_from(
    kube_config: &mut kube::Config,
    config: &KubernetesConfig,
) -> Result<kube::Client, ClientError> {
    kube_config.default_retry = false;
    kube_config.connect_timeout = Some(config.call_timeout);
    kube_config.read_timeout = Some(config.call_timeout);
    kube_config.write_timeout = Some(config.call_timeout);
    kube::Client::try_from(kube_config.clone()).map_err(ClientError::Client)
}

/// The API calls of `api`, each ended at `deadline` whatever the server does (the per-read
/// timeouts alone let an answer dripping in slowly run on).
#[derive(Clone)]
pub struct Deadlined<A> {
    pub api: A,
    pub deadline: std::time::Duration,
}

/// A call that did not end by its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the Kubernetes API call did not end within {0:?}")]
pub struct DeadlineExceeded(pub std::time::Duration);

impl<A: KubeApi> Deadlined<A> {
    async fn within<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        tokio::time::timeout(self.deadline, call)
            .await
            .unwrap_or_else(|_| {
                Err(kube::Error::Service(Box::new(DeadlineExceeded(
                    self.deadline,
                ))))
            })
    }
}

impl<A: KubeApi> KubeApi for Deadlined<A> {
    async fn get_node(&self, name: &str) -> Result<Node, kube::Error> {
        self.within(self.api.get_node(name)).await
    }

    async fn patch_node(&self, name: &str, patch: &serde_json::Value) -> Result<Node, kube::Error> {
        self.within(self.api.patch_node(name, patch)).await
    }

    async fn create_event(&self, namespace: &str, event: &Event) -> Result<Event, kube::Error> {
        self.within(self.api.create_event(namespace, event)).await
    }

    async fn patch_event(
        &self,
        namespace: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<Event, kube::Error> {
        self.within(self.api.patch_event(namespace, name, patch))
            .await
    }
}

/// The API calls the agent makes: the seam unit tests fake.
pub trait KubeApi: Clone + Send + Sync + 'static {
    fn get_node(&self, name: &str) -> impl Future<Output = Result<Node, kube::Error>> + Send;
    /// A JSON merge patch (`application/merge-patch+json`).
    fn patch_node(
        &self,
        name: &str,
        patch: &serde_json::Value,
    ) -> impl Future<Output = Result<Node, kube::Error>> + Send;
    fn create_event(
        &self,
        namespace: &str,
        event: &Event,
    ) -> impl Future<Output = Result<Event, kube::Error>> + Send;
    /// A strategic merge patch, as the kubelet's recorder sends.
    fn patch_event(
        &self,
        namespace: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> impl Future<Output = Result<Event, kube::Error>> + Send;
}

impl KubeApi for kube::Client {
    async fn get_node(&self, name: &str) -> Result<Node, kube::Error> {
        Api::<Node>::all(self.clone()).get(name).await
    }

    async fn patch_node(&self, name: &str, patch: &serde_json::Value) -> Result<Node, kube::Error> {
        Api::<Node>::all(self.clone())
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
    }

    async fn create_event(&self, namespace: &str, event: &Event) -> Result<Event, kube::Error> {
        Api::<Event>::namespaced(self.clone(), namespace)
            .create(&PostParams::default(), event)
            .await
    }

    async fn patch_event(
        &self,
        namespace: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<Event, kube::Error> {
        Api::<Event>::namespaced(self.clone(), namespace)
            .patch(name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
    }
}

/// The API call that failed, as `pod_identity_kubernetes_api_errors_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Making the client (no configuration, a bad kubeconfig).
    Client,
    GetNode,
    PatchNode,
    CreateEvent,
    PatchEvent,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Client => "client",
            Operation::GetNode => "get_node",
            Operation::PatchNode => "patch_node",
            Operation::CreateEvent => "create_event",
            Operation::PatchEvent => "patch_event",
        }
    }
}

/// The counters of API errors, one handle per operation, resolved once.
#[derive(Clone)]
pub struct ApiErrors {
    client: IntCounter,
    get_node: IntCounter,
    patch_node: IntCounter,
    create_event: IntCounter,
    patch_event: IntCounter,
}

impl ApiErrors {
    pub fn new(errors: &IntCounterVec) -> Self {
        let handle = |op: Operation| errors.with_label_values(&[op.as_str()]);
        ApiErrors {
            client: handle(Operation::Client),
            get_node: handle(Operation::GetNode),
            patch_node: handle(Operation::PatchNode),
            create_event: handle(Operation::CreateEvent),
            patch_event: handle(Operation::PatchEvent),
        }
    }

    pub fn count(&self, op: Operation) {
        match op {
            Operation::Client => &self.client,
            Operation::GetNode => &self.get_node,
            Operation::PatchNode => &self.patch_node,
            Operation::CreateEvent => &self.create_event,
            Operation::PatchEvent => &self.patch_event,
        }
        .inc();
    }
}

/// The API's status code of an error, when it answered with one.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}
