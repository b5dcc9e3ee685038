//! Loading the agent's eBPF programs and reading their maps. Mechanism only: what to watch, how hard
//! to limit and which cgroups hold pods arrive as values in [`AttachConfig`]; what a [`Caller`]
//! means is decided elsewhere.
//!
//! The programs (`agent-ebpf`, whose header tells their story) record who called `connect()` to the
//! agent, keyed by the connection's 4-tuple and stamped with the client socket's and network
//! namespace's cookies; [`Callers::lookup`] reads that record once the agent has accepted the
//! connection. Addresses in the key are always IPv6, IPv4 as v4-mapped, on both sides.
//!
//! Parts: `attach` (load-time steps), `sizes` (map sizes from the pod count and cap), `counters`
//! (what the programs counted, and pruning), `callers` (reading records), `cgroup2`, `error`.
//!
//! Kernel requirements, decided here at load: cgroup BPF links (5.7), `cgroup/sock_release` (5.9);
//! the per-pod connect limit also needs 64-bit compare-and-swap in BPF (5.12), probed at load: where
//! it is missing, the connect programs are loaded in their build without the limit.

mod attach;
mod callers;
mod cgroup2;
mod counters;
mod error;
mod sizes;

use std::{
    fs::File,
    net::SocketAddr,
    path::PathBuf,
    sync::{Mutex, PoisonError},
};

use agent_common::{
    CALLER_BY_CONN_MAP, CALLER_BY_COOKIE_MAP, CONFIG_GLOBAL, CONNECT_STATE_MAP, CallerRecord,
    CgroupConnectState, EVENTS_MAP, OPEN_BY_POD_MAP, OpenState, POD_PARENTS_MAP, PodParents,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
};

use attach::{
    attach_sock_addr, attach_sock_ops, attach_sock_release, node_cpus, probe_cmpxchg64, take_map,
    take_map_twice, watch_config,
};
pub use callers::{Caller, Callers, RECORD_TTL};
pub use cgroup2::cgroup2_mount_root;
pub use counters::{ConnectCounters, KernelEvents, Pruned};
pub use error::EbpfError;
use error::map_error;
use sizes::MapSizes;

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
/// [`AttachConfig::max_open_per_pod`]) when no other cap is given: far above what SDKs hold (one
/// or a few per process).
pub const DEFAULT_MAX_OPEN_PER_POD: u32 = 256;

/// Pods a node runs at most, when no other count is given: EKS's default max pods (110).
pub const DEFAULT_MAX_PODS: u32 = 110;

/// Set to `1` to load the connect programs without the token bucket even where the kernel could
/// run it: the fallback of kernels before 5.12, on demand (tests).
pub const FORCE_NO_LIMITER_ENV: &str = "EKS_POD_IDENTITY_AGENT_FORCE_NO_LIMITER";

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
    /// one budget. Callers below none all share one budget together, whatever their cgroups.
    /// Directories that do not exist are skipped (see [`Programs::refresh_pod_parents`]).
    pub pod_parents: Vec<PathBuf>,
    /// Most connections to the agent one pod (or all callers outside pods together) holds open,
    /// from `connect()` to close; past it, `connect()` fails with `EPERM` for that pod only. 0 = no
    /// cap (the maps are then sized for [`DEFAULT_MAX_OPEN_PER_POD`], and may fill).
    pub max_open_per_pod: u32,
    /// Pods the node runs at most: with the cap, it sizes the record maps (see `sizes`).
    pub max_pods: u32,
}

/// Which build of the connect programs to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectPrograms {
    /// With the per-pod token bucket where the kernel can run it (probed), else without.
    Probe,
    /// Without the token bucket, whatever the kernel supports.
    NoLimiter,
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
        let cap = match cfg.max_open_per_pod {
            0 => DEFAULT_MAX_OPEN_PER_POD,
            cap => cap,
        };
        let mut sizes = MapSizes::new(cfg.max_pods, cap, node_cpus());
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
