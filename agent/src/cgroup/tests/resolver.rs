//! The resolver: ids found by inode in a real tree, misses walked, coalesced and remembered.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{CID, UID, pod};
use crate::cgroup::tree::inode_of;
use crate::cgroup::{Cached, CgroupResolver, CgroupTree, KubeletLayout, Qos, path_under_mount};

/// A fresh directory under the system temp dir, removed on drop.
struct TempTree(PathBuf);

impl TempTree {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cgroup-resolver-{}-{n}", std::process::id()));
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
    let started = Arc::new(AtomicU64::new(0));
    let storm: Vec<_> = (0..STORM)
        .map(|i| {
            let (resolver, started) = (resolver.clone(), started.clone());
            std::thread::spawn(move || {
                started.fetch_add(1, Ordering::SeqCst);
                resolver.resolve(1000 + i)
            })
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

    // Every miss has arrived before the walk ends (on a loaded machine a thread can start late;
    // one that arrives after the walk would rightly start another).
    assert!(
        (0..1000).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            started.load(Ordering::SeqCst) == STORM
        }),
        "the storm's threads started"
    );
    std::thread::sleep(Duration::from_millis(50));
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
