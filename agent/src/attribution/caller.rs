//! What the agent knows of the peer of a connection ([`Caller`]: the process the eBPF programs
//! recorded, its cgroup and pod), and whose per-pod allowance it spends ([`PodKey`]): always the
//! pod the kernel placed it in. Plain data, read from [`crate::ebpf`] and [`crate::cgroup`].

use std::net::SocketAddr;
use std::sync::Arc;

use crate::cgroup::CgroupInfo;
#[cfg(test)]
use crate::cgroup::{PodCgroup, Qos};
use crate::ebpf;

/// What the agent knows of the peer of a connection.
#[derive(Debug, Clone)]
pub struct Caller {
    pub peer: SocketAddr,
    /// The process that connected, when the eBPF programs recorded it.
    pub process: Option<ebpf::Caller>,
    /// Its cgroup, and the pod and container parsed from the cgroup's path.
    pub cgroup: Option<Arc<CgroupInfo>>,
}

#[cfg(test)]
impl Caller {
    /// A process the kernel placed in a container of pod `pod` (the request path's unit tests).
    pub(crate) fn in_test_pod(pod: &str) -> Caller {
        Caller {
            peer: SocketAddr::from(([169, 254, 200, 1], 40000)),
            process: Some(ebpf::Caller {
                cgroup_id: 9,
                pid: 42,
                tid: 42,
                uid: 0,
                comm: "python3".into(),
                netns_cookie: 0,
            }),
            cgroup: Some(Arc::new(CgroupInfo {
                id: 9,
                path: "/kubepods.slice/pod.slice/cri-containerd-x.scope".into(),
                pod: Some(PodCgroup {
                    pod_uid: Arc::from(pod),
                    container_id: Some("x".into()),
                    qos: Qos::Burstable,
                }),
            })),
        }
    }
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
        Some(&self.cgroup.as_ref()?.pod.as_ref()?.pod_uid)
    }

    /// Whose allowance this caller spends.
    pub fn pod_key(&self) -> PodKey {
        match self.cgroup.as_ref().and_then(|c| c.pod.as_ref()) {
            Some(pod) => PodKey::Pod(pod.pod_uid.clone()),
            None => PodKey::Unplaced,
        }
    }
}

/// The key of per-pod limits: the pod the kernel placed the caller in, or one key shared by every
/// caller it could not place (no record, a cgroup not found, a cgroup that is not a pod's).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PodKey {
    Pod(Arc<str>),
    Unplaced,
}
