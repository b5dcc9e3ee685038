//! Loading the agent's eBPF programs and reading their maps. Mechanism only: what to watch and how
//! hard to limit arrive as values in [`AttachConfig`]; what a [`Caller`] means is decided elsewhere.
//!
//! The programs (`agent-ebpf`) record who called `connect()` to the agent, keyed by the
//! connection's 4-tuple; [`Callers::take`] consumes that record once the agent has accepted the
//! connection. Addresses in the key are always IPv6, IPv4 as v4-mapped, on both sides.

use std::{
    fs::File,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use agent_common::{
    CALLER_BY_CONN_MAP, CONNECT_STATE_MAP, CallerRecord, CgroupConnectState, ConnKey, ConnectLimit,
    WATCH_CONFIG_MAP, WatchConfig,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps},
};

/// The compiled `agent-ebpf` object, built by `build.rs`.
static AGENT_EBPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// Function names of the programs in the object (they must differ from their ELF sections).
const CONNECT4_PROGRAM: &str = "agent_connect4";
const CONNECT6_PROGRAM: &str = "agent_connect6";
const SOCK_OPS_PROGRAM: &str = "agent_sock_ops";

/// What went wrong, and at which step.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("reading /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    #[error("no cgroup2 filesystem in /proc/self/mountinfo")]
    NoCgroup2Mount,
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
        /// `type`, `write`, `read`.
        step: &'static str,
        #[source]
        source: MapError,
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
    /// Per-cgroup connect token bucket: connections per second (0 = off) and burst.
    pub connect_rate: u32,
    pub connect_burst: u32,
}

/// The loaded and attached programs. Dropping it detaches them (the links are fd-based, unpinned).
pub struct Programs {
    /// Owns the programs, which own their links.
    _ebpf: Ebpf,
    callers: Callers,
    connect_state: HashMap<MapData, u64, CgroupConnectState>,
}

/// The process that connected to the agent, as the kernel saw it at `connect()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// cgroup v2 id (the inode number of the caller's cgroup directory).
    pub cgroup_id: u64,
    /// Thread group id (the process id).
    pub pid: u32,
    /// Thread id of the thread that connected.
    pub tid: u32,
    pub uid: u32,
    /// The calling thread's `comm`.
    pub comm: String,
    /// Cookie of the caller's network namespace.
    pub netns_cookie: u64,
}

/// Connects to the agent a cgroup made: let through, and refused by the token bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectCounters {
    pub allowed: u64,
    pub denied: u64,
}

/// Cheap-to-clone, `Send + Sync` handle on the connection → caller map.
#[derive(Clone)]
pub struct Callers {
    // aya's `remove` takes `&mut`; the lock is held only for the two syscalls of `take`.
    by_conn: Arc<Mutex<HashMap<MapData, ConnKey, CallerRecord>>>,
}

impl Programs {
    /// Load the embedded object, write the config map, and attach `connect4`, `connect6` and
    /// `sock_ops` at `cfg.cgroup_root` through links (which never leave duplicates behind after a
    /// restart).
    ///
    /// # Errors
    /// Invalid targets, or the step (load, map write, cgroup open, attach) the kernel refused.
    pub fn load_and_attach(cfg: &AttachConfig) -> Result<Programs, EbpfError> {
        let watch = watch_config(&cfg.targets, cfg.connect_rate, cfg.connect_burst)?;
        let mut ebpf = Ebpf::load(AGENT_EBPF).map_err(EbpfError::Load)?;

        // Configure before attaching: an empty config watches nothing.
        let mut config: Array<_, WatchConfig> = take_map(&mut ebpf, WATCH_CONFIG_MAP)?;
        config.set(0, watch, 0).map_err(|source| EbpfError::Map {
            name: WATCH_CONFIG_MAP,
            step: "write",
            source,
        })?;
        let by_conn = take_map(&mut ebpf, CALLER_BY_CONN_MAP)?;
        let connect_state = take_map(&mut ebpf, CONNECT_STATE_MAP)?;

        let cgroup = File::open(&cfg.cgroup_root).map_err(|source| EbpfError::OpenCgroup {
            path: cfg.cgroup_root.clone(),
            source,
        })?;
        // sock_ops first: once connect4/6 record callers, sock_ops must be there to move them.
        attach_sock_ops(&mut ebpf, &cgroup)?;
        for name in [CONNECT4_PROGRAM, CONNECT6_PROGRAM] {
            attach_sock_addr(&mut ebpf, name, &cgroup)?;
        }
        Ok(Programs {
            _ebpf: ebpf,
            callers: Callers {
                by_conn: Arc::new(Mutex::new(by_conn)),
            },
            connect_state,
        })
    }

    /// Cheap-to-clone, `Send + Sync` handle used on every accepted connection.
    #[must_use]
    pub fn callers(&self) -> Callers {
        self.callers.clone()
    }

    /// Per-cgroup counters of allowed and refused connects, for metrics.
    ///
    /// # Errors
    /// Reading the map failed.
    pub fn connect_counters(&self) -> Result<Vec<(u64, ConnectCounters)>, EbpfError> {
        self.connect_state
            .iter()
            .map(|entry| {
                let (cgroup_id, state) = entry.map_err(|source| EbpfError::Map {
                    name: CONNECT_STATE_MAP,
                    step: "read",
                    source,
                })?;
                let counters = ConnectCounters {
                    allowed: state.allowed,
                    denied: state.denied,
                };
                Ok((cgroup_id, counters))
            })
            .collect()
    }
}

impl Callers {
    /// Look up and remove (consume) the record for an accepted connection: `peer` is the client
    /// address from `accept()`, `local` the server's local address. IPv4 addresses are mapped the
    /// way the eBPF side maps them.
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<Caller> {
        let key = conn_key(peer, local);
        let mut by_conn = self.by_conn.lock().unwrap_or_else(PoisonError::into_inner);
        let record = match by_conn.get(&key, 0) {
            Ok(record) => record,
            Err(MapError::KeyNotFound) => return None,
            Err(error) => {
                tracing::warn!(%error, %peer, "reading the caller of a connection");
                return None;
            }
        };
        // Consume it: a later connection reusing the 4-tuple must not inherit this caller.
        if let Err(error) = by_conn.remove(&key) {
            tracing::warn!(%error, %peer, "removing the caller of a connection");
        }
        Some(Caller::from(record))
    }
}

impl From<CallerRecord> for Caller {
    fn from(r: CallerRecord) -> Self {
        let comm_len = r.comm.iter().position(|&b| b == 0).unwrap_or(r.comm.len());
        Caller {
            cgroup_id: r.cgroup_id,
            pid: r.tgid,
            tid: r.tid,
            uid: r.uid,
            comm: String::from_utf8_lossy(&r.comm[..comm_len]).into_owned(),
            netns_cookie: r.netns_cookie,
        }
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo (first cgroup2 entry).
///
/// # Errors
/// mountinfo is unreadable or has no cgroup2 mount.
pub fn cgroup2_mount_root() -> Result<PathBuf, EbpfError> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(EbpfError::MountInfo)?;
    cgroup2_mount_in(&mountinfo).ok_or(EbpfError::NoCgroup2Mount)
}

/// The first cgroup2 mount point in a mountinfo text.
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `id parent maj:min root mount-point options [optional...] - fstype source super-options`
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount_point = mount.split(' ').nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
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

/// The config map's value for these targets: at most one IPv4 and one IPv6 listener.
fn watch_config(targets: &[SocketAddr], rate: u32, burst: u32) -> Result<WatchConfig, EbpfError> {
    let mut cfg = WatchConfig {
        limit: ConnectLimit { rate, burst },
        ..WatchConfig::default()
    };
    if targets.is_empty() {
        return Err(EbpfError::Targets("no target to watch".into()));
    }
    for target in targets {
        if target.port() == 0 || target.ip().is_unspecified() {
            return Err(EbpfError::Targets(format!(
                "{target}: needs an address and a port"
            )));
        }
        // A v4-mapped IPv6 target is an IPv4 listener as far as connect4/6 are concerned.
        match target.ip().to_canonical() {
            IpAddr::V4(ip) => {
                let ip4 = u32::from_ne_bytes(ip.octets());
                if cfg.port4 != 0 && (cfg.ip4, cfg.port4) != (ip4, target.port()) {
                    return Err(EbpfError::Targets(format!(
                        "{target}: a second IPv4 target"
                    )));
                }
                (cfg.ip4, cfg.port4) = (ip4, target.port());
            }
            IpAddr::V6(ip) => {
                let ip6 = ipv6_words(ip);
                if cfg.port6 != 0 && (cfg.ip6, cfg.port6) != (ip6, target.port()) {
                    return Err(EbpfError::Targets(format!(
                        "{target}: a second IPv6 target"
                    )));
                }
                (cfg.ip6, cfg.port6) = (ip6, target.port());
            }
        }
    }
    Ok(cfg)
}

/// The address as the kernel stores it: four network-order words.
fn ipv6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
}

/// The key `sock_ops` wrote for this connection, from the server's side of it.
fn conn_key(peer: SocketAddr, local: SocketAddr) -> ConnKey {
    ConnKey {
        client_addr: mapped_octets(peer.ip()),
        server_addr: mapped_octets(local.ip()),
        client_port: peer.port(),
        server_port: local.port(),
        _pad: 0,
    }
}

fn mapped_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        IpAddr::V6(ip) => ip.octets(),
    }
}

/// Take a map out of the object, typed (aya checks key and value sizes).
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    M::try_from(map).map_err(|source| EbpfError::Map {
        name,
        step: "type",
        source,
    })
}

fn attach_sock_addr(ebpf: &mut Ebpf, name: &'static str, cgroup: &File) -> Result<(), EbpfError> {
    let step = |step| move |source| EbpfError::Program { name, step, source };
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(step("type"))?;
    program.load().map_err(step("load"))?;
    program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(step("attach"))?;
    Ok(())
}

fn attach_sock_ops(ebpf: &mut Ebpf, cgroup: &File) -> Result<(), EbpfError> {
    let name = SOCK_OPS_PROGRAM;
    let step = |step| move |source| EbpfError::Program { name, step, source };
    let program: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(step("type"))?;
    program.load().map_err(step("load"))?;
    program
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(step("attach"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV6};

    use super::*;

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
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unescapes_mount_points_and_skips_optional_fields() {
        let mountinfo = "40 1 0:30 / /mnt/my\\040cg rw shared:1 master:2 - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount_in(mountinfo),
            Some(PathBuf::from("/mnt/my cg"))
        );
        assert_eq!(cgroup2_mount_in("1 0 0:1 / / rw - ext4 /dev/x rw\n"), None);
    }

    #[test]
    fn real_mountinfo_has_a_cgroup2_mount() {
        let root = cgroup2_mount_root().expect("cgroup2 mounted on this machine");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }

    #[test]
    fn v4_v6_mapped_and_v4_peers_produce_the_same_key() {
        let server = SocketAddr::from((Ipv4Addr::new(169, 254, 170, 23), 80));
        let v4 = conn_key(
            SocketAddr::from((Ipv4Addr::new(10, 0, 0, 7), 40000)),
            server,
        );
        let mapped_peer = Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped();
        let mapped_server = Ipv4Addr::new(169, 254, 170, 23).to_ipv6_mapped();
        let mapped = conn_key(
            SocketAddr::V6(SocketAddrV6::new(mapped_peer, 40000, 0, 0)),
            SocketAddr::V6(SocketAddrV6::new(mapped_server, 80, 0, 0)),
        );
        assert_eq!(v4, mapped);
        assert_eq!(v4.client_addr[10..], [0xff, 0xff, 10, 0, 0, 7]);
        assert_eq!((v4.client_port, v4.server_port), (40000, 80));
    }

    #[test]
    fn watch_config_stores_addresses_as_the_kernel_does() {
        let targets = [
            "169.254.170.23:80".parse().unwrap(),
            "[fd00:ec2::23]:81".parse().unwrap(),
        ];
        let cfg = watch_config(&targets, 5, 10).unwrap();
        assert_eq!(cfg.ip4.to_ne_bytes(), [169, 254, 170, 23]);
        assert_eq!(cfg.ip6[0].to_ne_bytes(), [0xfd, 0, 0x0e, 0xc2]);
        assert_eq!(cfg.ip6[3].to_ne_bytes(), [0, 0, 0, 0x23]);
        assert_eq!((cfg.port4, cfg.port6), (80, 81));
        assert_eq!(cfg.limit, ConnectLimit { rate: 5, burst: 10 });
    }

    #[test]
    fn watch_config_treats_a_v4_mapped_target_as_ipv4() {
        let cfg = watch_config(&["[::ffff:169.254.170.23]:80".parse().unwrap()], 0, 0).unwrap();
        assert_eq!(
            (cfg.ip4.to_ne_bytes(), cfg.port4),
            ([169, 254, 170, 23], 80)
        );
        assert_eq!(cfg.port6, 0);
    }

    #[test]
    fn watch_config_rejects_what_it_cannot_watch() {
        for targets in [
            vec![],
            vec!["169.254.170.23:0".parse().unwrap()],
            vec!["0.0.0.0:80".parse().unwrap()],
            vec![
                "10.0.0.1:80".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap(),
            ],
        ] {
            assert!(
                matches!(watch_config(&targets, 0, 0), Err(EbpfError::Targets(_))),
                "{targets:?}"
            );
        }
    }

    #[test]
    fn caller_comm_stops_at_nul() {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"python3");
        let caller = Caller::from(CallerRecord {
            comm,
            tgid: 7,
            ..CallerRecord::default()
        });
        assert_eq!((caller.comm.as_str(), caller.pid), ("python3", 7));
    }
}
