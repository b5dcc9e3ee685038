//! cgroup v2 directories in the shapes kubelet creates, under a per-node test root.
//!
//! The cgroup2 mount is found in `/proc/self/mountinfo` (hybrid hosts mount it at `/sys/fs/cgroup/unified`,
//! production nodes at `/sys/fs/cgroup`). Each node gets its own root `<mount>/e2e-<pid>-<n>`, where the
//! agent attaches its programs (`--cgroup-root`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The kubelet's cgroup driver, which decides the shape of pod cgroup paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`
    Systemd,
    /// `kubepods/burstable/pod<uid>/<id>`
    Cgroupfs,
}

/// A pod's quality-of-service class, which decides the middle of its cgroup path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    /// Directly under `kubepods`.
    Guaranteed,
    /// Under `kubepods/burstable`.
    Burstable,
    /// Under `kubepods/besteffort`.
    BestEffort,
}

/// The mount point of the cgroup v2 hierarchy, read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mount) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount));
        }
    }
    bail!("no cgroup2 mount in /proc/self/mountinfo")
}

/// The pod cgroup (directory of the pod) and container cgroup, relative to the node's test root.
#[must_use]
pub fn kubelet_paths(
    driver: CgroupDriver,
    qos: QosClass,
    pod_uid: &str,
    container_id: &str,
) -> (PathBuf, PathBuf) {
    match driver {
        CgroupDriver::Systemd => {
            let uid = pod_uid.replace('-', "_");
            let pod = match qos {
                QosClass::Guaranteed => {
                    PathBuf::from(format!("kubepods.slice/kubepods-pod{uid}.slice"))
                }
                QosClass::Burstable => PathBuf::from(format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"
                )),
                QosClass::BestEffort => PathBuf::from(format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"
                )),
            };
            let container = pod.join(format!("cri-containerd-{container_id}.scope"));
            (pod, container)
        }
        CgroupDriver::Cgroupfs => {
            let pod = match qos {
                QosClass::Guaranteed => PathBuf::from(format!("kubepods/pod{pod_uid}")),
                QosClass::Burstable => PathBuf::from(format!("kubepods/burstable/pod{pod_uid}")),
                QosClass::BestEffort => PathBuf::from(format!("kubepods/besteffort/pod{pod_uid}")),
            };
            let container = pod.join(container_id);
            (pod, container)
        }
    }
}

/// Kills every process in the cgroup tree at `dir` and removes the tree, deepest directories first.
///
/// Nothing is moved: processes still inside are killed through `cgroup.kill` and waited for (up to 5 s),
/// since a cgroup can only be removed once empty.
pub fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill exists on every non-root cgroup since Linux 5.14.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match remove_dirs(dir) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn remove_dirs(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_dirs(&entry.path())?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("removing cgroup {}", dir.display()))
}

/// Removes test roots of harness processes that no longer exist.
pub(crate) fn cleanup_leftovers() {
    let Ok(mount) = cgroup2_mount() else { return };
    let Ok(entries) = fs::read_dir(&mount) else {
        return;
    };
    for entry in entries.flatten() {
        if crate::netns::is_leftover(&entry.file_name().to_string_lossy()) {
            let _ = remove_tree(&entry.path());
        }
    }
}

/// A per-node cgroup root `<cgroup2 mount>/e2e-<pid>-<n>`, removed (with everything under it) on drop.
#[derive(Debug)]
pub struct TestCgroupRoot {
    path: PathBuf,
}

impl TestCgroupRoot {
    /// Creates a fresh root directly under the cgroup2 mount.
    pub fn create() -> Result<Self> {
        let path = cgroup2_mount()?.join(crate::netns::unique_name());
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// The root's absolute path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestCgroupRoot {
    fn drop(&mut self) {
        let _ = remove_tree(&self.path);
    }
}

/// cgroup attach types of the agent's programs, as `BPF_PROG_QUERY` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BpfAttachType {
    /// `BPF_CGROUP_SOCK_OPS` (the agent's `sock_ops` program).
    SockOps,
    /// `BPF_CGROUP_INET4_CONNECT` (`cgroup/connect4`).
    Connect4,
    /// `BPF_CGROUP_INET6_CONNECT` (`cgroup/connect6`).
    Connect6,
}

impl BpfAttachType {
    /// All three, in the order above.
    pub const ALL: [Self; 3] = [Self::SockOps, Self::Connect4, Self::Connect6];

    fn raw(self) -> u32 {
        // enum bpf_attach_type in include/uapi/linux/bpf.h.
        match self {
            Self::SockOps => 3,
            Self::Connect4 => 10,
            Self::Connect6 => 11,
        }
    }
}

/// `union bpf_attr` as `BPF_PROG_QUERY` reads and writes it.
#[repr(C)]
#[derive(Default)]
struct BpfProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// How many programs of `attach_type` are attached directly to the cgroup at `dir` (link-based
/// attachments included), asked of the kernel with `BPF_PROG_QUERY` — what `bpftool cgroup show`
/// prints, without needing bpftool.
pub fn attached_programs(dir: &Path, attach_type: BpfAttachType) -> Result<u32> {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_QUERY: libc::c_long = 16;
    let cgroup = fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut attr = BpfProgQuery {
        target_fd: u32::try_from(cgroup.as_raw_fd()).context("cgroup fd")?,
        attach_type: attach_type.raw(),
        ..BpfProgQuery::default()
    };
    // SAFETY: `attr` is a live, properly sized `bpf_attr` prefix (the kernel checks that any tail it
    // does not know is zero); with `prog_ids` null the kernel only writes `prog_cnt` and flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<BpfProgQuery>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("BPF_PROG_QUERY {attach_type:?} on {}", dir.display()));
    }
    Ok(attr.prog_cnt)
}

/// Delegates `dir` (created if missing) to `uid` as systemd does for `user@<uid>.service`: the
/// directory and its `cgroup.procs`, `cgroup.threads` and `cgroup.subtree_control` become the
/// user's, so it can make cgroups below and move its own processes between them.
pub fn delegate(dir: &Path, uid: u32) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for path in [
        dir.to_path_buf(),
        dir.join("cgroup.procs"),
        dir.join("cgroup.threads"),
        dir.join("cgroup.subtree_control"),
    ] {
        std::os::unix::fs::chown(&path, Some(uid), Some(uid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// The system's Python, which any user can run (a `python3` on root's `PATH` may be a shim in
/// root's home).
#[must_use]
pub fn system_python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}
