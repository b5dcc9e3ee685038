//! Who is calling, from the kernel, and what follows from it: token binding and per-pod limits.
//!
//! At accept, the eBPF record of the connection (the process that called `connect()`) is taken
//! and its cgroup resolved to a pod. Per request, the token's claims are compared with that
//! pod ([`Binding`]) and the pod's request rate is checked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::cgroup::{CgroupInfo, CgroupResolver};
use crate::config::{RateLimit, TokenBinding};
use crate::credentials::cache::{Entry, KeepPredicate};
use crate::ebpf::{self, Callers};
use crate::token::Claims;

/// What the agent knows of the peer of a connection.
#[derive(Debug, Clone)]
pub struct Caller {
    pub peer: SocketAddr,
    /// The process that connected, when the eBPF programs recorded it.
    pub process: Option<ebpf::Caller>,
    /// Its cgroup, and the pod and container parsed from the cgroup's path.
    pub cgroup: Option<Arc<CgroupInfo>>,
}

impl Caller {
    /// A caller known only by its address.
    pub fn unattributed(peer: SocketAddr) -> Self {
        Caller {
            peer,
            process: None,
            cgroup: None,
        }
    }

    /// The pod UID the kernel attributes the connection to.
    pub fn pod_uid(&self) -> Option<&str> {
        Some(self.cgroup.as_ref()?.pod.as_ref()?.pod_uid.as_str())
    }
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

/// The attribution policy and its kernel sources.
pub struct Attribution {
    callers: Option<Callers>,
    resolver: Option<Arc<CgroupResolver>>,
    binding: TokenBinding,
    node_name: Option<String>,
    pod_limit: Option<DefaultKeyedRateLimiter<String>>,
    /// Pod UID → namespace, learned from tokens whose pod the kernel confirmed: labels kernel
    /// counters, which know only cgroups.
    namespaces: RwLock<HashMap<String, Arc<str>>>,
}

/// Most pods whose namespace is remembered; past it the memory starts afresh.
const MAX_REMEMBERED_PODS: usize = 10_000;

impl Attribution {
    /// `callers` and `resolver` are `None` when the eBPF programs are not attached.
    pub fn new(
        callers: Option<Callers>,
        resolver: Option<Arc<CgroupResolver>>,
        binding: TokenBinding,
        node_name: Option<String>,
        pod_request: RateLimit,
    ) -> Self {
        let pod_limit = NonZeroU32::new(pod_request.per_second).map(|rate| {
            let burst = NonZeroU32::new(pod_request.burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Attribution {
            callers,
            resolver,
            binding,
            node_name,
            pod_limit,
            namespaces: RwLock::new(HashMap::new()),
        }
    }

    /// Nothing from the kernel, no binding, no limits.
    pub fn off() -> Self {
        Attribution::new(
            None,
            None,
            TokenBinding::Off,
            None,
            RateLimit {
                per_second: 0,
                burst: 0,
            },
        )
    }

    pub fn is_attached(&self) -> bool {
        self.callers.is_some()
    }

    /// The caller of an accepted connection: takes the kernel's record of it and resolves its
    /// cgroup. A cgroup not seen before means walking the cgroup tree: done on the blocking pool.
    pub async fn identify(&self, peer: SocketAddr, local: SocketAddr) -> Caller {
        let process = self.callers.as_ref().and_then(|c| c.take(peer, local));
        let cgroup = match (&process, &self.resolver) {
            (Some(p), Some(resolver)) => match resolver.cached(p.cgroup_id) {
                Some(info) => Some(info),
                None => {
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
        if let Some(namespace) = claims.namespace() {
            self.remember_namespace(caller_pod, namespace);
        }
        Binding::Match
    }

    fn remember_namespace(&self, pod_uid: &str, namespace: &str) {
        // Known already on every request but a pod's first: a shared read, no exclusive lock.
        let is_known =
            |map: &HashMap<String, Arc<str>>| map.get(pod_uid).is_some_and(|ns| &**ns == namespace);
        if self.namespaces.read().is_ok_and(|map| is_known(&map)) {
            return;
        }
        let Ok(mut known) = self.namespaces.write() else {
            return;
        };
        if known.len() >= MAX_REMEMBERED_PODS {
            known.clear();
        }
        known.insert(pod_uid.to_owned(), Arc::from(namespace));
    }

    /// The namespace of the pod a cgroup belongs to, when a request from it has shown it.
    pub fn namespace_of_cgroup(&self, cgroup_id: u64) -> Option<Arc<str>> {
        let info = self.resolver.as_ref()?.resolve(cgroup_id)?;
        let pod = info.pod.as_ref()?;
        self.namespaces.read().ok()?.get(&pod.pod_uid).cloned()
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

    /// Takes one request from the pod's allowance; `Err` says when to retry.
    pub fn check_pod_rate(&self, caller: &Caller, claims: &Claims) -> Result<(), Duration> {
        let Some(limit) = &self.pod_limit else {
            return Ok(());
        };
        // The kernel's word first; the token's claim only for callers it could not attribute.
        let Some(pod) = caller.pod_uid().or(claims.pod_uid()) else {
            return Ok(());
        };
        limit
            .check_key(&pod.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
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
mod tests {
    use super::*;
    use crate::cgroup::{PodCgroup, Qos};
    use crate::token::{KubernetesClaims, NamedObject};

    const POD: &str = "0b5e3c2a-1111-4222-8333-444455556666";

    fn claims(pod_uid: Option<&str>, node: Option<&str>) -> Claims {
        Claims {
            exp: i64::MAX,
            kubernetes: Some(KubernetesClaims {
                namespace: Some("shop".into()),
                pod: pod_uid.map(|uid| NamedObject {
                    name: Some("cart".into()),
                    uid: Some(uid.into()),
                }),
                node: node.map(|n| NamedObject {
                    name: Some(n.into()),
                    uid: None,
                }),
                ..KubernetesClaims::default()
            }),
            ..Claims::default()
        }
    }

    fn caller(pod_uid: Option<&str>, recorded: bool) -> Caller {
        Caller {
            peer: "169.254.200.1:40000".parse().unwrap(),
            process: recorded.then(|| ebpf::Caller {
                cgroup_id: 7,
                pid: 100,
                tid: 100,
                uid: 0,
                comm: "python3".into(),
                netns_cookie: 1,
            }),
            cgroup: Some(Arc::new(CgroupInfo {
                id: 7,
                path: "/kubepods.slice/x".into(),
                pod: pod_uid.map(|uid| PodCgroup {
                    pod_uid: uid.into(),
                    container_id: None,
                    qos: Qos::Burstable,
                }),
            })),
        }
    }

    fn policy(binding: TokenBinding, node: Option<&str>) -> Attribution {
        Attribution::new(
            None,
            None,
            binding,
            node.map(str::to_owned),
            RateLimit {
                per_second: 0,
                burst: 0,
            },
        )
    }

    #[test]
    fn binding_results() {
        let a = policy(TokenBinding::Enforce, Some("node-a"));
        assert_eq!(
            a.bind(&claims(Some(POD), Some("node-a")), &caller(Some(POD), true)),
            Binding::Match
        );
        assert_eq!(
            a.bind(&claims(Some(POD), None), &caller(Some(POD), true)),
            Binding::Match
        );
        let other = a.bind(&claims(Some("other-pod"), None), &caller(Some(POD), true));
        assert!(
            matches!(&other, Binding::Mismatch(r) if r.contains("other-pod")),
            "{other:?}"
        );
        assert!(a.refusal(&other).is_some_and(|r| r.contains("other-pod")));
        let node = a.bind(&claims(Some(POD), Some("node-b")), &caller(Some(POD), true));
        assert!(
            matches!(&node, Binding::Mismatch(r) if r.contains("node-b")),
            "{node:?}"
        );
        assert!(matches!(
            a.bind(&claims(None, None), &caller(Some(POD), true)),
            Binding::Mismatch(_)
        ));
        let outside = a.bind(&claims(Some(POD), None), &caller(None, true));
        assert!(matches!(outside, Binding::Unattributed(_)));
        assert!(a.refusal(&outside).is_some());
        assert!(matches!(
            a.bind(&claims(Some(POD), None), &caller(Some(POD), false)),
            Binding::Unattributed(_)
        ));
        assert_eq!(a.refusal(&Binding::Match), None);
    }

    #[test]
    fn audit_mode_records_but_never_refuses() {
        let a = policy(TokenBinding::Audit, None);
        let b = a.bind(&claims(Some("other"), None), &caller(Some(POD), true));
        assert_eq!(b.as_str(), "mismatch");
        assert_eq!(a.refusal(&b), None);
        let off = policy(TokenBinding::Off, None);
        assert_eq!(
            off.bind(&claims(Some("other"), None), &caller(Some(POD), true)),
            Binding::Off
        );
    }

    #[test]
    fn pod_rate_is_per_pod() {
        let a = Attribution::new(
            None,
            None,
            TokenBinding::Audit,
            None,
            RateLimit {
                per_second: 1,
                burst: 2,
            },
        );
        let c = claims(Some(POD), None);
        let me = caller(Some(POD), true);
        assert!(a.check_pod_rate(&me, &c).is_ok());
        assert!(a.check_pod_rate(&me, &c).is_ok());
        let wait = a.check_pod_rate(&me, &c).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        let neighbour = caller(Some("another-pod"), true);
        assert!(
            a.check_pod_rate(&neighbour, &claims(Some("another-pod"), None))
                .is_ok()
        );
    }
}
