//! What the pod view keeps of a pod ([`PodInfo`]), and the slim shape a watched pod is read into
//! ([`WatchedPod`]): its metadata, its service account and its containers' statuses. The rest of
//! a pod's JSON (spec, volumes, conditions, `managedFields` once the metadata is read) is skipped
//! as it is parsed or dropped with the event, so the view holds a few hundred bytes a pod.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// The prefix of the annotations the view keeps (the agent's own; a pod's other annotations,
/// `kubectl.kubernetes.io/last-applied-configuration` among them, can be hundreds of KiB).
pub const ANNOTATION_PREFIX: &str = "eks-pod-identity-agent.amazonaws.com/";
/// The annotation that lists, comma-separated, the containers of the pod that may receive its
/// credentials (per-container scoping; [`crate::attribution::scope`] decides).
pub const CONTAINERS_ANNOTATION: &str = "eks-pod-identity-agent.amazonaws.com/containers";
/// The longest list of containers read: 64 names of up to 63 bytes, and commas.
const MAX_CONTAINERS_ANNOTATION_BYTES: usize = 64 * 64;
/// Most annotations kept per pod, and the longest value kept (longer ones are left out).
const MAX_ANNOTATIONS: usize = 8;
const MAX_ANNOTATION_BYTES: usize = 1024;
/// Most containers kept per pod (containers, init and ephemeral containers together).
const MAX_CONTAINERS: usize = 64;

/// A pod of this node as the API server has it: the names a caller placed in it by the kernel
/// goes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// `spec.serviceAccountName` (`default` when the pod names none).
    pub service_account: Arc<str>,
    /// The pod's annotations under [`ANNOTATION_PREFIX`], in key order.
    pub annotations: Vec<(String, String)>,
    /// Every container the kubelet has started (containers, init and ephemeral ones), by the
    /// runtime's id as the container's cgroup names it.
    pub containers: Vec<Container>,
    /// The containers that may receive the pod's credentials ([`CONTAINERS_ANNOTATION`]); `None`
    /// when the pod does not have the annotation (every container may).
    pub allowed_containers: Option<AllowedContainers>,
}

#[cfg(test)]
impl PodInfo {
    /// The pod `shop/cart` (service account `cart`) with containers `app` and `istio-proxy` of
    /// these runtime ids, and the containers annotation when given (unit tests of scoping).
    pub(crate) fn app_and_sidecar(app: &str, sidecar: &str, annotation: Option<&str>) -> Self {
        PodInfo {
            namespace: "shop".into(),
            name: "cart".into(),
            service_account: "cart".into(),
            annotations: Vec::new(),
            containers: vec![
                Container {
                    id: app.into(),
                    name: "app".into(),
                },
                Container {
                    id: sidecar.into(),
                    name: "istio-proxy".into(),
                },
            ],
            allowed_containers: annotation.map(AllowedContainers::parse),
        }
    }
}

/// The pod's [`CONTAINERS_ANNOTATION`], read once when the pod is watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedContainers {
    /// The container names listed (an empty annotation lists none).
    Listed(Arc<[Arc<str>]>),
    /// A value too long to be a list of container names: no container is allowed (the pod
    /// asked for scoping; failing open would hand its credentials to every container).
    Unreadable,
}

impl AllowedContainers {
    /// The annotation's value, read: names separated by commas, spaces around them ignored.
    pub fn parse(value: &str) -> Self {
        if value.len() > MAX_CONTAINERS_ANNOTATION_BYTES {
            return AllowedContainers::Unreadable;
        }
        AllowedContainers::Listed(
            value
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(Arc::from)
                .collect(),
        )
    }

    /// Whether the container named `name` is allowed.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            AllowedContainers::Listed(names) => names.iter().any(|n| **n == *name),
            AllowedContainers::Unreadable => false,
        }
    }
}

/// One container of a pod: the runtime's id (`containerd://<id>` without the scheme) and the name
/// in the pod's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: Arc<str>,
}

impl PodInfo {
    /// The name of the container with the runtime's id `id`.
    pub fn container_name(&self, id: &str) -> Option<&Arc<str>> {
        self.containers.iter().find(|c| c.id == id).map(|c| &c.name)
    }
}

/// What a watched pod means for the view.
#[derive(Debug, PartialEq, Eq)]
pub enum Update {
    /// A pod whose containers may run: kept under its UID.
    Keep(Arc<str>, PodInfo),
    /// A pod whose containers have all ended (`Succeeded`, `Failed`): nothing of it can call
    /// any more, so it leaves the view.
    Finished(Arc<str>),
    /// No UID, name or namespace: nothing to key or name it by.
    Unusable,
}

impl Update {
    pub fn of(pod: &WatchedPod) -> Update {
        let meta = &pod.metadata;
        let (Some(uid), Some(name), Some(namespace)) = (&meta.uid, &meta.name, &meta.namespace)
        else {
            return Update::Unusable;
        };
        let uid: Arc<str> = Arc::from(uid.as_str());
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return Update::Finished(uid);
        }
        let containers = status
            .into_iter()
            .flat_map(|s| {
                [
                    &s.container_statuses,
                    &s.init_container_statuses,
                    &s.ephemeral_container_statuses,
                ]
            })
            .flatten()
            .flatten()
            .filter_map(|c| {
                Some(Container {
                    id: runtime_id(c.container_id.as_deref()?)?.to_owned(),
                    name: Arc::from(c.name.as_str()),
                })
            })
            .take(MAX_CONTAINERS)
            .collect();
        let annotations = meta
            .annotations
            .iter()
            .flatten()
            .filter(|(k, v)| k.starts_with(ANNOTATION_PREFIX) && v.len() <= MAX_ANNOTATION_BYTES)
            .take(MAX_ANNOTATIONS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let allowed_containers = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(CONTAINERS_ANNOTATION))
            .map(|value| AllowedContainers::parse(value));
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        Update::Keep(
            uid,
            PodInfo {
                namespace: Arc::from(namespace.as_str()),
                name: Arc::from(name.as_str()),
                service_account: Arc::from(service_account),
                annotations,
                containers,
                allowed_containers,
            },
        )
    }
}

/// The runtime's id in a status's `containerID` (`containerd://<id>`, `cri-o://<id>`,
/// `docker://<id>`): what the container's cgroup scope is named after. Empty (a container not
/// started yet) is none.
fn runtime_id(container_id: &str) -> Option<&str> {
    let (_, id) = container_id.split_once("://")?;
    (!id.is_empty()).then_some(id)
}

/// A pod as the watch reads it: only the fields the view keeps (serde skips the others).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct WatchedPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<WatchedSpec>,
    #[serde(default)]
    pub status: Option<WatchedStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub container_statuses: Option<Vec<WatchedContainer>>,
    #[serde(default)]
    pub init_container_statuses: Option<Vec<WatchedContainer>>,
    #[serde(default)]
    pub ephemeral_container_statuses: Option<Vec<WatchedContainer>>,
}

/// A container's status: its name and, once started, the runtime's id.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct WatchedContainer {
    pub name: String,
    #[serde(default, rename = "containerID")]
    pub container_id: Option<String>,
}

/// The core API's `pods`, read as [`WatchedPod`] (kube-rs derives `Api<WatchedPod>`'s paths from
/// these).
impl k8s_openapi::Resource for WatchedPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for WatchedPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
