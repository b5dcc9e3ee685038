//! The load-time steps: the global's value, typed maps, probing, attaching.

use std::{
    fs::File,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd as _,
};

use agent_common::{ConnectLimit, WatchConfig};
use aya::{
    Ebpf,
    maps::{Map, MapData, MapError},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SockOps, SocketFilter,
        cgroup_sock::CgroupSockLinkId,
    },
};

use super::{
    AttachConfig, EbpfError, PROBE_CMPXCHG_PROGRAM, SOCK_RELEASE_PROGRAM,
    error::{map_error, program_step},
};

/// Loads (and unloads) the probe program: `Err` says why the kernel refused it.
pub(super) fn probe_cmpxchg64(ebpf: &mut Ebpf) -> Result<(), String> {
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
pub(super) fn node_cpus() -> u32 {
    aya::util::nr_cpus()
        .ok()
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(1)
}

/// The global's value for this config: at most one IPv4 and one IPv6 listener.
pub(super) fn watch_config(cfg: &AttachConfig) -> Result<WatchConfig, EbpfError> {
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
pub(super) fn ipv6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
}

/// Take a map out of the object, typed (aya checks key and value sizes).
pub(super) fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
    M::try_from(map).map_err(map_error(name, "type"))
}

/// [`take_map`], and a second handle on the same map through its own file descriptor: readers
/// keep one, the writer (aya's `remove` takes `&mut`) the other, behind its own lock.
pub(super) fn take_map_twice<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<(M, M), EbpfError>
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

/// Loads the program `$name`, of aya's type `$ty`, and attaches it to `$cgroup`: the link id.
/// (aya's cgroup program types share no trait for `load` and `attach`, hence a macro.)
macro_rules! load_and_attach {
    ($ebpf:expr, $ty:ty, $name:expr, $cgroup:expr) => {{
        let name = $name;
        let program: &mut $ty = $ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()
            .map_err(program_step(name, "type"))?;
        program.load().map_err(program_step(name, "load"))?;
        program
            .attach($cgroup, CgroupAttachMode::Single)
            .map_err(program_step(name, "attach"))
    }};
}

pub(super) fn attach_sock_addr(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
) -> Result<(), EbpfError> {
    load_and_attach!(ebpf, CgroupSockAddr, name, cgroup).map(drop)
}

pub(super) fn attach_sock_ops(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
) -> Result<(), EbpfError> {
    load_and_attach!(ebpf, SockOps, name, cgroup).map(drop)
}

pub(super) fn attach_sock_release(
    ebpf: &mut Ebpf,
    cgroup: &File,
) -> Result<CgroupSockLinkId, EbpfError> {
    load_and_attach!(ebpf, CgroupSock, SOCK_RELEASE_PROGRAM, cgroup)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::{
        AGENT_EBPF, CONNECT4_NO_LIMITER_PROGRAM, CONNECT4_PROGRAM, CONNECT6_NO_LIMITER_PROGRAM,
        CONNECT6_PROGRAM, SOCK_OPS_PROGRAM,
    };
    use super::*;

    fn config(targets: &[&str]) -> AttachConfig {
        AttachConfig {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            targets: targets.iter().map(|t| t.parse().unwrap()).collect(),
            connect_rate: 5,
            connect_burst: 10,
            pod_parents: Vec::new(),
            max_open_per_pod: 7,
            max_pods: 110,
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
