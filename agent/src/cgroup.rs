//! From a cgroup id (what eBPF records) to the cgroup's path and, for kubelet-made cgroups, the pod
//! and container. Userspace only; no policy.
//!
//! A cgroup v2 id is the inode number of its directory under the cgroup2 mount, and ids are not
//! reused while the machine runs, so an id's path never changes: it is cached, and the tree is
//! walked again only for an id not seen yet.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

/// How deep under the mount root the walk looks. Kubelet containers sit at depth 3–5 (deeper with
/// a `--cgroup-root` or nested runtimes); the bound keeps a pathological tree from stalling a miss.
const MAX_WALK_DEPTH: usize = 12;

/// The pod `QoS` class kubelet files a pod's cgroup under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A kubelet-made cgroup: a pod's, or one of its containers'.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodCgroup {
    /// The pod's UID, with dashes (`metadata.uid`).
    pub pod_uid: String,
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
    /// The pod and container, if kubelet made this cgroup.
    pub pod: Option<PodCgroup>,
}

/// Parse a kubelet cgroup path, with either cgroup driver, under any prefix:
///
/// - systemd: `.../kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<runtime>-<id>.scope`,
///   Guaranteed pods as `.../kubepods.slice/kubepods-pod<uid_>.slice/...` (UID with `_` for `-`);
/// - cgroupfs: `.../kubepods/<qos>/pod<uid>/<id>`, Guaranteed pods as `.../kubepods/pod<uid>/<id>`.
#[must_use]
pub fn parse_kubelet_path(path: &str) -> Option<PodCgroup> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    parts.iter().enumerate().find_map(|(i, part)| {
        let rest = &parts[i + 1..];
        if *part == "kubepods" {
            parse_cgroupfs(rest)
        } else {
            // `kubepods.slice`, or `<parent>-kubepods.slice` under a kubelet `--cgroup-root`.
            let prefix = part.strip_suffix(".slice")?;
            (prefix == "kubepods" || prefix.ends_with("-kubepods"))
                .then(|| parse_systemd(prefix, rest))
                .flatten()
        }
    })
}

/// `rest` follows `<prefix>.slice`; every slice below repeats its parent's name as a prefix.
fn parse_systemd(prefix: &str, rest: &[&str]) -> Option<PodCgroup> {
    let slice = |name: &str| -> Option<String> {
        Some(
            name.strip_prefix(prefix)?
                .strip_prefix('-')?
                .strip_suffix(".slice")?
                .to_owned(),
        )
    };
    let first = slice(rest.first()?)?;
    let (qos, pod, container) = match first.strip_prefix("pod") {
        Some(uid) => (Qos::Guaranteed, uid.to_owned(), rest.get(1)),
        None => {
            let qos = qos_named(&first)?;
            let pod = slice(rest.get(1)?)?;
            let uid = pod.strip_prefix(&first)?.strip_prefix("-pod")?.to_owned();
            (qos, uid, rest.get(2))
        }
    };
    let pod_uid = pod_uid(&pod.replace('_', "-"))?;
    let container_id = container
        .and_then(|c| c.strip_suffix(".scope"))
        .and_then(container_id);
    Some(PodCgroup {
        pod_uid,
        container_id,
        qos,
    })
}

fn parse_cgroupfs(rest: &[&str]) -> Option<PodCgroup> {
    let first = rest.first()?;
    let (qos, pod, container) = match first.strip_prefix("pod") {
        Some(uid) => (Qos::Guaranteed, uid, rest.get(1)),
        None => (
            qos_named(first)?,
            rest.get(1)?.strip_prefix("pod")?,
            rest.get(2),
        ),
    };
    Some(PodCgroup {
        pod_uid: pod_uid(pod)?,
        container_id: container.and_then(|c| container_id(c)),
        qos,
    })
}

fn qos_named(name: &str) -> Option<Qos> {
    match name {
        "burstable" => Some(Qos::Burstable),
        "besteffort" => Some(Qos::BestEffort),
        _ => None,
    }
}

/// A pod UID as kubelet writes it: a UUID, or a 32-hex hash for static pods.
fn pod_uid(uid: &str) -> Option<String> {
    let ok = !uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then(|| uid.to_owned())
}

/// `<runtime>-<id>` (systemd scope name without `.scope`, or cgroupfs with CRI-O) or a bare id.
fn container_id(name: &str) -> Option<String> {
    // CRI-O's monitor process lives beside the container, in no container.
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = ["cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|runtime| name.strip_prefix(runtime))
        .unwrap_or(name);
    let ok = !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit());
    ok.then(|| id.to_owned())
}

/// Resolves cgroup ids to paths under the cgroup2 mount, with a cache. `Send + Sync`.
///
/// A miss walks the tree under the mount root (blocking I/O: call it off the async executor when
/// the tree is large), refreshing the whole index and dropping cgroups that no longer exist.
pub struct CgroupResolver {
    mount_root: PathBuf,
    state: Mutex<ResolverState>,
}

#[derive(Default)]
struct ResolverState {
    /// Every cgroup found by the last walk: id → path relative to the mount root.
    paths: HashMap<u64, String>,
    /// Ids already asked for, parsed once.
    infos: HashMap<u64, Arc<CgroupInfo>>,
}

impl CgroupResolver {
    /// A resolver for the cgroup2 hierarchy mounted at `mount_root`. Does no I/O.
    #[must_use]
    pub fn new(mount_root: PathBuf) -> Self {
        CgroupResolver {
            mount_root,
            state: Mutex::new(ResolverState::default()),
        }
    }

    /// The cgroup with this id if it was resolved before: no I/O, for the async path.
    pub fn cached(&self, id: u64) -> Option<Arc<CgroupInfo>> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.infos.get(&id).cloned()
    }

    /// The cgroup with this id, or `None` if no directory under the mount root has it (any more).
    pub fn resolve(&self, id: u64) -> Option<Arc<CgroupInfo>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(info) = state.infos.get(&id) {
            return Some(Arc::clone(info));
        }
        if !state.paths.contains_key(&id) {
            // The walk is done under the lock so that concurrent misses don't walk in parallel.
            state.paths = walk(&self.mount_root);
            let ResolverState { paths, infos } = &mut *state;
            infos.retain(|id, _| paths.contains_key(id));
        }
        let path = state.paths.get(&id)?.clone();
        let info = Arc::new(CgroupInfo {
            id,
            pod: parse_kubelet_path(&path),
            path,
        });
        state.infos.insert(id, Arc::clone(&info));
        Some(info)
    }

    /// Whether the cgroup this id resolved to still exists (its path still has that inode).
    /// An id never resolved is not known to be alive.
    pub fn is_alive(&self, id: u64) -> bool {
        let path = {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            match state.paths.get(&id) {
                Some(path) => path.clone(),
                None => return false,
            }
        };
        inode_of(&self.mount_root.join(path.trim_start_matches('/'))) == Some(id)
    }
}

fn inode_of(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Every directory under `root` (and `root` itself, as `/`), by inode number.
fn walk(root: &Path) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    if let Some(ino) = inode_of(root) {
        found.insert(ino, "/".to_owned());
    }
    let mut stack = vec![(root.to_path_buf(), String::new(), 0)];
    while let Some((dir, rel, depth)) = stack.pop() {
        // Cgroups come and go during the walk: an unreadable directory is skipped, not an error.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() {
                continue;
            }
            let child_rel = format!("{rel}/{}", entry.file_name().to_string_lossy());
            found.insert(meta.ino(), child_rel.clone());
            if depth + 1 < MAX_WALK_DEPTH {
                stack.push((entry.path(), child_rel, depth + 1));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const UID: &str = "6f8e4c2a-1b3d-4e5f-9a7b-0c1d2e3f4a5b";
    const UID_: &str = "6f8e4c2a_1b3d_4e5f_9a7b_0c1d2e3f4a5b";
    const CID: &str = "3f2b8c1d9e0a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";

    fn pod(qos: Qos, container: Option<&str>) -> Option<PodCgroup> {
        Some(PodCgroup {
            pod_uid: UID.to_owned(),
            container_id: container.map(str::to_owned),
            qos,
        })
    }

    #[test]
    fn systemd_driver_containers() {
        let burstable = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            parse_kubelet_path(&burstable),
            pod(Qos::Burstable, Some(CID))
        );
        let besteffort = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"
        );
        assert_eq!(
            parse_kubelet_path(&besteffort),
            pod(Qos::BestEffort, Some(CID))
        );
        let guaranteed = format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope");
        assert_eq!(
            parse_kubelet_path(&guaranteed),
            pod(Qos::Guaranteed, Some(CID))
        );
    }

    #[test]
    fn systemd_driver_pod_level_and_conmon_have_no_container() {
        let pod_level =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        assert_eq!(parse_kubelet_path(&pod_level), pod(Qos::Burstable, None));
        let conmon = format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope");
        assert_eq!(parse_kubelet_path(&conmon), pod(Qos::Guaranteed, None));
    }

    #[test]
    fn systemd_driver_under_any_prefix_and_cgroup_root() {
        let nested = format!(
            "/ebpf-test-123/pod-a/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse_kubelet_path(&nested), pod(Qos::BestEffort, Some(CID)));
        // kind and other `--cgroup-root=/kubelet` setups.
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse_kubelet_path(&kind), pod(Qos::Burstable, Some(CID)));
    }

    #[test]
    fn cgroupfs_driver() {
        let burstable = format!("/kubepods/burstable/pod{UID}/{CID}");
        assert_eq!(
            parse_kubelet_path(&burstable),
            pod(Qos::Burstable, Some(CID))
        );
        let besteffort = format!("/sys/fs/cgroup/kubepods/besteffort/pod{UID}/{CID}");
        assert_eq!(
            parse_kubelet_path(&besteffort),
            pod(Qos::BestEffort, Some(CID))
        );
        let guaranteed = format!("/kubepods/pod{UID}/{CID}");
        assert_eq!(
            parse_kubelet_path(&guaranteed),
            pod(Qos::Guaranteed, Some(CID))
        );
        let crio = format!("/kubepods/pod{UID}/crio-{CID}");
        assert_eq!(parse_kubelet_path(&crio), pod(Qos::Guaranteed, Some(CID)));
        let pod_level = format!("/kubepods/besteffort/pod{UID}");
        assert_eq!(parse_kubelet_path(&pod_level), pod(Qos::BestEffort, None));
    }

    #[test]
    fn static_pod_uids_are_hashes() {
        let path = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b3a7e1f4c2d9e8a6b5c4d3e2f1a0b9c.slice";
        let parsed = parse_kubelet_path(path).map(|p| p.pod_uid);
        assert_eq!(parsed.as_deref(), Some("0b3a7e1f4c2d9e8a6b5c4d3e2f1a0b9c"));
    }

    #[test]
    fn non_pod_paths() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/system.slice/kubelet.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/init.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable",
            "/kubepods",
            "/kubepods.slice/kubepods-guaranteed.slice/kubepods-guaranteed-podabc.slice",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod1234.slice",
        ] {
            assert_eq!(parse_kubelet_path(path), None, "{path}");
        }
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempTree(PathBuf);

    impl TempTree {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("cgroup-resolver-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempTree(dir)
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn resolves_directories_by_inode_and_sees_them_die() {
        let tree = TempTree::new();
        let pod_dir = format!("kubepods/burstable/pod{UID}");
        let container = tree.0.join(&pod_dir).join(CID);
        std::fs::create_dir_all(&container).unwrap();
        let resolver = CgroupResolver::new(tree.0.clone());

        let id = inode_of(&container).unwrap();
        let info = resolver.resolve(id).unwrap();
        assert_eq!(info.id, id);
        assert_eq!(info.path, format!("/{pod_dir}/{CID}"));
        assert_eq!(info.pod, pod(Qos::Burstable, Some(CID)));
        assert!(resolver.is_alive(id));

        // Created after the first walk: a miss walks again.
        let late = tree.0.join("system.slice");
        std::fs::create_dir(&late).unwrap();
        let late_info = resolver.resolve(inode_of(&late).unwrap()).unwrap();
        assert_eq!(
            (late_info.path.as_str(), &late_info.pod),
            ("/system.slice", &None)
        );

        let root = resolver.resolve(inode_of(&tree.0).unwrap()).unwrap();
        assert_eq!(root.path, "/");

        std::fs::remove_dir(&container).unwrap();
        assert!(!resolver.is_alive(id));
        assert!(!resolver.is_alive(u64::MAX));
        assert!(resolver.resolve(u64::MAX).is_none());
    }

    #[test]
    fn resolves_on_the_real_cgroup2_mount() {
        let root = crate::ebpf::cgroup2_mount_root().expect("cgroup2 mounted on this machine");
        // Our own cgroup, from /proc/self/cgroup (the `0::` line is the v2 one).
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line in /proc/self/cgroup");
        let id = inode_of(&root.join(rel.trim_start_matches('/'))).unwrap();
        let resolver = CgroupResolver::new(root);
        let info = resolver.resolve(id).expect("our own cgroup resolves");
        assert_eq!(info.path, rel);
        assert!(resolver.is_alive(id));
    }
}
