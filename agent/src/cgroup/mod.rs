//! From a cgroup id (what eBPF records) to the cgroup's path and, for cgroups kubelet made, the pod
//! and container. Userspace only; no policy.
//!
//! The parts: [`layout`] says where kubelet puts pods and reads a pod and container from a path;
//! [`tree`] reads the cgroup2 hierarchy (walks by directory entry, ids by inode); [`resolver`]
//! caches ids to paths and pods, and walks the tree on a miss. This file holds what they share:
//! what a resolved cgroup is. The modules call nothing outside `std` and each other.
//!
//! **Where a pod can be.** Only where kubelet puts pods ([`KubeletLayout`]): its `kubepods`
//! hierarchy directly under the attach point (`--cgroup-root`), or under kubelet's own
//! `--cgroup-root` below it. Only root can create cgroups there. A kubelet-shaped path anywhere
//! else — a user's delegated subtree (`/user.slice/…/kubepods/burstable/pod<uid>/x`), or
//! `kubepods` nested inside a container's cgroup — names no pod. Cgroups a container nests below
//! its own container cgroup still belong to that container.
//!
//! **Resolving ids.** A cgroup v2 id is the inode number of its directory, and ids are not reused
//! while the machine runs, so an id's path never changes: it is cached. An id not seen yet means
//! walking the tree below the attach point (directory entries only: the inode and the type come
//! from `getdents`, no `stat` per entry). Walks are serialised among themselves and coalesced
//! (one walk answers every miss that arrived before it started) but never hold the lock the
//! cached path takes. Ids a fresh walk did not find are remembered for a while (bounded), so a
//! storm of connections from vanished cgroups costs one walk, not one each.

mod layout;
mod resolver;
mod tree;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use layout::{KubeletLayout, pod_parent_dirs};
pub use resolver::{Cached, CgroupResolver};
pub use tree::{Cgroup2Tree, CgroupTree, path_under_mount};

/// The pod `QoS` class kubelet files a pod's cgroup under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A kubelet-made cgroup: a pod's, or one of its containers' (or a cgroup nested below those).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodCgroup {
    /// The pod's UID, with dashes (`metadata.uid`).
    pub pod_uid: Arc<str>,
    /// The container runtime's id (64 hex) for a container cgroup; `None` at the pod level and
    /// for a runtime's helper (CRI-O's `conmon`).
    pub container_id: Option<String>,
    pub qos: Qos,
}

/// A cgroup, resolved from its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupInfo {
    pub id: u64,
    /// Relative to the cgroup2 mount root, with a leading slash (`/kubepods.slice/...`).
    pub path: String,
    /// The pod and container, if kubelet made this cgroup (see [`KubeletLayout`]).
    pub pod: Option<PodCgroup>,
}
