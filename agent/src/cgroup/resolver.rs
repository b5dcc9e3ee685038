//! Cgroup ids to paths and pods, with a cache the accept path reads without I/O; a miss walks the
//! tree ([`super::tree`]) off the executor, and recognises pods by the [`KubeletLayout`]. Walks are
//! serialised and coalesced, and fresh misses are remembered for a while (bounded).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    CgroupInfo,
    layout::KubeletLayout,
    tree::{Cgroup2Tree, CgroupTree},
};

/// How long an id that a fresh walk did not find is answered "not found" without walking again.
/// Such an id belonged to a cgroup removed before the walk: it never comes back, so the bound is
/// only on memory.
const MISS_TTL: Duration = Duration::from_secs(10);
/// Most remembered misses; past it expired ones are dropped, and if none has, all of them.
const MAX_MISSES: usize = 4096;

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
