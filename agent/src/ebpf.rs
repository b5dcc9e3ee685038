//! Loading the agent's eBPF programs and reading their maps. Mechanism only: what to watch, how hard
//! to limit and which cgroups hold pods arrive as values in [`AttachConfig`]; what a [`Caller`]
//! means is decided elsewhere.
//!
//! The programs (`agent-ebpf`, whose header tells their story) record who called `connect()` to the
//! agent, keyed by the connection's 4-tuple; [`Callers::take`] reads that record once the agent has
//! accepted the connection. Addresses in the key are always IPv6, IPv4 as v4-mapped, on both sides.
//!
//! Kernel requirements, decided here at load: cgroup BPF links (5.7), `cgroup/sock_release` (5.9);
//! the per-pod connect limit also needs 64-bit compare-and-swap in BPF (5.12), probed at load: where
//! it is missing, the connect programs are loaded in their build without the limit.

mod callers;
mod cgroup2;

use std::{
    fs::File,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::{Mutex, PoisonError},
};

use agent_common::{
    CALLER_BY_CONN_ENTRIES, CALLER_BY_CONN_MAP, CALLER_BY_COOKIE_ENTRIES, CALLER_BY_COOKIE_MAP,
    CONFIG_GLOBAL, CONN_BY_COOKIE_MAP, CONNECT_STATE_ENTRIES, CONNECT_STATE_MAP, CallerRecord,
    CgroupConnectState, ConnectLimit, EVENT_CONN_RECORD_FAILED, EVENT_COOKIE_RECORD_FAILED,
    EVENT_LEFTOVER_REMOVED, EVENT_LIMITER_CONTENDED, EVENT_LIMITER_STATE_FULL,
    EVENT_OPEN_CAP_REFUSED, EVENT_OPEN_STATE_FULL, EVENT_RATE_REFUSED, EVENTS_MAP,
    OPEN_BY_POD_ENTRIES, OPEN_BY_POD_MAP, OpenState, POD_PARENTS_MAP, PodParents, WatchConfig,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SockOps, SocketFilter,
        cgroup_sock::CgroupSockLinkId,
    },
};

pub use callers::{Caller, Callers, RECORD_TTL};
pub use cgroup2::cgroup2_mount_root;

/// The compiled `agent-ebpf` object, built by `build.rs`.
static AGENT_EBPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// Function names of the programs in the object (they must differ from their ELF sections).
const CONNECT4_PROGRAM: &str = "agent_connect4";
const CONNECT6_PROGRAM: &str = "agent_connect6";
const CONNECT4_NO_LIMITER_PROGRAM: &str = "agent_connect4_no_limiter";
const CONNECT6_NO_LIMITER_PROGRAM: &str = "agent_connect6_no_limiter";
const SOCK_OPS_PROGRAM: &str = "agent_sock_ops";
const SOCK_RELEASE_PROGRAM: &str = "agent_sock_release";
const PROBE_CMPXCHG_PROGRAM: &str = "probe_cmpxchg64";
const TEST_SOCK_OPS_PROGRAM: &str = "test_sock_ops_other";

/// Most connections to the agent one pod may hold open at once (see
/// [`AttachConfig::max_open_per_pod`]): far above what SDKs hold (one or a few per process), low
/// enough that pods at their cap cannot fill the record maps.
pub const DEFAULT_MAX_OPEN_PER_POD: u32 = 256;

/// Set to `1` to load the connect programs without the token bucket even where the kernel could
/// run it: the fallback of kernels before 5.12, on demand (tests).
pub const FORCE_NO_LIMITER_ENV: &str = "EKS_POD_IDENTITY_AGENT_FORCE_NO_LIMITER";

/// What went wrong, and at which step.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("reading /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    #[error("no cgroup2 filesystem in /proc/self/mountinfo")]
    NoCgroup2Mount,
    #[error(
        "the cgroup2 mount at {} is not the cgroup hierarchy's root: {why}; cgroup ids and levels \
         would not be the host's (run the agent in the host's cgroup namespace, with the host's \
         cgroup2 mount)",
        mount_point.display()
    )]
    NotHierarchyRoot { mount_point: PathBuf, why: String },
    #[error("cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod parent {} is not below the cgroup2 mount {}", path.display(), mount.display())]
    PodParentOutsideMount { path: PathBuf, mount: PathBuf },
    #[error("{0} pod parents exist, the programs check at most {max}", max = agent_common::MAX_POD_PARENTS)]
    TooManyPodParents(usize),
    #[error("invalid watch targets: {0}")]
    Targets(String),
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {0} not found in the eBPF object")]
    MissingProgram(&'static str),
    #[error("program {name}: {step}")]
    Program {
        name: &'static str,
        /// `type`, `load` or `attach`.
        step: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {0} not found in the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {step}")]
    Map {
        name: &'static str,
        /// `type`, `write`, `read`, `remove`, `open`.
        step: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is not a hash map")]
    NotAHashMap(&'static str),
    #[error("map {name}: duplicating its file descriptor")]
    DupMap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("opening cgroup {}", path.display())]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to watch and where to attach. Plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachConfig {
    /// The cgroup v2 directory the programs attach at; they apply to every descendant.
    pub cgroup_root: PathBuf,
    /// The agent's listeners the programs watch (IPv4 and/or IPv6 address + port).
    pub targets: Vec<SocketAddr>,
    /// Per-pod connect token bucket: connections per second (0 = off) and burst.
    pub connect_rate: u32,
    pub connect_burst: u32,
    /// Cgroup directories (under the cgroup2 mount) whose children are pods. A caller below one
    /// is charged to that child: every container of a pod, and cgroups nested below them, share
    /// one budget. Callers below none are charged to their own cgroup. Directories that do not
    /// exist are skipped (see [`Programs::refresh_pod_parents`]).
    pub pod_parents: Vec<PathBuf>,
    /// Most connections to the agent one pod holds open (from `connect()` to close); past it,
    /// `connect()` fails with `EPERM` for that pod only. 0 = no cap. It also bounds the records one
    /// pod can have pending, so a pod cannot push others' records out.
    pub max_open_per_pod: u32,
}

/// Which build of the connect programs to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectPrograms {
    /// With the per-pod token bucket where the kernel can run it (probed), else without.
    Probe,
    /// Without the token bucket, whatever the kernel supports.
    NoLimiter,
}

/// Map sizes, scaled with the node's CPUs: bigger nodes run more pods, and LRU maps keep per-CPU
/// free lists (a map much smaller than a few hundred entries per CPU evicts early).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapSizes {
    by_cookie: u32,
    by_conn: u32,
    connect_state: u32,
    open_by_pod: u32,
}

impl MapSizes {
    fn for_cpus(cpus: u32) -> MapSizes {
        let scaled = |floor: u32, per_cpu: u32| floor.max(per_cpu.saturating_mul(cpus));
        MapSizes {
            // Entries live for one connect() call: a few hundred per CPU is plenty.
            by_cookie: scaled(CALLER_BY_COOKIE_ENTRIES, 512),
            // One per open connection to the agent: 64 Ki on small nodes is 256 pods at the
            // default cap; not preallocated, so memory follows use.
            by_conn: scaled(CALLER_BY_CONN_ENTRIES.max(65_536), 4096),
            // One per pod (or cgroup outside pods) that connected.
            connect_state: scaled(CONNECT_STATE_ENTRIES, 128),
            open_by_pod: scaled(OPEN_BY_POD_ENTRIES, 128),
        }
    }

    fn entries(self) -> [(&'static str, u32); 5] {
        [
            (CALLER_BY_COOKIE_MAP, self.by_cookie),
            (CALLER_BY_CONN_MAP, self.by_conn),
            (CONN_BY_COOKIE_MAP, self.by_conn),
            (CONNECT_STATE_MAP, self.connect_state),
            (OPEN_BY_POD_MAP, self.open_by_pod),
        ]
    }
}

/// The loaded and attached programs. Dropping it detaches them (the links are fd-based, unpinned).
pub struct Programs {
    /// Owns the programs, which own their links.
    _ebpf: Ebpf,
    callers: Callers,
    connect_limiter: bool,
    /// Read-only handles for counters (`&self` suffices to read a map).
    connect_state: HashMap<MapData, u64, CgroupConnectState>,
    open_by_pod: HashMap<MapData, u64, OpenState>,
    events: PerCpuArray<MapData, u64>,
    /// Handles that write (aya's `remove` and `set` take `&mut`), on their own descriptors.
    maintenance: Mutex<Maintenance>,
}

struct Maintenance {
    connect_state: HashMap<MapData, u64, CgroupConnectState>,
    open_by_pod: HashMap<MapData, u64, OpenState>,
    by_cookie: HashMap<MapData, u64, CallerRecord>,
    pod_parents: Array<MapData, PodParents>,
    mount: PathBuf,
    parent_dirs: Vec<PathBuf>,
    current_parents: PodParents,
}

/// A pod's connects to the agent, as the kernel counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectCounters {
    /// Let through by the token bucket (0 while the rate is 0: then no bucket is kept).
    pub allowed: u64,
    /// Refused with `EPERM`: by the token bucket, or at the open-connection cap.
    pub denied: u64,
    /// Connections it holds open now.
    pub open: u64,
}

/// Rare events the programs counted, node-wide (see `agent_common::EVENT_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelEvents {
    pub limiter_contended: u64,
    pub limiter_state_full: u64,
    pub open_state_full: u64,
    pub cookie_record_failed: u64,
    pub conn_record_failed: u64,
    pub leftover_removed: u64,
    pub open_cap_refused: u64,
    pub rate_refused: u64,
}

/// What [`Programs::prune_connect_state`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Token buckets of pods (or cgroups) that are gone.
    pub buckets: u64,
    /// Open-connection counters of pods that are gone.
    pub open_counters: u64,
    /// Records of connects that failed before their connection existed.
    pub orphan_records: u64,
}

impl Programs {
    /// Load the embedded object, probe the kernel, and attach `sock_ops`, `sock_release`,
    /// `connect4` and `connect6` at `cfg.cgroup_root` through links (which never leave duplicates
    /// behind after a restart). The token bucket is left out where the kernel cannot run it, or
    /// when `EKS_POD_IDENTITY_AGENT_FORCE_NO_LIMITER=1`.
    ///
    /// # Errors
    /// Invalid targets or pod parents, a cgroup2 mount that is not the hierarchy's root, or the step
    /// (load, map write, cgroup open, attach) the kernel refused.
    pub fn load_and_attach(cfg: &AttachConfig) -> Result<Programs, EbpfError> {
        let forced = std::env::var_os(FORCE_NO_LIMITER_ENV).is_some_and(|v| v == "1");
        let which = if forced {
            ConnectPrograms::NoLimiter
        } else {
            ConnectPrograms::Probe
        };
        Self::load_and_attach_with(cfg, which)
    }

    /// [`Programs::load_and_attach`], choosing the connect programs' build.
    ///
    /// # Errors
    /// As [`Programs::load_and_attach`].
    pub fn load_and_attach_with(
        cfg: &AttachConfig,
        which: ConnectPrograms,
    ) -> Result<Programs, EbpfError> {
        let watch = watch_config(cfg)?;
        let mount = cgroup2_mount_root()?;
        let parents = cgroup2::pod_parents(&mount, &cfg.pod_parents)?;
        let mut sizes = MapSizes::for_cpus(node_cpus());
        if cfg.connect_rate == 0 {
            // No bucket is ever made (the programs never touch the map): don't reserve its memory.
            sizes.connect_state = 1;
        }
        let mut loader = EbpfLoader::new();
        // `.rodata`: read by the programs on every connect, with no map lookup.
        loader.override_global(CONFIG_GLOBAL, &watch, true);
        for (name, entries) in sizes.entries() {
            loader.map_max_entries(name, entries);
        }
        let mut ebpf = loader.load(AGENT_EBPF).map_err(EbpfError::Load)?;

        let mut pod_parents: Array<_, PodParents> = take_map(&mut ebpf, POD_PARENTS_MAP)?;
        pod_parents
            .set(0, parents, 0)
            .map_err(map_error(POD_PARENTS_MAP, "write"))?;
        let by_conn = take_map(&mut ebpf, CALLER_BY_CONN_MAP)?;
        let by_cookie = take_map(&mut ebpf, CALLER_BY_COOKIE_MAP)?;
        let (connect_state, connect_state_w) = take_map_twice(&mut ebpf, CONNECT_STATE_MAP)?;
        let (open_by_pod, open_by_pod_w) = take_map_twice(&mut ebpf, OPEN_BY_POD_MAP)?;
        let events = take_map(&mut ebpf, EVENTS_MAP)?;

        let connect_limiter = match which {
            ConnectPrograms::NoLimiter => {
                tracing::info!(
                    env = FORCE_NO_LIMITER_ENV,
                    "connect programs loaded without the per-pod connect limit, as asked"
                );
                false
            }
            ConnectPrograms::Probe => match probe_cmpxchg64(&mut ebpf) {
                Ok(()) => true,
                Err(why) => {
                    tracing::warn!(
                        reason = %why,
                        connect_rate = cfg.connect_rate,
                        "this kernel cannot run 64-bit compare-and-swap in BPF (Linux 5.12+): the \
                         per-pod connect limit is not enforced in the kernel; attribution works"
                    );
                    false
                }
            },
        };

        let cgroup = File::open(&cfg.cgroup_root).map_err(|source| EbpfError::OpenCgroup {
            path: cfg.cgroup_root.clone(),
            source,
        })?;
        // sock_ops and sock_release first: once connect4/6 record callers, they must be there to
        // move and release the records.
        attach_sock_ops(&mut ebpf, SOCK_OPS_PROGRAM, &cgroup)?;
        attach_sock_release(&mut ebpf, &cgroup)?;
        let connect = if connect_limiter {
            [CONNECT4_PROGRAM, CONNECT6_PROGRAM]
        } else {
            [CONNECT4_NO_LIMITER_PROGRAM, CONNECT6_NO_LIMITER_PROGRAM]
        };
        for name in connect {
            attach_sock_addr(&mut ebpf, name, &cgroup)?;
        }
        Ok(Programs {
            _ebpf: ebpf,
            callers: Callers::new(by_conn),
            connect_limiter,
            connect_state,
            open_by_pod,
            events,
            maintenance: Mutex::new(Maintenance {
                connect_state: connect_state_w,
                open_by_pod: open_by_pod_w,
                by_cookie,
                pod_parents,
                mount,
                parent_dirs: cfg.pod_parents.clone(),
                current_parents: parents,
            }),
        })
    }

    /// Cheap-to-clone, `Send + Sync` handle used on every accepted connection.
    #[must_use]
    pub fn callers(&self) -> Callers {
        self.callers.clone()
    }

    /// Whether the connect programs carry the per-pod token bucket (the kernel can run it, and it
    /// was not turned off).
    #[must_use]
    pub fn connect_limiter(&self) -> bool {
        self.connect_limiter
    }

    /// Per-pod counters (keyed by pod cgroup id, or by cgroup id outside pods), for metrics.
    /// Walks two maps: blocking, call it off the async runtime.
    ///
    /// # Errors
    /// Reading a map failed.
    pub fn connect_counters(&self) -> Result<Vec<(u64, ConnectCounters)>, EbpfError> {
        let mut by_key = std::collections::BTreeMap::<u64, ConnectCounters>::new();
        for entry in self.connect_state.iter() {
            let (key, state) = entry.map_err(map_error(CONNECT_STATE_MAP, "read"))?;
            let c = by_key.entry(key).or_default();
            c.allowed += state.allowed + state.contended;
            c.denied += state.denied;
        }
        for entry in self.open_by_pod.iter() {
            let (key, state) = entry.map_err(map_error(OPEN_BY_POD_MAP, "read"))?;
            let c = by_key.entry(key).or_default();
            c.denied += state.refused;
            c.open = state.open;
        }
        Ok(by_key.into_iter().collect())
    }

    /// The programs' rare events, summed over CPUs.
    ///
    /// # Errors
    /// Reading the map failed.
    pub fn kernel_events(&self) -> Result<KernelEvents, EbpfError> {
        let total = |event: u32| -> Result<u64, EbpfError> {
            let per_cpu = self
                .events
                .get(&event, 0)
                .map_err(map_error(EVENTS_MAP, "read"))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(KernelEvents {
            limiter_contended: total(EVENT_LIMITER_CONTENDED)?,
            limiter_state_full: total(EVENT_LIMITER_STATE_FULL)?,
            open_state_full: total(EVENT_OPEN_STATE_FULL)?,
            cookie_record_failed: total(EVENT_COOKIE_RECORD_FAILED)?,
            conn_record_failed: total(EVENT_CONN_RECORD_FAILED)?,
            leftover_removed: total(EVENT_LEFTOVER_REMOVED)?,
            open_cap_refused: total(EVENT_OPEN_CAP_REFUSED)?,
            rate_refused: total(EVENT_RATE_REFUSED)?,
        })
    }

    /// Removes the connect state of pods (and cgroups) for which `is_alive` says no, and records of
    /// connects that failed before their connection existed (older than [`RECORD_TTL`]). Safe with
    /// a wrong answer: a live pod's bucket starts afresh, and its open-connection count restarts
    /// from its new connections (a counter's epoch keeps older connections from uncounting the new
    /// one). Walks maps: blocking, call it periodically off the async runtime.
    ///
    /// # Errors
    /// Reading or writing a map failed.
    pub fn prune_connect_state(&self, is_alive: impl Fn(u64) -> bool) -> Result<Pruned, EbpfError> {
        let mut m = self
            .maintenance
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut pruned = Pruned::default();
        // Keys first, removals after: deleting while walking a hash map can restart the walk.
        let gone = |keys: aya::maps::MapKeys<'_, u64>, name| -> Result<Vec<u64>, EbpfError> {
            keys.map(|k| k.map_err(map_error(name, "read")))
                .filter(|k| k.as_ref().map_or(true, |k| !is_alive(*k)))
                .collect()
        };
        for key in gone(m.connect_state.keys(), CONNECT_STATE_MAP)? {
            pruned.buckets += removed(m.connect_state.remove(&key), CONNECT_STATE_MAP)?;
        }
        for key in gone(m.open_by_pod.keys(), OPEN_BY_POD_MAP)? {
            pruned.open_counters += removed(m.open_by_pod.remove(&key), OPEN_BY_POD_MAP)?;
        }
        let now = callers::monotonic_now_ns();
        let ttl = u64::try_from(RECORD_TTL.as_nanos()).unwrap_or(u64::MAX);
        let orphans: Vec<u64> = m
            .by_cookie
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| now.saturating_sub(r.ktime_ns) > ttl)
            .map(|(cookie, _)| cookie)
            .collect();
        for cookie in orphans {
            pruned.orphan_records += removed(m.by_cookie.remove(&cookie), CALLER_BY_COOKIE_MAP)?;
        }
        Ok(pruned)
    }

    /// Looks at the pod parent directories again and gives the programs the ones that exist now
    /// (a parent created after the agent started, such as a QoS slice kubelet makes late). Returns
    /// whether anything changed. Blocking (a `stat` per directory): call it off the async runtime.
    ///
    /// # Errors
    /// A parent could not be read, or writing the map failed.
    pub fn refresh_pod_parents(&self) -> Result<bool, EbpfError> {
        let mut m = self
            .maintenance
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let parents = cgroup2::pod_parents(&m.mount, &m.parent_dirs)?;
        if parents == m.current_parents {
            return Ok(false);
        }
        // One array value, replaced whole: a connect that reads it meanwhile may see a mix for
        // that one connect, no worse than before the update.
        m.pod_parents
            .set(0, parents, 0)
            .map_err(map_error(POD_PARENTS_MAP, "write"))?;
        m.current_parents = parents;
        Ok(true)
    }
}

/// Deletes racing with the kernel's own are fine: gone is gone.
fn removed(result: Result<(), MapError>, name: &'static str) -> Result<u64, EbpfError> {
    match result {
        Ok(()) => Ok(1),
        Err(MapError::KeyNotFound) => Ok(0),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(0),
        Err(source) => Err(EbpfError::Map {
            name,
            step: "remove",
            source,
        }),
    }
}

/// A test program of someone else's, attached beside ours: see `test_sock_ops_other` in
/// `agent-ebpf`. Detached on drop.
#[doc(hidden)]
pub struct TestSockOps {
    _ebpf: Ebpf,
}

impl TestSockOps {
    /// Loads the test sock_ops program (it sets the longest initial SYN timeout, and clears the
    /// callback flags of established sockets) at `cgroup`.
    ///
    /// # Errors
    /// The step the kernel refused.
    #[doc(hidden)]
    pub fn attach(cgroup: &std::path::Path) -> Result<TestSockOps, EbpfError> {
        let mut ebpf = Ebpf::load(AGENT_EBPF).map_err(EbpfError::Load)?;
        let dir = File::open(cgroup).map_err(|source| EbpfError::OpenCgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        attach_sock_ops(&mut ebpf, TEST_SOCK_OPS_PROGRAM, &dir)?;
        Ok(TestSockOps { _ebpf: ebpf })
    }
}

/// Loads (and unloads) the probe program: `Err` says why the kernel refused it.
fn probe_cmpxchg64(ebpf: &mut Ebpf) -> Result<(), String> {
    let program: &mut SocketFilter = ebpf
        .program_mut(PROBE_CMPXCHG_PROGRAM)
        .ok_or_else(|| format!("program {PROBE_CMPXCHG_PROGRAM} not found"))?
        .try_into()
        .map_err(|e: ProgramError| e.to_string())?;
    let loaded = program.load().map_err(|e| match e {
        // The verifier's whole log is noise here; its verdict is in the errno.
        ProgramError::LoadError { io_error, .. } => format!("the verifier refused it: {io_error}"),
        other => other.to_string(),
    });
    let _ = program.unload();
    loaded
}

/// The node's CPUs (possible, not just online or in this process's cpuset: the maps serve the
/// whole node).
fn node_cpus() -> u32 {
    aya::util::nr_cpus()
        .ok()
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(1)
}

/// The global's value for this config: at most one IPv4 and one IPv6 listener.
fn watch_config(cfg: &AttachConfig) -> Result<WatchConfig, EbpfError> {
    let mut watch = WatchConfig {
        limit: ConnectLimit {
            rate: cfg.connect_rate,
            burst: cfg.connect_burst,
        },
        max_open_per_pod: cfg.max_open_per_pod,
        ..WatchConfig::EMPTY
    };
    if cfg.targets.is_empty() {
        return Err(EbpfError::Targets("no target to watch".into()));
    }
    for target in &cfg.targets {
        if target.port() == 0 || target.ip().is_unspecified() {
            return Err(EbpfError::Targets(format!(
                "{target}: needs an address and a port"
            )));
        }
        // A v4-mapped IPv6 target is an IPv4 listener as far as connect4/6 are concerned.
        match target.ip().to_canonical() {
            IpAddr::V4(ip) => {
                let ip4 = u32::from_ne_bytes(ip.octets());
                if watch.port4 != 0 && (watch.ip4, watch.port4) != (ip4, target.port()) {
                    return Err(EbpfError::Targets(format!(
                        "{target}: a second IPv4 target"
                    )));
                }
                (watch.ip4, watch.port4) = (ip4, target.port());
            }
            IpAddr::V6(ip) => {
                let ip6 = ipv6_words(ip);
                if watch.port6 != 0 && (watch.ip6, watch.port6) != (ip6, target.port()) {
                    return Err(EbpfError::Targets(format!(
                        "{target}: a second IPv6 target"
                    )));
                }
                (watch.ip6, watch.port6) = (ip6, target.port());
            }
        }
    }
    Ok(watch)
}

/// The address as the kernel stores it: four network-order words.
fn ipv6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
}

fn map_error(name: &'static str, step: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, step, source }
}

/// Take a map out of the object, typed (aya checks key and value sizes).
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    M::try_from(map).map_err(map_error(name, "type"))
}

/// [`take_map`], and a second handle on the same map through its own file descriptor: readers
/// keep one, the writer (aya's `remove` takes `&mut`) the other, behind its own lock.
fn take_map_twice<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<(M, M), EbpfError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    let data = match &map {
        Map::HashMap(d) | Map::LruHashMap(d) => d,
        _ => return Err(EbpfError::NotAHashMap(name)),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| EbpfError::DupMap { name, source })?;
    let second = MapData::from_fd(fd)
        .and_then(Map::from_map_data)
        .map_err(map_error(name, "open"))?;
    let typed = |m: Map| M::try_from(m).map_err(map_error(name, "type"));
    Ok((typed(map)?, typed(second)?))
}

fn program_step(name: &'static str, step: &'static str) -> impl Fn(ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, step, source }
}

fn attach_sock_addr(ebpf: &mut Ebpf, name: &'static str, cgroup: &File) -> Result<(), EbpfError> {
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(program_step(name, "type"))?;
    program.load().map_err(program_step(name, "load"))?;
    program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(program_step(name, "attach"))?;
    Ok(())
}

fn attach_sock_ops(ebpf: &mut Ebpf, name: &'static str, cgroup: &File) -> Result<(), EbpfError> {
    let program: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(program_step(name, "type"))?;
    program.load().map_err(program_step(name, "load"))?;
    program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(program_step(name, "attach"))?;
    Ok(())
}

fn attach_sock_release(ebpf: &mut Ebpf, cgroup: &File) -> Result<CgroupSockLinkId, EbpfError> {
    let name = SOCK_RELEASE_PROGRAM;
    let program: &mut CgroupSock = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(program_step(name, "type"))?;
    program.load().map_err(program_step(name, "load"))?;
    program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(program_step(name, "attach"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(targets: &[&str]) -> AttachConfig {
        AttachConfig {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            targets: targets.iter().map(|t| t.parse().unwrap()).collect(),
            connect_rate: 5,
            connect_burst: 10,
            pod_parents: Vec::new(),
            max_open_per_pod: 7,
        }
    }

    #[test]
    fn watch_config_stores_addresses_as_the_kernel_does() {
        let cfg = watch_config(&config(&["169.254.170.23:80", "[fd00:ec2::23]:81"])).unwrap();
        assert_eq!(cfg.ip4.to_ne_bytes(), [169, 254, 170, 23]);
        assert_eq!(cfg.ip6[0].to_ne_bytes(), [0xfd, 0, 0x0e, 0xc2]);
        assert_eq!(cfg.ip6[3].to_ne_bytes(), [0, 0, 0, 0x23]);
        assert_eq!((cfg.port4, cfg.port6), (80, 81));
        assert_eq!(cfg.limit, ConnectLimit { rate: 5, burst: 10 });
        assert_eq!(cfg.max_open_per_pod, 7);
    }

    #[test]
    fn watch_config_treats_a_v4_mapped_target_as_ipv4() {
        let cfg = watch_config(&config(&["[::ffff:169.254.170.23]:80"])).unwrap();
        assert_eq!(
            (cfg.ip4.to_ne_bytes(), cfg.port4),
            ([169, 254, 170, 23], 80)
        );
        assert_eq!(cfg.port6, 0);
    }

    #[test]
    fn watch_config_rejects_what_it_cannot_watch() {
        for targets in [
            &[][..],
            &["169.254.170.23:0"],
            &["0.0.0.0:80"],
            &["10.0.0.1:80", "10.0.0.2:80"],
        ] {
            assert!(
                matches!(watch_config(&config(targets)), Err(EbpfError::Targets(_))),
                "{targets:?}"
            );
        }
    }

    #[test]
    fn map_sizes_scale_with_cpus_above_their_floors() {
        let small = MapSizes::for_cpus(2);
        assert_eq!(small.by_conn, 65_536);
        assert_eq!(small.by_cookie, CALLER_BY_COOKIE_ENTRIES);
        let big = MapSizes::for_cpus(96);
        assert_eq!(big.by_conn, 96 * 4096);
        assert_eq!(big.by_cookie, 96 * 512);
        assert!(big.connect_state > small.connect_state);
        // Pods at the default cap fit in the record map with room to spare, on any node.
        assert!(small.by_conn / DEFAULT_MAX_OPEN_PER_POD >= 256);
    }

    /// The fallback programs must not contain `BPF_CMPXCHG` anywhere: old kernels reject a program
    /// for an instruction they do not know even where it cannot be reached.
    #[test]
    fn only_the_limiter_programs_contain_a_compare_and_swap() {
        const BPF_STX_ATOMIC_DW: u8 = 0xdb;
        const BPF_CMPXCHG: i32 = 0xf0 | 0x01;
        let object = aya_obj::Object::parse(AGENT_EBPF).unwrap();
        let contains = |f: &aya_obj::Function| {
            f.instructions
                .iter()
                .any(|i| i.code == BPF_STX_ATOMIC_DW && i.imm == BPF_CMPXCHG)
        };
        let program = |name: &str| &object.functions[&object.programs[name].function_key()];
        for name in [CONNECT4_PROGRAM, CONNECT6_PROGRAM, PROBE_CMPXCHG_PROGRAM] {
            assert!(
                contains(program(name)),
                "{name} has no BPF_CMPXCHG: is the scan right?"
            );
        }
        for name in [
            CONNECT4_NO_LIMITER_PROGRAM,
            CONNECT6_NO_LIMITER_PROGRAM,
            SOCK_OPS_PROGRAM,
            SOCK_RELEASE_PROGRAM,
        ] {
            assert!(!contains(program(name)), "{name} contains BPF_CMPXCHG");
        }
        // Subprograms (memcpy and friends) are linked into every program that calls them.
        let programs: Vec<_> = object.programs.values().map(|p| p.function_key()).collect();
        for (key, f) in &object.functions {
            if !programs.contains(key) {
                assert!(!contains(f), "subprogram {} contains BPF_CMPXCHG", f.name);
            }
        }
    }
}
