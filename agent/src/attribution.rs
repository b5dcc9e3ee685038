//! Who is calling, from the kernel, and what follows from it: token binding and per-pod limits.
//!
//! At accept, the eBPF record of the connection (the process that called `connect()`) is taken
//! and its cgroup resolved to a pod; the pod's open connections are capped. Per request, the
//! pod's request rate is checked, and the token's claims are compared with that pod
//! ([`Binding`]).
//!
//! Every per-pod limit is keyed by the pod the kernel saw ([`PodKey`]), never by what the token
//! claims: a client cannot pick whose allowance it spends. Callers the kernel cannot place in a
//! pod all share one allowance.
//!
//! Parts: `caller` (what the agent knows of a peer, and whose allowance it spends), `open` (the
//! per-pod cap on open connections), `scope` (which of a pod's containers may have its
//! credentials), `tests`.

mod caller;
mod open;
pub mod scope;

pub use caller::{Caller, PodKey};
use open::{ConnectionSlot, OpenConnections};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus::IntCounter;

use crate::cgroup::{Cached, CgroupResolver};
use crate::config::{RateLimit, TokenBinding};
use crate::credentials::cache::{Entry, KeepPredicate};
use crate::ebpf::Callers;
use crate::kubernetes::pod_view::PodView;
use crate::limiter::KeyedLimiter;
use crate::token::Claims;

/// Most pods with a request allowance in memory. Far above any node's pod count; past it (only
/// under churn faster than pruning) new pods share the allowance of callers in no pod.
const MAX_LIMITED_PODS: usize = 10_000;

/// An accepted connection: its caller, and the slot it holds among its pod's open connections.
pub struct Connection {
    pub caller: Caller,
    _slot: Option<ConnectionSlot>,
}

/// The result of comparing a token with its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// The token's pod (and node) are the caller's.
    Match,
    /// The token names another pod or node.
    Mismatch(String),
    /// The kernel could not say which pod is calling.
    Unattributed(String),
    /// Binding is off.
    Off,
}

impl Binding {
    pub fn as_str(&self) -> &'static str {
        match self {
            Binding::Match => "match",
            Binding::Mismatch(_) => "mismatch",
            Binding::Unattributed(_) => "unattributed",
            Binding::Off => "off",
        }
    }
}

/// The attribution policy: plain data.
#[derive(Debug, Clone)]
pub struct Policy {
    pub binding: TokenBinding,
    /// This node's name, compared with the token's node claim.
    pub node_name: Option<String>,
    /// Requests per second and burst per pod (rate 0: off).
    pub pod_request: RateLimit,
    /// Most connections a pod holds open at once (0: no cap).
    pub pod_max_connections: u32,
}

impl Policy {
    /// No binding, no per-pod limits.
    pub fn off() -> Self {
        Policy {
            binding: TokenBinding::Off,
            node_name: None,
            pod_request: RateLimit {
                per_second: 0,
                burst: 0,
            },
            pod_max_connections: 0,
        }
    }
}

/// The attribution policy and its kernel sources.
pub struct Attribution {
    callers: Option<Callers>,
    resolver: Option<Arc<CgroupResolver>>,
    binding: TokenBinding,
    node_name: Option<String>,
    pod_limit: Option<KeyedLimiter<PodKey>>,
    open: Option<Arc<OpenConnections>>,
    /// Connections closed at once because their pod held its maximum.
    connections_refused: IntCounter,
    /// Pod UID → namespace, as EKS Auth verified it for a token whose pod the kernel confirmed: labels kernel
    /// counters, which know only cgroups.
    namespaces: RwLock<HashMap<Arc<str>, Arc<str>>>,
}

/// Most pods whose namespace is remembered; past it the memory starts afresh.
const MAX_REMEMBERED_PODS: usize = 10_000;

impl Attribution {
    /// `callers` and `resolver` are `None` when the eBPF programs are not attached; every caller
    /// is then unplaced (and shares one allowance under per-pod limits).
    pub fn new(
        callers: Option<Callers>,
        resolver: Option<Arc<CgroupResolver>>,
        policy: Policy,
        connections_refused: IntCounter,
    ) -> Self {
        let pod_limit = KeyedLimiter::new(policy.pod_request);
        let open = (policy.pod_max_connections > 0).then(|| {
            Arc::new(OpenConnections {
                limit: policy.pod_max_connections as usize,
                by_pod: Mutex::new(HashMap::new()),
            })
        });
        Attribution {
            callers,
            resolver,
            binding: policy.binding,
            node_name: policy.node_name,
            pod_limit,
            open,
            connections_refused,
            namespaces: RwLock::new(HashMap::new()),
        }
    }

    /// Nothing from the kernel, no binding, no limits.
    #[cfg(test)]
    pub fn off() -> Self {
        let counter = IntCounter::new("unregistered", "unregistered").unwrap();
        Attribution::new(None, None, Policy::off(), counter)
    }

    /// An accepted connection: who made it, and whether its pod may hold one more. `None`: the
    /// pod holds its maximum of open connections already; close this one at once.
    ///
    /// A connection the kernel left unrecorded (its 4-tuple taken from another namespace, a map
    /// full) takes no slot: it is kept, so that its request is answered and audited with the
    /// reason (`no kernel record of the connection`, 403 under `enforce`) rather than closed in
    /// silence behind whoever fills the unplaced callers' slots. The kernel's own caps bound how
    /// many there can be, and the listener's connection cap and header timeout how long they stay.
    pub async fn attribute(&self, peer: SocketAddr, local: SocketAddr) -> Option<Connection> {
        let caller = self.identify(peer, local).await;
        let unrecorded = self.callers.is_some() && caller.process.is_none();
        let slot = match &self.open {
            Some(_) if unrecorded => None,
            Some(open) => match OpenConnections::take(open, caller.pod_key()) {
                Some(slot) => Some(slot),
                None => {
                    self.connections_refused.inc();
                    tracing::debug!(%peer, pod_uid = caller.pod_uid(), "the pod holds its maximum of open connections; closing a new one");
                    return None;
                }
            },
            None => None,
        };
        Some(Connection {
            caller,
            _slot: slot,
        })
    }

    /// The caller of an accepted connection: looks up the kernel's record of it and resolves its
    /// cgroup. A cgroup not seen before means walking the cgroup tree: done on the blocking pool,
    /// and without holding up callers whose cgroup is known.
    pub async fn identify(&self, peer: SocketAddr, local: SocketAddr) -> Caller {
        let process = self.callers.as_ref().and_then(|c| c.lookup(peer, local));
        let cgroup = match (&process, &self.resolver) {
            (Some(p), Some(resolver)) => match resolver.cached(p.cgroup_id) {
                Cached::Known(info) => Some(info),
                Cached::Missing => None,
                Cached::Unknown => {
                    let (resolver, id) = (resolver.clone(), p.cgroup_id);
                    tokio::task::spawn_blocking(move || resolver.resolve(id))
                        .await
                        .ok()
                        .flatten()
                }
            },
            _ => None,
        };
        Caller {
            peer,
            process,
            cgroup,
        }
    }

    /// Compares the token's pod and node claims with what the kernel says of the caller.
    pub fn bind(&self, claims: &Claims, caller: &Caller) -> Binding {
        if self.binding == TokenBinding::Off {
            return Binding::Off;
        }
        if caller.process.is_none() {
            return Binding::Unattributed("no kernel record of the connection".into());
        }
        if caller.cgroup.is_none() {
            return Binding::Unattributed("the caller's cgroup was not found".into());
        }
        let Some(caller_pod) = caller.pod_uid() else {
            return Binding::Unattributed("the caller is not in a pod's cgroup".into());
        };
        match claims.pod_uid() {
            None => return Binding::Mismatch("the token names no pod".into()),
            Some(token_pod) if token_pod != caller_pod => {
                return Binding::Mismatch(format!(
                    "the token is for pod {token_pod}, the caller is pod {caller_pod}"
                ));
            }
            Some(_) => {}
        }
        if let (Some(node), Some(token_node)) = (&self.node_name, claims.node_name())
            && node != token_node
        {
            return Binding::Mismatch(format!(
                "the token is for node {token_node}, this is node {node}"
            ));
        }
        Binding::Match
    }

    /// Remembers the namespace of the caller's pod, for the kernel counters' `namespace` label.
    /// Only a namespace EKS Auth verified for a token the kernel tied to this pod: a token's own
    /// claims are unverified, and a pod forging namespaces would fill the label set.
    pub fn learn_verified_namespace(&self, caller: &Caller, namespace: &str) {
        if namespace.is_empty() {
            return;
        }
        if let PodKey::Pod(pod) = caller.pod_key() {
            self.remember_namespace(pod, namespace);
        }
    }

    fn remember_namespace(&self, pod_uid: Arc<str>, namespace: &str) {
        // Known already on every request but a pod's first: a shared read, no exclusive lock.
        let is_known = |map: &HashMap<Arc<str>, Arc<str>>| {
            map.get(&pod_uid).is_some_and(|ns| &**ns == namespace)
        };
        if self.namespaces.read().is_ok_and(|map| is_known(&map)) {
            return;
        }
        let Ok(mut known) = self.namespaces.write() else {
            return;
        };
        if known.len() >= MAX_REMEMBERED_PODS {
            known.clear();
        }
        known.insert(pod_uid, Arc::from(namespace));
    }

    /// The namespace of the pod a cgroup belongs to: as `view` (the API server) has the pod, else
    /// as EKS Auth verified it for a request from the pod. May walk the cgroup tree: blocking, for
    /// background work.
    pub fn namespace_of_cgroup(&self, cgroup_id: u64, view: Option<&PodView>) -> Option<Arc<str>> {
        let info = self.resolver.as_ref()?.resolve(cgroup_id)?;
        let pod = info.pod.as_ref()?;
        if let Some(viewed) = view.and_then(|v| v.get(&pod.pod_uid)) {
            return Some(viewed.namespace.clone());
        }
        self.namespaces.read().ok()?.get(&pod.pod_uid).cloned()
    }

    /// Whether the cgroup with this id exists now (a pod's, or any below the attach point); what
    /// the kernel's per-pod state is pruned by. May walk the cgroup tree: blocking, for background
    /// work. False without the kernel programs.
    pub fn cgroup_exists(&self, cgroup_id: u64) -> bool {
        self.resolver
            .as_ref()
            .is_some_and(|r| r.resolve(cgroup_id).is_some() && r.is_alive(cgroup_id))
    }

    /// Why a request with this binding result is refused, if it is (only under `enforce`).
    pub fn refusal(&self, binding: &Binding) -> Option<String> {
        match binding {
            Binding::Mismatch(reason) | Binding::Unattributed(reason)
                if self.binding == TokenBinding::Enforce =>
            {
                Some(reason.clone())
            }
            _ => None,
        }
    }

    /// Whether a caller in this place under its pod's list of containers is refused: only under
    /// `enforce`, and only a pod that lists containers (`audit` records the place, no more).
    pub fn refuses(&self, scope: &scope::Scope) -> bool {
        self.binding == TokenBinding::Enforce
            && matches!(scope, scope::Scope::Unlisted(_) | scope::Scope::Pending)
    }

    /// Takes one request from the allowance of the caller's pod (as the kernel placed it; all
    /// unplaced callers share one); `Err` says when to retry.
    pub fn check_pod_rate(&self, caller: &Caller) -> Result<(), Duration> {
        let Some(limit) = &self.pod_limit else {
            return Ok(());
        };
        let mut key = caller.pod_key();
        if limit.len() >= MAX_LIMITED_PODS {
            key = PodKey::Unplaced;
        }
        limit.check(&key)
    }

    /// Forgets the request allowances of pods idle long enough to have refilled them: call it
    /// now and then, off the request path.
    pub fn prune(&self) {
        if let Some(limit) = &self.pod_limit {
            limit.prune();
        }
    }

    /// Keeps renewing a cached entry only while the cgroup it was last served to exists.
    pub fn keep_predicate(&self) -> Option<KeepPredicate> {
        let resolver = self.resolver.clone()?;
        Some(Arc::new(move |entry: &Entry| {
            entry.owner_cgroup().is_none_or(|id| resolver.is_alive(id))
        }))
    }
}

#[cfg(test)]
mod tests;
