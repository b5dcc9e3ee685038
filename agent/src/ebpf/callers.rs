//! Reading the kernel's record of who connected, by the connection's 4-tuple.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use agent_common::{CallerRecord, ConnKey};
use aya::maps::{HashMap, MapData, MapError};

/// How old a record may be when the agent reads it (from the handshake, or from `connect()` if the
/// connection never completed one). The kernel deletes a record when its connection ends, so an
/// older one can only be a record whose end the kernel did not see: never hand it out.
pub const RECORD_TTL: Duration = Duration::from_secs(5);

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
    /// The calling thread's `comm` (shared: each request's audit event holds it, no copy).
    pub comm: Arc<str>,
    /// Cookie of the caller's network namespace.
    pub netns_cookie: u64,
}

/// Cheap-to-clone, `Send + Sync` handle on the connection → caller map.
#[derive(Clone)]
pub struct Callers {
    /// Only read here (the kernel deletes records), so no lock: its own file descriptor.
    by_conn: Arc<HashMap<MapData, ConnKey, CallerRecord>>,
    ttl: Duration,
}

impl Callers {
    pub(super) fn new(by_conn: HashMap<MapData, ConnKey, CallerRecord>) -> Self {
        Callers {
            by_conn: Arc::new(by_conn),
            ttl: RECORD_TTL,
        }
    }

    /// The same handle with another TTL (tests).
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The record of an accepted connection: `peer` is the client address from `accept()`,
    /// `local` the server's local address. IPv4 addresses are mapped the way the eBPF side maps
    /// them. One lookup, no lock. The record stays in the map until the kernel sees the
    /// connection end: a later connection on the same 4-tuple gets its own record.
    pub fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<Caller> {
        let key = conn_key(peer, local);
        let record = match self.by_conn.get(&key, 0) {
            Ok(record) => record,
            Err(MapError::KeyNotFound) => return None,
            Err(error) => {
                tracing::warn!(%error, %peer, "reading the caller of a connection");
                return None;
            }
        };
        // The client completes its handshake before the agent can accept; a record that never
        // did belongs to a socket of another namespace holding the same 4-tuple, not this peer.
        if record.established == 0 {
            tracing::debug!(%peer, "ignoring a record whose socket never completed a handshake");
            return None;
        }
        let age = monotonic_now_ns().saturating_sub(record.ktime_ns);
        if u128::from(age) > self.ttl.as_nanos() {
            tracing::debug!(%peer, age_ms = age / 1_000_000, "ignoring a stale caller record");
            return None;
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
            comm: Arc::from(String::from_utf8_lossy(&r.comm[..comm_len])),
            netns_cookie: r.netns_cookie,
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub(super) fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// The key `sock_ops` wrote for this connection, from the server's side of it.
pub(super) fn conn_key(peer: SocketAddr, local: SocketAddr) -> ConnKey {
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV6};

    use super::*;

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
    fn caller_comm_stops_at_nul() {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"python3");
        let caller = Caller::from(CallerRecord {
            comm,
            tgid: 7,
            ..CallerRecord::default()
        });
        assert_eq!((&*caller.comm, caller.pid), ("python3", 7));
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_now_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_now_ns();
        assert!(b > a && b - a >= 2_000_000, "{a} {b}");
    }
}
