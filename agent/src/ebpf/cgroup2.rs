//! The cgroup v2 hierarchy as the programs see it: where it is mounted, that the mount is the
//! hierarchy's root (not a cgroup namespace's view of a subtree), and the pod parents' ids and
//! levels.

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agent_common::{MAX_POD_PARENTS, PodParent, PodParents};

use super::EbpfError;

/// The id of the cgroup2 hierarchy's root cgroup (the inode of its directory): kernfs numbers its
/// root node 1. Any other id at the mount point means the mount shows a subtree.
const HIERARCHY_ROOT_ID: u64 = 1;

/// The cgroup v2 mount point, from /proc/self/mountinfo (first cgroup2 entry), checked to be the
/// hierarchy's root: cgroup ids and levels (what the programs see) are the host's only there.
///
/// # Errors
/// mountinfo is unreadable, has no cgroup2 mount, or the mount is a cgroup namespace's view.
pub fn cgroup2_mount_root() -> Result<PathBuf, EbpfError> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(EbpfError::MountInfo)?;
    let mount = cgroup2_mount_in(&mountinfo).ok_or(EbpfError::NoCgroup2Mount)?;
    check_hierarchy_root(&mount)?;
    Ok(mount.mount_point)
}

/// A cgroup2 line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cgroup2Mount {
    pub mount_point: PathBuf,
    /// The mount's root within the hierarchy, as seen from this process's cgroup namespace.
    pub root: String,
}

/// The first cgroup2 mount in a mountinfo text.
pub(super) fn cgroup2_mount_in(mountinfo: &str) -> Option<Cgroup2Mount> {
    mountinfo.lines().find_map(|line| {
        // `id parent maj:min root mount-point options [optional...] - fstype source super-options`
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut fields = mount.split(' ').skip(3);
        let root = unescape_mountinfo(fields.next()?);
        let mount_point = PathBuf::from(unescape_mountinfo(fields.next()?));
        Some(Cgroup2Mount { mount_point, root })
    })
}

/// Refuses a mount that is not the hierarchy's root: a bind mount of a subtree, or a cgroup
/// namespace's own cgroup2 mount (a container's `/sys/fs/cgroup`, which shows its namespace's
/// root, some cgroup below the real one). The decisive fact is the directory itself: a cgroup2
/// filesystem whose inode is the hierarchy root's (1). mountinfo's root field cannot decide it: a
/// DaemonSet container, which runs in a private cgroup namespace, sees the host's hierarchy that
/// the chart mounts at /sys/fs/cgroup as `/..` or `/../..` (relative to its namespace's root), and
/// that mount is exactly the one to attach at. Attaching at a subdirectory of the real mount
/// (`--cgroup-root`) is fine: this is about the mount itself.
pub(super) fn check_hierarchy_root(mount: &Cgroup2Mount) -> Result<(), EbpfError> {
    let refuse = |why: String| EbpfError::NotHierarchyRoot {
        mount_point: mount.mount_point.clone(),
        why,
    };
    let is_cgroup2 = nix::sys::statfs::statfs(&mount.mount_point)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    if !is_cgroup2 {
        return Err(refuse("it is not a cgroup2 filesystem".to_owned()));
    }
    let id = cgroup_id(&mount.mount_point)?;
    if id != HIERARCHY_ROOT_ID {
        return Err(refuse(format!(
            "its root is cgroup {id} (mountinfo root {}), not the hierarchy's root: a bind mount of \
             a subtree, or a cgroup namespace's own mount; mount the host's cgroup2 root (the chart \
             mounts the node's /sys/fs/cgroup)",
            mount.root
        )));
    }
    Ok(())
}

/// A cgroup's id: the inode number of its directory.
pub(super) fn cgroup_id(dir: &Path) -> Result<u64, EbpfError> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| EbpfError::Cgroup {
            path: dir.to_owned(),
            source,
        })
}

/// The map value for these pod parents: ids and levels (depth below the hierarchy root, which is
/// the mount), deepest first, so that `kubepods/burstable` is tried before `kubepods`. Parents
/// that do not exist (yet) are skipped.
pub(super) fn pod_parents(mount: &Path, dirs: &[PathBuf]) -> Result<PodParents, EbpfError> {
    let mut found = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let relative = dir
            .strip_prefix(mount)
            .map_err(|_| EbpfError::PodParentOutsideMount {
                path: dir.clone(),
                mount: mount.to_owned(),
            })?;
        let id = match std::fs::metadata(dir) {
            Ok(m) => m.ino(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(EbpfError::Cgroup {
                    path: dir.clone(),
                    source,
                });
            }
        };
        let level = u32::try_from(relative.components().count()).unwrap_or(u32::MAX);
        if !found.iter().any(|p: &PodParent| p.id == id) {
            found.push(PodParent { id, level, _pad: 0 });
        }
    }
    if found.len() > MAX_POD_PARENTS {
        return Err(EbpfError::TooManyPodParents(found.len()));
    }
    // Stable: parents at one level keep the caller's order (no cgroup has two ancestors there).
    found.sort_by_key(|p| std::cmp::Reverse(p.level));
    let mut value = PodParents {
        count: u32::try_from(found.len()).unwrap_or(0),
        ..PodParents::default()
    };
    value.parents[..found.len()].copy_from_slice(&found);
    Ok(value)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(mount_point: &str, root: &str) -> Cgroup2Mount {
        Cgroup2Mount {
            mount_point: PathBuf::from(mount_point),
            root: root.to_owned(),
        }
    }

    #[test]
    fn finds_the_cgroup2_mount_in_hybrid_mode() {
        let mountinfo = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            cgroup2_mount_in(mountinfo),
            Some(mount("/sys/fs/cgroup/unified", "/"))
        );
    }

    #[test]
    fn unescapes_mount_points_and_skips_optional_fields() {
        let mountinfo = "40 1 0:30 / /mnt/my\\040cg rw shared:1 master:2 - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount_in(mountinfo), Some(mount("/mnt/my cg", "/")));
        assert_eq!(cgroup2_mount_in("1 0 0:1 / / rw - ext4 /dev/x rw\n"), None);
    }

    #[test]
    fn the_hosts_hierarchy_seen_from_a_cgroup_namespace_is_accepted() {
        // A DaemonSet container (private cgroup namespace) with the node's hierarchy mounted: the
        // root field is relative to the namespace's root, the directory is the real root.
        let real = cgroup2_mount_root().unwrap();
        let line = format!(
            "1210 1200 0:27 /../.. {} ro,nosuid - cgroup2 cgroup rw\n",
            real.display()
        );
        let m = cgroup2_mount_in(&line).unwrap();
        assert_eq!(m.root, "/../..");
        check_hierarchy_root(&m).unwrap();
        // Not a cgroup2 filesystem at all.
        let e = check_hierarchy_root(&mount("/tmp", "/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/tmp") && e.contains("not a cgroup2"), "{e}");
    }

    #[test]
    fn the_real_mount_is_the_hierarchy_root_and_a_subdirectory_is_not() {
        let root = cgroup2_mount_root().expect("cgroup2 mounted on this machine, at its root");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
        // A directory below the root stands for a namespace's own mount: its id is not the root's.
        let Some(child) = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .find(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        else {
            return;
        };
        let e = check_hierarchy_root(&mount(&child.path().to_string_lossy(), "/")).unwrap_err();
        assert!(matches!(e, EbpfError::NotHierarchyRoot { .. }), "{}", e);
    }

    #[test]
    fn pod_parents_get_levels_below_the_mount_deepest_first_and_missing_ones_skipped() {
        let mount = cgroup2_mount_root().unwrap();
        let dirs: Vec<PathBuf> = std::fs::read_dir(&mount)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .take(1)
            .collect();
        let mut asked = vec![mount.join("no-such-parent-here")];
        asked.extend(dirs.iter().cloned());
        asked.push(mount.clone());
        let value = pod_parents(&mount, &asked).unwrap();
        assert_eq!(value.count as usize, dirs.len() + 1);
        if let Some(dir) = dirs.first() {
            assert_eq!(value.parents[0].level, 1);
            assert_eq!(value.parents[0].id, cgroup_id(dir).unwrap());
        }
        let last = value.parents[value.count as usize - 1];
        assert_eq!((last.id, last.level), (HIERARCHY_ROOT_ID, 0));
        assert!(matches!(
            pod_parents(&mount, &[PathBuf::from("/tmp")]),
            Err(EbpfError::PodParentOutsideMount { .. })
        ));
    }
}
