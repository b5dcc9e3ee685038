//! The agent's eBPF programs, attached at the cgroup v2 root so they see every process on the node.
//!
//! - `cgroup/connect4`, `cgroup/connect6`: on a `connect()` to the agent's listener, apply the
//!   per-cgroup token bucket and record the caller under the socket cookie. Every other connect on
//!   the node is let through after a few compares.
//! - `sockops` (`BPF_SOCK_OPS_TCP_CONNECT_CB`): the source port is now bound; move the record from
//!   the socket cookie to the connection's 4-tuple, which the agent can compute after `accept()`.
//!
//! Small and dumb on purpose: filter, record, count. Every decision is made in userspace.
#![no_std]
#![no_main]
// Compare-and-swap for the token bucket: the BPF target spec has no `atomic_cas`, so
// `AtomicU64::compare_exchange` does not exist here, but LLVM lowers the intrinsic to BPF_CMPXCHG.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    ptr::{addr_of, read_volatile},
};

use agent_common::{
    CALLER_BY_CONN_MAP, CALLER_BY_COOKIE_MAP, CALLER_MAP_ENTRIES, CONNECT_STATE_ENTRIES,
    CONNECT_STATE_MAP, CallerRecord, CgroupConnectState, ConnKey, ConnectLimit, WATCH_CONFIG_MAP,
    WatchConfig,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr, bpf_sock_ops},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};

/// Return value of a cgroup sock_addr program that lets the connect go ahead.
const ALLOW: i32 = 1;
/// Return value that refuses it: the caller's `connect()` fails with `EPERM`.
const REFUSE: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;

/// The third word of a v4-mapped IPv6 address (`::ffff:a.b.c.d`) as the kernel stores it.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

// `#[map(name)]` takes only a literal: these asserts tie each literal to the name userspace uses.
const _: () = assert!(same(WATCH_CONFIG_MAP, "WATCH_CONFIG"));
const _: () = assert!(same(CALLER_BY_COOKIE_MAP, "CALLER_BY_COOKIE"));
const _: () = assert!(same(CALLER_BY_CONN_MAP, "CALLER_BY_CONN"));
const _: () = assert!(same(CONNECT_STATE_MAP, "CONNECT_STATE"));

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[map(name = "WATCH_CONFIG")]
static WATCH_CONFIG: Array<WatchConfig> = Array::with_max_entries(1, 0);

#[map(name = "CALLER_BY_COOKIE")]
static CALLER_BY_COOKIE: LruHashMap<u64, CallerRecord> =
    LruHashMap::with_max_entries(CALLER_MAP_ENTRIES, 0);

#[map(name = "CALLER_BY_CONN")]
static CALLER_BY_CONN: LruHashMap<ConnKey, CallerRecord> =
    LruHashMap::with_max_entries(CALLER_MAP_ENTRIES, 0);

#[map(name = "CONNECT_STATE")]
static CONNECT_STATE: LruHashMap<u64, CgroupConnectState> =
    LruHashMap::with_max_entries(CONNECT_STATE_ENTRIES, 0);

#[cgroup_sock_addr(connect4)]
pub fn agent_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid bpf_sock_addr; fields are read at constant offsets.
    let (ip4, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let cfg = WATCH_CONFIG.get(0).ok_or(ALLOW)?;
    if cfg.port4 == 0 || ip4 != cfg.ip4 || port_of_user_port(port) != cfg.port4 {
        return Ok(ALLOW);
    }
    on_watched_connect(ctx, cfg.limit)
}

#[cgroup_sock_addr(connect6)]
pub fn agent_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: as in try_connect4; the verifier wants the IPv6 address one u32 at a time.
    let (ip6, port) = unsafe {
        (
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ],
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let port = port_of_user_port(port);
    let cfg = WATCH_CONFIG.get(0).ok_or(ALLOW)?;
    let to_ip6 = cfg.port6 != 0 && port == cfg.port6 && ip6 == cfg.ip6;
    // A v4 client on an AF_INET6 socket (`::ffff:a.b.c.d`) triggers only connect6.
    let to_ip4 = cfg.port4 != 0
        && port == cfg.port4
        && ip6[0] == 0
        && ip6[1] == 0
        && ip6[2] == V4_MAPPED_WORD
        && ip6[3] == cfg.ip4;
    if !(to_ip6 || to_ip4) {
        return Ok(ALLOW);
    }
    on_watched_connect(ctx, cfg.limit)
}

/// `user_port` is a network-order u16 in the low 16 bits.
#[inline(always)]
fn port_of_user_port(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// A connect to the agent: charge the caller's cgroup, then record the caller if allowed.
#[inline(always)]
fn on_watched_connect(ctx: &SockAddrContext, limit: ConnectLimit) -> Result<i32, i32> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in try_connect4.
    let sock_type = unsafe { read_volatile(addr_of!((*sa).type_)) };
    // Only TCP connections are ever accepted: a UDP record would never be consumed.
    if sock_type != SOCK_STREAM {
        return Ok(ALLOW);
    }
    // SAFETY: helpers allowed in cgroup sock_addr programs, called with our own context.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !take_token(cgroup_id, limit) {
        return Ok(REFUSE);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let record = CallerRecord {
        cgroup_id,
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A full map must not break the caller's connect: the agent then sees no record, that's all.
    let _ = CALLER_BY_COOKIE.insert(cookie, record, 0);
    Ok(ALLOW)
}

/// The cgroup's token bucket as GCRA: `tat` is when the bucket will be full again plus one
/// interval. A connect is allowed if, after adding one interval, `tat` is at most `burst`
/// intervals ahead of now. One word, updated with compare-and-swap, so CPUs never race.
#[inline(always)]
fn take_token(cgroup_id: u64, limit: ConnectLimit) -> bool {
    // Create the cgroup's entry on its first connect; NOEXIST keeps a concurrent creator's.
    let _ = CONNECT_STATE.insert(cgroup_id, CgroupConnectState::default(), BPF_NOEXIST.into());
    let Some(state) = CONNECT_STATE.get_ptr_mut(cgroup_id) else {
        // No state (map full and the entry evicted at once): don't punish the caller for it.
        return true;
    };
    // SAFETY: `state` points into a map value that stays valid for this program run; all
    // accesses are atomic because other CPUs update the same value.
    unsafe {
        let allowed = if limit.rate == 0 {
            true
        } else {
            gcra_admit(addr_of!((*state).tat_ns).cast_mut(), limit)
        };
        let counter = if allowed {
            addr_of!((*state).allowed).cast_mut()
        } else {
            addr_of!((*state).denied).cast_mut()
        };
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1);
        allowed
    }
}

/// # Safety
/// `tat` must point to a live map value word.
#[inline(always)]
unsafe fn gcra_admit(tat: *mut u64, limit: ConnectLimit) -> bool {
    let interval = 1_000_000_000 / u64::from(limit.rate);
    let tolerance = interval * u64::from(limit.burst.max(1));
    // SAFETY: helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // Bounded retries keep the verifier happy; losing four races in a row means other threads of
    // the same cgroup are connecting right now, so refusing is the bucket's answer anyway.
    let mut i = 0;
    while i < 4 {
        // An aligned 64-bit load is single-copy atomic; an atomic-load intrinsic would need
        // load-acquire (cpu v4), and the compare-and-swap below catches a stale value anyway.
        // SAFETY: the caller guarantees `tat` is valid.
        let old = unsafe { read_volatile(tat) };
        let new = if old > now { old } else { now } + interval;
        if new - now > tolerance {
            return false;
        }
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                tat, old, new,
            )
        };
        if swapped {
            return true;
        }
        i += 1;
    }
    false
}

#[sock_ops]
pub fn agent_sock_ops(ctx: SockOpsContext) -> u32 {
    match try_sock_ops(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<u32, u32> {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: the kernel hands us a valid bpf_sock_ops; fields are read at constant offsets.
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return Ok(0);
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before anything else touches the map.
    let record = match unsafe { CALLER_BY_COOKIE.get(cookie) } {
        Some(r) => *r,
        None => return Ok(0),
    };
    let key = conn_key(ops).ok_or(0u32)?;
    let _ = CALLER_BY_CONN.insert(key, record, 0);
    let _ = CALLER_BY_COOKIE.remove(cookie);
    Ok(0)
}

/// The `bpf_sock_ops` fields the key is made of.
struct SockOpsFields {
    family: u32,
    remote_port: u32,
    local_port: u32,
    remote_ip4: u32,
    local_ip4: u32,
    remote_ip6: [u32; 4],
    local_ip6: [u32; 4],
}

/// The connection as the server will name it. The client is the local end here.
#[inline(always)]
fn conn_key(ops: *mut bpf_sock_ops) -> Option<ConnKey> {
    // Every field is read unconditionally, before looking at the family: reads under a branch
    // get merged by LLVM into one load from a computed ctx offset, which the verifier rejects.
    // SAFETY: as in try_sock_ops; one u32 at a time for the IPv6 arrays.
    let f = unsafe {
        SockOpsFields {
            family: read_volatile(addr_of!((*ops).family)),
            remote_port: read_volatile(addr_of!((*ops).remote_port)),
            local_port: read_volatile(addr_of!((*ops).local_port)),
            remote_ip4: read_volatile(addr_of!((*ops).remote_ip4)),
            local_ip4: read_volatile(addr_of!((*ops).local_ip4)),
            remote_ip6: [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            local_ip6: [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
        }
    };
    let (client, server) = match f.family {
        AF_INET => (v4_mapped(f.local_ip4), v4_mapped(f.remote_ip4)),
        // A v4-mapped peer on an AF_INET6 socket already reads `::ffff:a.b.c.d` here, which is
        // exactly how v4 addresses are stored in the key.
        AF_INET6 => (f.local_ip6, f.remote_ip6),
        _ => return None,
    };
    let (remote_port, local_port) = (f.remote_port, f.local_port);
    Some(ConnKey {
        client_addr: words_to_bytes(client),
        server_addr: words_to_bytes(server),
        client_port: local_port as u16,
        // remote_port is a network-order u16 in the high 16 bits.
        server_port: u16::from_be((remote_port >> 16) as u16),
        _pad: 0,
    })
}

#[inline(always)]
fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Network-order words as the kernel stores them, to the same bytes.
#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = w.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
