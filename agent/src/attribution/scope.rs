//! Per-container scoping: whether the container the kernel placed a caller in may receive its
//! pod's credentials ([`Scope`]). The pod lists the containers that may in its annotation
//! `eks-pod-identity-agent.amazonaws.com/containers` (read by the pod view into
//! [`AllowedContainers`]); the container's name is the pod view's, for the runtime id in the
//! caller's cgroup. Plain data and a comparison: [`super::Attribution::refuses`] applies the
//! policy (`--token-binding`).
//!
//! A pod the view does not know, or one without the annotation, is unscoped: behaviour as before.
//! A pod the view knew with the annotation stays scoped while the API server is away (the view
//! keeps its last state), so scoping fails closed for the pods that asked for it.

use std::sync::Arc;

use crate::kubernetes::pod_view::{AllowedContainers, PodInfo};

use super::Caller;

/// Where a caller stands under its pod's container list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Scope {
    /// The pod lists no containers, or the pod view does not know it: every container may.
    #[default]
    Unscoped,
    /// The caller's container is listed.
    Listed(Arc<str>),
    /// The caller is not in a listed container: another container (named), or a process of the
    /// pod in no container (`None`).
    Unlisted(Option<Arc<str>>),
    /// The caller's container is not in the pod's status as the view has it yet (started after
    /// the view's last update of the pod): its name, and so its place, is not known yet.
    Pending,
}

impl Scope {
    /// The caller's place under the list of `pod`, the view's pod with the caller's pod UID.
    pub fn of(pod: Option<&PodInfo>, caller: &Caller) -> Scope {
        let Some((pod, allowed)) = pod.and_then(|p| Some((p, p.allowed_containers.as_ref()?)))
        else {
            return Scope::Unscoped;
        };
        let container_id = caller
            .cgroup
            .as_ref()
            .and_then(|c| c.pod.as_ref())
            .and_then(|p| p.container_id.as_deref());
        let Some(id) = container_id else {
            return Scope::Unlisted(None);
        };
        match pod.container_name(id) {
            Some(name) if allowed.allows(name) => Scope::Listed(name.clone()),
            Some(name) => Scope::Unlisted(Some(name.clone())),
            None => Scope::Pending,
        }
    }

    /// `listed`, `unlisted`, `pending` or `unscoped`: the metric's label and the audit record's
    /// `pod.container_scope`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Unscoped => "unscoped",
            Scope::Listed(_) => "listed",
            Scope::Unlisted(_) => "unlisted",
            Scope::Pending => "pending",
        }
    }

    /// Why the caller may not have the credentials, in words (for the response and the record).
    pub fn reason(&self, allowed: Option<&AllowedContainers>) -> Option<String> {
        let listed = match allowed {
            Some(AllowedContainers::Listed(names)) if names.is_empty() => "none".to_owned(),
            Some(AllowedContainers::Listed(names)) => names.join(", "),
            Some(AllowedContainers::Unreadable) | None => {
                "none (the list is unreadable)".to_owned()
            }
        };
        match self {
            Scope::Unscoped | Scope::Listed(_) => None,
            Scope::Unlisted(Some(name)) => Some(format!(
                "container {name} may not receive this pod's credentials (the pod's containers annotation lists: {listed})"
            )),
            Scope::Unlisted(None) => Some(format!(
                "the caller is in no container of the pod (the pod's containers annotation lists: {listed})"
            )),
            Scope::Pending => Some(
                "the caller's container is not in the pod's status yet: retry shortly".to_owned(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{CgroupInfo, PodCgroup, Qos};

    const APP: &str = "4f1c0e7d9a2b";
    const SIDECAR: &str = "63fc2f5ea961";

    fn pod(annotation: Option<&str>) -> PodInfo {
        PodInfo::app_and_sidecar(APP, SIDECAR, annotation)
    }

    /// A process the kernel placed in the container `id` of the pod (`None`: in the pod's own
    /// cgroup, in no container).
    fn caller_in(id: Option<&str>) -> Caller {
        let mut caller = Caller::in_test_pod("p");
        caller.cgroup = Some(Arc::new(CgroupInfo {
            id: 9,
            path: "/kubepods.slice/pod.slice".into(),
            pod: Some(PodCgroup {
                pod_uid: Arc::from("p"),
                container_id: id.map(str::to_owned),
                qos: Qos::Burstable,
            }),
        }));
        caller
    }

    #[test]
    fn the_annotation_lists_names_separated_by_commas() {
        assert_eq!(
            AllowedContainers::parse(" app , worker,,"),
            AllowedContainers::Listed(Arc::from([Arc::from("app"), Arc::from("worker")]))
        );
        assert_eq!(
            AllowedContainers::parse(""),
            AllowedContainers::Listed(Arc::from([]))
        );
        let long = "a,".repeat(3000);
        assert_eq!(
            AllowedContainers::parse(&long),
            AllowedContainers::Unreadable
        );
        assert!(!AllowedContainers::Unreadable.allows("a"));
    }

    #[test]
    fn only_listed_containers_of_a_pod_that_lists_containers_are_listed() {
        let scoped = pod(Some("app"));
        assert_eq!(
            Scope::of(Some(&scoped), &caller_in(Some(APP))),
            Scope::Listed("app".into())
        );
        assert_eq!(
            Scope::of(Some(&scoped), &caller_in(Some(SIDECAR))),
            Scope::Unlisted(Some("istio-proxy".into()))
        );
        assert_eq!(
            Scope::of(Some(&scoped), &caller_in(None)),
            Scope::Unlisted(None)
        );
        assert_eq!(
            Scope::of(Some(&scoped), &caller_in(Some("5e6f70819a2b"))),
            Scope::Pending
        );
        // A pod that lists none, an empty list, an unreadable one, a pod the view lacks.
        assert_eq!(
            Scope::of(Some(&pod(None)), &caller_in(Some(SIDECAR))),
            Scope::Unscoped
        );
        assert_eq!(
            Scope::of(Some(&pod(Some(""))), &caller_in(Some(APP))),
            Scope::Unlisted(Some("app".into()))
        );
        let unreadable = pod(Some(&"a,".repeat(3000)));
        assert_eq!(
            Scope::of(Some(&unreadable), &caller_in(Some(APP))),
            Scope::Unlisted(Some("app".into()))
        );
        assert_eq!(Scope::of(None, &caller_in(Some(SIDECAR))), Scope::Unscoped);
    }

    #[test]
    fn the_reason_names_the_container_and_the_list() {
        let scoped = pod(Some("app, worker"));
        let reason = Scope::Unlisted(Some("istio-proxy".into()))
            .reason(scoped.allowed_containers.as_ref())
            .unwrap();
        assert!(reason.contains("container istio-proxy"), "{reason}");
        assert!(reason.ends_with("lists: app, worker)"), "{reason}");
        assert_eq!(
            Scope::Listed("app".into()).reason(scoped.allowed_containers.as_ref()),
            None
        );
    }
}
