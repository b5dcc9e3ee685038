//! The pods of this node as the API server has them: the names behind the pod UIDs and
//! container ids the kernel reports for each caller.
//!
//! - [`PodView`]: the request path's handle, a snapshot swapped atomically. A lookup is a pointer
//!   load and a hash lookup, and hands back an `Arc`: it never waits for the API, nor for the task
//!   that updates the view.
//! - [`pod`]: what is kept of a pod ([`PodInfo`]: namespace, name, service account, the agent's
//!   own annotations, container id → name), and the slim shape the watch reads pods into.
//! - [`reflect`]: the watcher's events applied to the view. A re-list replaces the view whole
//!   once it is complete (so a pod deleted while the watch was away goes); until then, and
//!   whenever the API server is away, the last view stays.
//! - [`watch`]: the task. kube-rs's watcher (list, then watch from the list's version; resumed
//!   when a watch ends, re-listed on 410 Gone, with kube-rs's default backoff after errors) on
//!   `spec.nodeName=<node>`, on a client of its own whose read timeout outlasts each watch call.
//!
//! Memory is bounded: a few hundred bytes a pod, at most [`crate::config::PodViewConfig::capacity`]
//! pods.

pub mod pod;
pub mod reflect;
pub mod watch;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use pod::{AllowedContainers, CONTAINERS_ANNOTATION, Container, PodInfo, WatchedPod};

/// The pods by UID, as last published.
pub type Pods = HashMap<Arc<str>, Arc<PodInfo>>;

/// The request path's handle on the view. Cheap to clone.
#[derive(Clone, Default)]
pub struct PodView {
    pods: Arc<ArcSwap<Pods>>,
}

impl PodView {
    /// An empty view (the task fills it).
    pub fn new() -> Self {
        PodView::default()
    }

    /// A view holding `pods` (benchmarks and tests; the task fills a running agent's).
    #[doc(hidden)]
    pub fn with_pods(pods: Pods) -> Self {
        let view = PodView::new();
        view.publish(pods);
        view
    }

    /// The pod with this UID, if the view has it.
    pub fn get(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.pods.load().get(uid).cloned()
    }

    /// How many pods the view holds.
    pub fn len(&self) -> usize {
        self.pods.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the view (the task's side).
    fn publish(&self, pods: Pods) {
        self.pods.store(Arc::new(pods));
    }
}

/// The pod the kernel placed a caller in, as the view has it, and whether the token the caller
/// presented agrees. Shared references and a flag: the audit record's names are formatted on the
/// writer thread.
#[derive(Debug, Clone)]
pub struct ViewedPod {
    pub pod: Arc<PodInfo>,
    /// `None`: no token to compare. `Some(false)`: the token's namespace, service account, pod
    /// name or pod UID is not this pod's.
    pub token_matches: Option<bool>,
}

impl ViewedPod {
    /// `pod`, the view's pod with the UID `uid` (the kernel's), compared with `claims`.
    pub fn new(pod: Arc<PodInfo>, uid: &str, claims: Option<&crate::token::Claims>) -> ViewedPod {
        let token_matches = claims.map(|c| token_matches(uid, &pod, c));
        ViewedPod { pod, token_matches }
    }
}

/// Whether `claims` name this pod (`uid`): namespace, service account, pod name and UID all
/// agree.
pub fn token_matches(uid: &str, pod: &PodInfo, claims: &crate::token::Claims) -> bool {
    claims.pod_uid() == Some(uid)
        && claims.namespace() == Some(&*pod.namespace)
        && claims.service_account() == Some(&*pod.service_account)
        && claims.pod_name() == Some(&*pod.name)
}
