//! From a cgroup id (what eBPF records) to the cgroup's path and, for cgroups kubelet made, the pod
//! and container. Userspace only; no policy.
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

use std::{
    collections::HashMap,
    os::unix::fs::{DirEntryExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How deep under the attach point the walk looks. Kubelet containers sit at depth 3–5 (deeper
/// with a kubelet `--cgroup-root` or nested cgroups); the bound keeps a pathological tree from
/// stalling a miss.
const MAX_WALK_DEPTH: usize = 12;
/// How long an id that a fresh walk did not find is answered "not found" without walking again.
/// Such an id belonged to a cgroup removed before the walk: it never comes back, so the bound is
/// only on memory.
const MISS_TTL: Duration = Duration::from_secs(10);
/// Most remembered misses; past it expired ones are dropped, and if none has, all of them.
const MAX_MISSES: usize = 4096;

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

/// Where kubelet puts pods on this node: its `kubepods` directories, for both cgroup drivers.
///
/// - systemd driver: `<top>/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<runtime>-<id>.scope`,
///   Guaranteed pods as `<top>/kubepods.slice/kubepods-pod<uid_>.slice/...` (UID with `_` for `-`);
/// - cgroupfs driver: `<top>/kubepods/<qos>/pod<uid>/<id>`, Guaranteed pods as `<top>/kubepods/pod<uid>/<id>`;
///
/// where `<top>` is the attach point, or kubelet's `--cgroup-root` under it (`/custom`: systemd
/// `custom.slice/custom-kubepods.slice`, cgroupfs `custom/kubepods`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletLayout {
    dirs: Vec<KubepodsDir>,
}

/// One `kubepods` directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KubepodsDir {
    /// Relative to the cgroup2 mount, with a leading slash (`/kubepods.slice`, `/custom/kubepods`).
    path: String,
    /// systemd driver: the name every slice below starts with (`kubepods`, `custom-kubepods`);
    /// `None` for cgroupfs.
    systemd_prefix: Option<String>,
}

impl KubeletLayout {
    /// The layout under `attach_root` (the attach point, relative to the cgroup2 mount: `/` for
    /// the mount root), with kubelet's `--cgroup-root` relative to it when kubelet uses one:
    /// `/custom` (as kubelet takes it, for either driver) or `/custom.slice` (systemd's form).
    #[must_use]
    pub fn new(attach_root: &str, kubelet_cgroup_root: Option<&Path>) -> Self {
        let top = attach_root.trim_end_matches('/');
        let mut dirs = vec![
            KubepodsDir {
                path: format!("{top}/kubepods.slice"),
                systemd_prefix: Some("kubepods".into()),
            },
            KubepodsDir {
                path: format!("{top}/kubepods"),
                systemd_prefix: None,
            },
        ];
        let names: Vec<String> = kubelet_cgroup_root
            .into_iter()
            .flat_map(Path::components)
            .filter_map(|c| match c {
                std::path::Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        if names.iter().all(|n| n.ends_with(".slice")) {
            // systemd's own form, e.g. `/kubelet.slice`: the kubepods slice is `<last>-kubepods.slice`.
            if let Some(last) = names.last().and_then(|n| n.strip_suffix(".slice")) {
                dirs.push(KubepodsDir {
                    path: format!("{top}/{}/{last}-kubepods.slice", names.join("/")),
                    systemd_prefix: Some(format!("{last}-kubepods")),
                });
            }
        } else {
            // Kubelet's form, e.g. `/custom`: a slice per level, each named after all the levels
            // above it (systemd escapes `-` in a level's name as `_`), as kubelet converts it.
            let mut slices = Vec::new();
            let mut joined = String::new();
            for name in &names {
                if !joined.is_empty() {
                    joined.push('-');
                }
                joined.push_str(&name.replace('-', "_"));
                slices.push(format!("{joined}.slice"));
            }
            dirs.push(KubepodsDir {
                path: format!("{top}/{}/{joined}-kubepods.slice", slices.join("/")),
                systemd_prefix: Some(format!("{joined}-kubepods")),
            });
            dirs.push(KubepodsDir {
                path: format!("{top}/{}/kubepods", names.join("/")),
                systemd_prefix: None,
            });
        }
        KubeletLayout { dirs }
    }

    /// The pod and container of a cgroup path (relative to the cgroup2 mount), if it lies in one
    /// of kubelet's `kubepods` hierarchies.
    #[must_use]
    pub fn parse(&self, path: &str) -> Option<PodCgroup> {
        self.dirs.iter().find_map(|dir| {
            let rest = path.strip_prefix(dir.path.as_str())?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
            match &dir.systemd_prefix {
                Some(prefix) => parse_systemd(prefix, &parts),
                None => parse_cgroupfs(&parts),
            }
        })
    }

    /// The directories whose children are pods, absolute under `mount_root`, deepest first: the
    /// burstable and besteffort `QoS` directories of each `kubepods` hierarchy, then the
    /// `kubepods` directories themselves (whose children are Guaranteed pods, and the two `QoS`
    /// directories, which the kernel matches first). Whether each exists is not checked.
    #[must_use]
    pub fn pod_parent_dirs(&self, mount_root: &Path) -> Vec<PathBuf> {
        let qos_dirs = self.dirs.iter().flat_map(|dir| {
            ["burstable", "besteffort"].map(|qos| match &dir.systemd_prefix {
                Some(prefix) => format!("{}/{prefix}-{qos}.slice", dir.path),
                None => format!("{}/{qos}", dir.path),
            })
        });
        let kubepods = self.dirs.iter().map(|dir| dir.path.clone());
        qos_dirs
            .chain(kubepods)
            .map(|rel| mount_root.join(rel.trim_start_matches('/')))
            .collect()
    }
}

/// [`KubeletLayout::pod_parent_dirs`]: what the kernel side charges per pod.
#[must_use]
pub fn pod_parent_dirs(layout: &KubeletLayout, mount_root: &Path) -> Vec<PathBuf> {
    layout.pod_parent_dirs(mount_root)
}

/// `dir`'s path relative to the cgroup2 mount at `mount_root`, with a leading slash (`/` for the
/// mount itself); `None` when it is not below it (symlinks resolved).
#[must_use]
pub fn path_under_mount(mount_root: &Path, dir: &Path) -> Option<String> {
    let mount = mount_root.canonicalize().ok()?;
    let dir = dir.canonicalize().ok()?;
    let rel = dir.strip_prefix(&mount).ok()?;
    Some(format!("/{}", rel.to_string_lossy()))
}

/// `parts` follow `<prefix>.slice`; every slice below repeats its parent's name as a prefix.
fn parse_systemd(prefix: &str, parts: &[&str]) -> Option<PodCgroup> {
    let slice = |name: &str| -> Option<String> {
        Some(
            name.strip_prefix(prefix)?
                .strip_prefix('-')?
                .strip_suffix(".slice")?
                .to_owned(),
        )
    };
    let first = slice(parts.first()?)?;
    let (qos, pod, container) = match first.strip_prefix("pod") {
        Some(uid) => (Qos::Guaranteed, uid.to_owned(), parts.get(1)),
        None => {
            let qos = qos_named(&first)?;
            let pod = slice(parts.get(1)?)?;
            let uid = pod.strip_prefix(&first)?.strip_prefix("-pod")?.to_owned();
            (qos, uid, parts.get(2))
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

/// `parts` follow `kubepods`.
fn parse_cgroupfs(parts: &[&str]) -> Option<PodCgroup> {
    let first = parts.first()?;
    let (qos, pod, container) = match first.strip_prefix("pod") {
        Some(uid) => (Qos::Guaranteed, uid, parts.get(1)),
        None => (
            qos_named(first)?,
            parts.get(1)?.strip_prefix("pod")?,
            parts.get(2),
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
fn pod_uid(uid: &str) -> Option<Arc<str>> {
    let ok = !uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then(|| Arc::from(uid))
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

/// The cgroup tree the resolver reads: the real cgroup2 mount, or a fake one in tests.
pub trait CgroupTree: Send + Sync {
    /// Every cgroup below the attach point (itself included): id → path relative to the mount.
    fn walk(&self) -> HashMap<u64, String>;
    /// The id of the cgroup at `path` (relative to the mount) now, if it exists.
    fn id_of(&self, path: &str) -> Option<u64>;
}

/// The cgroup2 hierarchy mounted at `mount_root`, walked from `scope` (the attach point relative
/// to the mount: every cgroup the programs record is below it).
pub struct Cgroup2Tree {
    pub mount_root: PathBuf,
    pub scope: String,
}

impl CgroupTree for Cgroup2Tree {
    fn walk(&self) -> HashMap<u64, String> {
        walk(&self.mount_root, &self.scope)
    }

    fn id_of(&self, path: &str) -> Option<u64> {
        inode_of(&self.mount_root.join(path.trim_start_matches('/')))
    }
}

/// What the resolver knows of an id without walking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Known(Arc<CgroupInfo>),
    /// A recent walk did not find it.
    Missing,
    /// Not seen yet: [`CgroupResolver::resolve`] walks.
    Unknown,
}

/// Resolves cgroup ids to paths and pods, with a cache. `Send + Sync`.
pub struct CgroupResolver {
    tree: Box<dyn CgroupTree>,
    layout: KubeletLayout,
    miss_ttl: Duration,
    /// Taken briefly, never across I/O: the accept path reads it.
    state: RwLock<ResolverState>,
    /// Serialises walks; only misses (on the blocking pool) wait on it.
    walking: Mutex<()>,
    /// Walks started so far: a miss that arrived before a walk started is answered by it.
    walks: AtomicU64,
}

#[derive(Default)]
struct ResolverState {
    /// Every cgroup found by the last walk: id → path relative to the mount root.
    paths: HashMap<u64, String>,
    /// Ids already asked for, parsed once.
    infos: HashMap<u64, Arc<CgroupInfo>>,
    /// Ids a walk started after they were asked for did not find, and when.
    misses: HashMap<u64, Instant>,
}

impl CgroupResolver {
    /// A resolver for the cgroup2 hierarchy mounted at `mount_root`, walking from the attach
    /// point `scope` (relative to the mount), recognising pods by `layout`. Does no I/O.
    #[must_use]
    pub fn new(mount_root: PathBuf, scope: String, layout: KubeletLayout) -> Self {
        Self::with_tree(
            Box::new(Cgroup2Tree { mount_root, scope }),
            layout,
            MISS_TTL,
        )
    }

    /// A resolver over any tree (tests pass a fake one).
    #[must_use]
    pub fn with_tree(tree: Box<dyn CgroupTree>, layout: KubeletLayout, miss_ttl: Duration) -> Self {
        CgroupResolver {
            tree,
            layout,
            miss_ttl,
            state: RwLock::new(ResolverState::default()),
            walking: Mutex::new(()),
            walks: AtomicU64::new(0),
        }
    }

    /// What is known of this id without I/O: for the async path.
    pub fn cached(&self, id: u64) -> Cached {
        let path = {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(info) = state.infos.get(&id) {
                return Cached::Known(Arc::clone(info));
            }
            if state
                .misses
                .get(&id)
                .is_some_and(|at| at.elapsed() < self.miss_ttl)
            {
                return Cached::Missing;
            }
            match state.paths.get(&id) {
                Some(path) => path.clone(),
                None => return Cached::Unknown,
            }
        };
        let info = Arc::new(CgroupInfo {
            id,
            pod: self.layout.parse(&path),
            path,
        });
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        Cached::Known(Arc::clone(state.infos.entry(id).or_insert(info)))
    }

    /// The cgroup with this id, or `None` if no cgroup below the attach point has it (any more).
    /// May walk the tree: blocking I/O, call it off the async executor.
    pub fn resolve(&self, id: u64) -> Option<Arc<CgroupInfo>> {
        let arrived = self.walks.load(Ordering::SeqCst);
        match self.cached(id) {
            Cached::Known(info) => return Some(info),
            Cached::Missing => return None,
            Cached::Unknown => {}
        }
        {
            let _walking = self.walking.lock().unwrap_or_else(PoisonError::into_inner);
            // A walk started since this miss arrived saw every cgroup that existed then.
            if self.walks.load(Ordering::SeqCst) == arrived {
                self.walks.fetch_add(1, Ordering::SeqCst);
                let paths = self.tree.walk();
                let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
                state.infos.retain(|id, _| paths.contains_key(id));
                state.paths = paths;
            }
        }
        match self.cached(id) {
            Cached::Known(info) => Some(info),
            Cached::Missing => None,
            Cached::Unknown => {
                self.remember_miss(id);
                None
            }
        }
    }

    fn remember_miss(&self, id: u64) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if state.misses.len() >= MAX_MISSES {
            let ttl = self.miss_ttl;
            state.misses.retain(|_, at| at.elapsed() < ttl);
            if state.misses.len() >= MAX_MISSES {
                state.misses.clear();
            }
        }
        state.misses.insert(id, Instant::now());
    }

    /// Tree walks so far.
    pub fn walks(&self) -> u64 {
        self.walks.load(Ordering::SeqCst)
    }

    /// Whether the cgroup this id resolved to still exists (its path still has that id).
    /// An id never resolved is not known to be alive.
    pub fn is_alive(&self, id: u64) -> bool {
        let path = {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            match state.paths.get(&id) {
                Some(path) => path.clone(),
                None => return false,
            }
        };
        self.tree.id_of(&path) == Some(id)
    }
}

fn inode_of(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Every directory below `mount_root`/`scope` (and that one itself), by inode number, with its
/// path relative to the mount. The inode and the type come from the directory entries: one
/// `getdents` per directory, no `stat` per entry.
fn walk(mount_root: &Path, scope: &str) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    let top = scope.trim_end_matches('/');
    let start = mount_root.join(top.trim_start_matches('/'));
    if let Some(ino) = inode_of(&start) {
        let rel = if top.is_empty() { "/" } else { top };
        found.insert(ino, rel.to_owned());
    }
    let mut stack = vec![(start, top.to_owned(), 0)];
    while let Some((dir, rel, depth)) = stack.pop() {
        // Cgroups come and go during the walk: an unreadable directory is skipped, not an error.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let child_rel = format!("{rel}/{}", entry.file_name().to_string_lossy());
            found.insert(entry.ino(), child_rel.clone());
            if depth + 1 < MAX_WALK_DEPTH {
                stack.push((entry.path(), child_rel, depth + 1));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::sync::Condvar;
    use std::sync::atomic::AtomicU32;

    use super::*;

    const UID: &str = "6f8e4c2a-1b3d-4e5f-9a7b-0c1d2e3f4a5b";
    const UID_: &str = "6f8e4c2a_1b3d_4e5f_9a7b_0c1d2e3f4a5b";
    const OTHER: &str = "11111111-2222-4333-8444-555555555555";
    const CID: &str = "3f2b8c1d9e0a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";

    fn pod(qos: Qos, container: Option<&str>) -> Option<PodCgroup> {
        Some(PodCgroup {
            pod_uid: Arc::from(UID),
            container_id: container.map(str::to_owned),
            qos,
        })
    }

    /// Kubelet's hierarchy at the top of the cgroup2 mount, as on a production node.
    fn parse(path: &str) -> Option<PodCgroup> {
        KubeletLayout::new("/", None).parse(path)
    }

    #[test]
    fn systemd_driver_containers() {
        let burstable = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse(&burstable), pod(Qos::Burstable, Some(CID)));
        let besteffort = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"
        );
        assert_eq!(parse(&besteffort), pod(Qos::BestEffort, Some(CID)));
        let guaranteed = format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope");
        assert_eq!(parse(&guaranteed), pod(Qos::Guaranteed, Some(CID)));
    }

    #[test]
    fn systemd_driver_pod_level_and_conmon_have_no_container() {
        let pod_level =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        assert_eq!(parse(&pod_level), pod(Qos::Burstable, None));
        let conmon = format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope");
        assert_eq!(parse(&conmon), pod(Qos::Guaranteed, None));
    }

    #[test]
    fn cgroupfs_driver() {
        let burstable = format!("/kubepods/burstable/pod{UID}/{CID}");
        assert_eq!(parse(&burstable), pod(Qos::Burstable, Some(CID)));
        let besteffort = format!("/kubepods/besteffort/pod{UID}/{CID}");
        assert_eq!(parse(&besteffort), pod(Qos::BestEffort, Some(CID)));
        let guaranteed = format!("/kubepods/pod{UID}/{CID}");
        assert_eq!(parse(&guaranteed), pod(Qos::Guaranteed, Some(CID)));
        let crio = format!("/kubepods/pod{UID}/crio-{CID}");
        assert_eq!(parse(&crio), pod(Qos::Guaranteed, Some(CID)));
        let pod_level = format!("/kubepods/besteffort/pod{UID}");
        assert_eq!(parse(&pod_level), pod(Qos::BestEffort, None));
    }

    #[test]
    fn static_pod_uids_are_hashes() {
        let path = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b3a7e1f4c2d9e8a6b5c4d3e2f1a0b9c.slice";
        let parsed = parse(path).map(|p| p.pod_uid);
        assert_eq!(parsed.as_deref(), Some("0b3a7e1f4c2d9e8a6b5c4d3e2f1a0b9c"));
    }

    #[test]
    fn pods_are_only_at_the_top_of_the_attach_point() {
        let layout = KubeletLayout::new("/e2e-1-2", None);
        let systemd = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        let cgroupfs = format!("/kubepods/burstable/pod{UID}/{CID}");
        assert_eq!(
            layout.parse(&format!("/e2e-1-2{systemd}")),
            pod(Qos::BestEffort, Some(CID))
        );
        assert_eq!(
            layout.parse(&format!("/e2e-1-2{cgroupfs}")),
            pod(Qos::Burstable, Some(CID))
        );
        for path in [
            // Outside the attach point, or one level too deep, or a look-alike name.
            systemd.clone(),
            cgroupfs.clone(),
            format!("/e2e-1-2/pod-a{systemd}"),
            format!("/e2e-1-2/system.slice{cgroupfs}"),
            format!("/e2e-1-2x{cgroupfs}"),
            format!("/e2e-1-2/kubepodsx/burstable/pod{UID}/{CID}"),
            format!("/e2e-1-2/kubepods.slicex/kubepods-pod{UID_}.slice"),
        ] {
            assert_eq!(layout.parse(&path), None, "{path}");
        }
    }

    #[test]
    fn kubelet_shaped_paths_in_a_delegated_user_subtree_are_no_pod() {
        let user = "/user.slice/user-1000.slice/user@1000.service/app.slice";
        for path in [
            format!("{user}/kubepods/burstable/pod{UID}/x"),
            format!("{user}/kubepods/pod{UID}/{CID}"),
            format!(
                "{user}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            format!("{user}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice"),
        ] {
            assert_eq!(parse(&path), None, "{path}");
            let custom = KubeletLayout::new("/", Some(Path::new("/kubelet")));
            assert_eq!(custom.parse(&path), None, "{path}");
        }
    }

    #[test]
    fn nested_cgroups_belong_to_their_container_whatever_their_names() {
        // Cgroups a container makes below its own, even kubelet-shaped ones naming another pod.
        for path in [
            format!("/kubepods/burstable/pod{UID}/{CID}/worker/deeper"),
            format!("/kubepods/burstable/pod{UID}/{CID}/kubepods/burstable/pod{OTHER}/x"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope/kubepods.slice/kubepods-pod{}.slice",
                OTHER.replace('-', "_")
            ),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope/init"
            ),
        ] {
            assert_eq!(parse(&path), pod(Qos::Burstable, Some(CID)), "{path}");
        }
    }

    #[test]
    fn a_kubelet_cgroup_root_adds_its_hierarchy() {
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        let cgroupfs = format!("/kubelet/kubepods/pod{UID}/{CID}");
        assert_eq!(parse(&kind), None, "not without the flag");
        assert_eq!(parse(&cgroupfs), None, "not without the flag");
        for flag in ["/kubelet", "kubelet", "/kubelet/", "/kubelet.slice"] {
            let layout = KubeletLayout::new("/", Some(Path::new(flag)));
            assert_eq!(
                layout.parse(&kind),
                pod(Qos::Burstable, Some(CID)),
                "{flag}"
            );
            // The default hierarchy stays recognised.
            assert_eq!(
                layout.parse(&format!("/kubepods/pod{UID}/{CID}")),
                pod(Qos::Guaranteed, Some(CID))
            );
        }
        let layout = KubeletLayout::new("/", Some(Path::new("/kubelet")));
        assert_eq!(layout.parse(&cgroupfs), pod(Qos::Guaranteed, Some(CID)));
        // Two levels, with a dash systemd escapes.
        let layout = KubeletLayout::new("/", Some(Path::new("/a/b-c")));
        let nested =
            format!("/a.slice/a-b_c.slice/a-b_c-kubepods.slice/a-b_c-kubepods-pod{UID_}.slice");
        assert_eq!(layout.parse(&nested), pod(Qos::Guaranteed, None));
        assert_eq!(
            layout.parse(&format!("/a/b-c/kubepods/besteffort/pod{UID}")),
            pod(Qos::BestEffort, None)
        );
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
            assert_eq!(parse(path), None, "{path}");
        }
    }

    #[test]
    fn pod_parents_deepest_first() {
        let layout = KubeletLayout::new("/e2e-1", None);
        let dirs = layout.pod_parent_dirs(Path::new("/sys/fs/cgroup"));
        let expected: Vec<PathBuf> = [
            "/sys/fs/cgroup/e2e-1/kubepods.slice/kubepods-burstable.slice",
            "/sys/fs/cgroup/e2e-1/kubepods.slice/kubepods-besteffort.slice",
            "/sys/fs/cgroup/e2e-1/kubepods/burstable",
            "/sys/fs/cgroup/e2e-1/kubepods/besteffort",
            "/sys/fs/cgroup/e2e-1/kubepods.slice",
            "/sys/fs/cgroup/e2e-1/kubepods",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(dirs, expected);
        let custom = KubeletLayout::new("/", Some(Path::new("/custom")));
        let dirs = pod_parent_dirs(&custom, Path::new("/sys/fs/cgroup"));
        assert_eq!(dirs.len(), 12);
        assert!(dirs.contains(&PathBuf::from(
            "/sys/fs/cgroup/custom.slice/custom-kubepods.slice/custom-kubepods-burstable.slice"
        )));
        assert_eq!(
            dirs.last(),
            Some(&PathBuf::from("/sys/fs/cgroup/custom/kubepods"))
        );
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
        let pod_dir = format!("node/kubepods/burstable/pod{UID}");
        let container = tree.0.join(&pod_dir).join(CID);
        std::fs::create_dir_all(&container).unwrap();
        std::fs::create_dir_all(tree.0.join("elsewhere")).unwrap();
        let layout = KubeletLayout::new("/node", None);
        let resolver = CgroupResolver::new(tree.0.clone(), "/node".into(), layout);

        let id = inode_of(&container).unwrap();
        let info = resolver.resolve(id).unwrap();
        assert_eq!(info.id, id);
        assert_eq!(info.path, format!("/{pod_dir}/{CID}"));
        assert_eq!(info.pod, pod(Qos::Burstable, Some(CID)));
        assert!(resolver.is_alive(id));
        assert_eq!(resolver.cached(id), Cached::Known(info));

        // Created after the first walk: a miss walks again.
        let late = tree.0.join("node/system.slice");
        std::fs::create_dir(&late).unwrap();
        let late_info = resolver.resolve(inode_of(&late).unwrap()).unwrap();
        assert_eq!(
            (late_info.path.as_str(), &late_info.pod),
            ("/node/system.slice", &None)
        );

        let root = resolver
            .resolve(inode_of(&tree.0.join("node")).unwrap())
            .unwrap();
        assert_eq!(root.path, "/node");
        // Outside the attach point: never walked.
        assert!(
            resolver
                .resolve(inode_of(&tree.0.join("elsewhere")).unwrap())
                .is_none()
        );

        std::fs::remove_dir(&container).unwrap();
        assert!(!resolver.is_alive(id));
        assert!(!resolver.is_alive(u64::MAX));
        assert!(resolver.resolve(u64::MAX).is_none());
        assert_eq!(resolver.cached(u64::MAX), Cached::Missing);
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
        assert_eq!(path_under_mount(&root, &root).as_deref(), Some("/"));
        let resolver = CgroupResolver::new(root, "/".into(), KubeletLayout::new("/", None));
        let info = resolver.resolve(id).expect("our own cgroup resolves");
        assert_eq!(info.path, rel);
        assert!(resolver.is_alive(id));
    }

    /// A fake tree whose walks wait at a gate the test opens, and are counted.
    struct GatedTree {
        paths: HashMap<u64, String>,
        open: Mutex<bool>,
        opened: Condvar,
        entered: AtomicU64,
    }

    impl GatedTree {
        fn set_open(&self, open: bool) {
            *self.open.lock().unwrap() = open;
            self.opened.notify_all();
        }
    }

    impl CgroupTree for Arc<GatedTree> {
        fn walk(&self) -> HashMap<u64, String> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            self.paths.clone()
        }

        fn id_of(&self, path: &str) -> Option<u64> {
            self.paths
                .iter()
                .find(|(_, p)| *p == path)
                .map(|(id, _)| *id)
        }
    }

    #[test]
    fn a_miss_storm_does_not_stall_known_cgroups_and_costs_few_walks() {
        const KNOWN: u64 = 7;
        const STORM: u64 = 64;
        let tree = Arc::new(GatedTree {
            paths: HashMap::from([(KNOWN, format!("/kubepods/burstable/pod{UID}/{CID}"))]),
            open: Mutex::new(true),
            opened: Condvar::new(),
            entered: AtomicU64::new(0),
        });
        let resolver = Arc::new(CgroupResolver::with_tree(
            Box::new(tree.clone()),
            KubeletLayout::new("/", None),
            Duration::from_secs(3600),
        ));
        assert!(resolver.resolve(KNOWN).is_some());
        assert_eq!(resolver.walks(), 1);

        // Connections from cgroups that are gone: every one misses, and the walk they start hangs.
        tree.set_open(false);
        let storm: Vec<_> = (0..STORM)
            .map(|i| {
                let resolver = resolver.clone();
                std::thread::spawn(move || resolver.resolve(1000 + i))
            })
            .collect();
        assert!(
            (0..500).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                tree.entered.load(Ordering::SeqCst) == 2
            }),
            "a walk started"
        );

        // Meanwhile a known pod's connections are identified without waiting for the walk.
        let (done, finished) = std::sync::mpsc::channel();
        let known = resolver.clone();
        std::thread::spawn(move || {
            let all_known = (0..1000).all(|_| matches!(known.cached(KNOWN), Cached::Known(_)));
            let _ = done.send(all_known);
        });
        assert_eq!(
            finished.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "cached lookups went on while a walk was under way"
        );

        tree.set_open(true);
        for t in storm {
            assert!(t.join().unwrap().is_none());
        }
        // The walk under way, and at most one more for misses that came after it started.
        let walks = resolver.walks();
        assert!((2..=3).contains(&walks), "{walks} walks for {STORM} misses");

        // The same ids again: remembered misses, no walk.
        for i in 0..STORM {
            assert_eq!(resolver.cached(1000 + i), Cached::Missing);
            assert!(resolver.resolve(1000 + i).is_none());
        }
        assert_eq!(resolver.walks(), walks);
    }

    #[test]
    fn remembered_misses_expire() {
        let tree = Arc::new(GatedTree {
            paths: HashMap::new(),
            open: Mutex::new(true),
            opened: Condvar::new(),
            entered: AtomicU64::new(0),
        });
        let resolver = CgroupResolver::with_tree(
            Box::new(tree),
            KubeletLayout::new("/", None),
            Duration::ZERO,
        );
        assert!(resolver.resolve(5).is_none());
        assert!(resolver.resolve(5).is_none());
        assert_eq!(resolver.walks(), 2, "an expired miss walks again");
        assert_eq!(resolver.cached(5), Cached::Unknown);
    }
}
