//! The cgroup2 hierarchy as the resolver reads it: the [`CgroupTree`] seam (a fake one in tests),
//! the real mount walked by directory entry, and a directory's id (its inode) and path under the
//! mount. Blocking filesystem I/O only; knows nothing of pods.

use std::{
    collections::HashMap,
    os::unix::fs::{DirEntryExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

/// How deep under the attach point the walk looks. Kubelet containers sit at depth 3–5 (deeper
/// with a kubelet `--cgroup-root` or nested cgroups); the bound keeps a pathological tree from
/// stalling a miss.
const MAX_WALK_DEPTH: usize = 12;

/// `dir`'s path relative to the cgroup2 mount at `mount_root`, with a leading slash (`/` for the
/// mount itself); `None` when it is not below it (symlinks resolved).
#[must_use]
pub fn path_under_mount(mount_root: &Path, dir: &Path) -> Option<String> {
    let mount = mount_root.canonicalize().ok()?;
    let dir = dir.canonicalize().ok()?;
    let rel = dir.strip_prefix(&mount).ok()?;
    Some(format!("/{}", rel.to_string_lossy()))
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

pub(super) fn inode_of(path: &Path) -> Option<u64> {
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
