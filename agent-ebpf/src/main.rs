//! The agent's eBPF programs, attached at the cgroup v2 root so they see every process on the node.
//!
//! - `cgroup/connect4`, `cgroup/connect6` (two builds of each, see below): on a `connect()` to the
//!   agent's listener, apply the pod's open-connection cap and token bucket, and record the caller
//!   under the socket cookie. Every other connect on the node is let through after a few loads and
//!   compares against a `.rodata` global: no helper, no map lookup.
//! - `sockops`: for sockets to the agent only (checked before any helper or map call), at
//!   `BPF_SOCK_OPS_TCP_CONNECT_CB` move the record from the cookie to the connection's 4-tuple (which
//!   the agent can compute after `accept()`) and count the connection as open for its pod; when the
//!   socket enters `TCP_CLOSE`, delete the record and uncount it. Always returns 1, so that the
//!   replies of other sock_ops programs on the node stand.
//! - `cgroup/sock_release`: when a socket to the agent is released, the same (whichever of the two
//!   comes first does it). Two ways because each misses a case the other sees: the state callback
//!   is a per-socket flag that another sock_ops program could clear, and at release a socket whose
//!   connect failed or was disconnected may no longer name its peer.
//! - A compare-and-swap probe, and a sock_ops program used only by tests (see each).
//!
//! The connect programs come twice: `agent_connect4`/`6` with the token bucket, which needs a 64-bit
//! compare-and-swap (Linux 5.12+), and `agent_connect4_no_limiter`/`6` without it. The verifier
//! rejects a whole program that contains `BPF_CMPXCHG` on older kernels, even where the instruction
//! cannot be reached, so the fallback must be a program that does not contain it at all.
//!
//! Small and dumb on purpose: filter, record, count. Every decision is made in userspace.
//!
//! Diagnostics are counters, not log lines: refusals per pod (`CONNECT_STATE.denied`,
//! `OPEN_BY_POD.refused`) and rare events node-wide (`EVENTS`: map full, contention, leftovers),
//! read by userspace off the request path. aya-log was left out: it would add a ring buffer
//! (another map, 5.8+) and a reader task to the agent, and its formatting code at each call site
//! of the connect programs, whose unrelated-destination path must stay a few compares and whose
//! refusal path runs under floods, where one log record per refused connect would cost more than
//! the refusal, to say what the counters already say.
#![no_std]
#![no_main]
// Compare-and-swap for the token bucket: the BPF target spec has no `atomic_cas`, so
// `AtomicU64::compare_exchange` does not exist here, but LLVM lowers the intrinsic to BPF_CMPXCHG.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use agent_common::{
    CALLER_BY_CONN_ENTRIES, CALLER_BY_CONN_MAP, CALLER_BY_COOKIE_ENTRIES, CALLER_BY_COOKIE_MAP,
    CONFIG_GLOBAL, CONN_BY_COOKIE_MAP, CONNECT_STATE_ENTRIES, CONNECT_STATE_MAP, CallerRecord,
    CgroupConnectState, ConnKey, ConnectLimit, EVENT_CONN_RECORD_FAILED,
    EVENT_COOKIE_RECORD_FAILED, EVENT_COUNT, EVENT_LEFTOVER_REMOVED, EVENT_LIMITER_CONTENDED,
    EVENT_LIMITER_STATE_FULL, EVENT_OPEN_CAP_REFUSED, EVENT_OPEN_STATE_FULL, EVENT_RATE_REFUSED,
    EVENTS_MAP, MAX_POD_PARENTS, OPEN_BY_POD_ENTRIES, OPEN_BY_POD_MAP, OpenState, POD_PARENTS_MAP,
    PROBE_MAP, PodParents, WatchConfig,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TIMEOUT_INIT, BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED, bpf_sock, bpf_sock_addr,
        bpf_sock_ops,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sock_ops_cb_flags_set,
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops, socket_filter},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};

/// Return value of a cgroup sock_addr program that lets the connect go ahead.
const ALLOW: i32 = 1;
/// Return value that refuses it: the caller's `connect()` fails with `EPERM`.
const REFUSE: i32 = 0;
/// What a cgroup sock_ops program must always return: 0 makes the kernel discard the `reply` of
/// every sock_ops program on the socket (ours never sets one, others do: timeouts, windows, ECN).
const SOCK_OPS_OK: u32 = 1;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;

/// The third word of a v4-mapped IPv6 address (`::ffff:a.b.c.d`) as the kernel stores it.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

// `#[map(name)]` takes only a literal, and a global's name is its symbol: these asserts tie each
// literal to the name userspace uses.
const _: () = assert!(same(CONFIG_GLOBAL, "CONFIG"));
const _: () = assert!(same(POD_PARENTS_MAP, "POD_PARENTS"));
const _: () = assert!(same(CALLER_BY_COOKIE_MAP, "CALLER_BY_COOKIE"));
const _: () = assert!(same(CALLER_BY_CONN_MAP, "CALLER_BY_CONN"));
const _: () = assert!(same(CONN_BY_COOKIE_MAP, "CONN_BY_COOKIE"));
const _: () = assert!(same(CONNECT_STATE_MAP, "CONNECT_STATE"));
const _: () = assert!(same(OPEN_BY_POD_MAP, "OPEN_BY_POD"));
const _: () = assert!(same(EVENTS_MAP, "EVENTS"));
const _: () = assert!(same(PROBE_MAP, "PROBE"));

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

/// Set by userspace at load (`EbpfLoader::override_global`); the kernel freezes `.rodata`, so the
/// verifier knows these values and drops branches they rule out (the token bucket when the rate
/// is 0). Always read through `read_volatile`, or LLVM would fold the zeroes in.
#[unsafe(no_mangle)]
static CONFIG: WatchConfig = WatchConfig::EMPTY;

#[map(name = "POD_PARENTS")]
static POD_PARENTS: Array<PodParents> = Array::with_max_entries(1, 0);

// Sizes below are the floors; userspace scales them with the node's CPUs at load.

/// Entries live for the span of one `connect()` call (written by connect4/6, consumed at
/// `TCP_CONNECT_CB` in the same call). Only a connect that fails in between (no route, no free
/// port, refused by another program) leaves one behind; cookies are never reused, and a new
/// `connect()` on the same socket overwrites it before anything reads it, so an orphan is never
/// handed out. Userspace prunes orphans older than the record TTL, and LRU makes room on its own.
/// To evict a live entry, a flood would have to cycle the whole map within the microseconds that
/// entry lives.
#[map(name = "CALLER_BY_COOKIE")]
static CALLER_BY_COOKIE: LruHashMap<u64, CallerRecord> =
    LruHashMap::with_max_entries(CALLER_BY_COOKIE_ENTRIES, 0);

/// A plain hash, not LRU: an entry is deleted when its connection closes, never evicted, so one
/// pod's connections cannot push out another's. A pod holds at most `max_open_per_pod` entries;
/// the map is sized for many pods at their cap. Not preallocated: memory follows real use.
#[map(name = "CALLER_BY_CONN")]
static CALLER_BY_CONN: HashMap<ConnKey, CallerRecord> =
    HashMap::with_max_entries(CALLER_BY_CONN_ENTRIES, BPF_F_NO_PREALLOC);

/// The 4-tuple of each connection in [`CALLER_BY_CONN`], by socket cookie, for the sock_release
/// program. Same life, same size, same reasons for a plain hash.
#[map(name = "CONN_BY_COOKIE")]
static CONN_BY_COOKIE: HashMap<u64, ConnKey> =
    HashMap::with_max_entries(CALLER_BY_CONN_ENTRIES, BPF_F_NO_PREALLOC);

/// LRU so that buckets of pods long gone make room on their own if userspace does not prune them;
/// looked up before any insert, so an existing bucket never costs anyone else theirs.
#[map(name = "CONNECT_STATE")]
static CONNECT_STATE: LruHashMap<u64, CgroupConnectState> =
    LruHashMap::with_max_entries(CONNECT_STATE_ENTRIES, 0);

/// A plain hash: counters are never evicted, only removed by userspace for pods that are gone
/// (and if one is removed early, its epoch keeps the count right; see `OpenState::epoch`).
#[map(name = "OPEN_BY_POD")]
static OPEN_BY_POD: HashMap<u64, OpenState> =
    HashMap::with_max_entries(OPEN_BY_POD_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "EVENTS")]
static EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_COUNT, 0);

#[map(name = "PROBE")]
static PROBE: Array<u64> = Array::with_max_entries(1, 0);

/// Counts a rare event (off the fast path: map-full, refusals, contention). Per-CPU, so no cache
/// line bounces between CPUs; still an atomic add, since a preempted program's slot can be
/// updated by another program on the same CPU.
#[inline(always)]
fn count_event(event: u32) {
    if let Some(n) = EVENTS.get_ptr_mut(event) {
        // SAFETY: a live per-CPU array slot.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn agent_connect4(ctx: SockAddrContext) -> i32 {
    connect4::<true>(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn agent_connect4_no_limiter(ctx: SockAddrContext) -> i32 {
    connect4::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn agent_connect6(ctx: SockAddrContext) -> i32 {
    connect6::<true>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn agent_connect6_no_limiter(ctx: SockAddrContext) -> i32 {
    connect6::<false>(&ctx)
}

/// The watched IPv4 listener, from the global.
#[inline(always)]
fn watched4() -> (u32, u16) {
    // SAFETY: a plain global; volatile so that the value set at load is read, not the zero.
    unsafe {
        (
            read_volatile(addr_of!(CONFIG.ip4)),
            read_volatile(addr_of!(CONFIG.port4)),
        )
    }
}

/// The watched IPv6 listener, from the global.
#[inline(always)]
fn watched6() -> ([u32; 4], u16) {
    // SAFETY: as in watched4.
    unsafe {
        (
            [
                read_volatile(addr_of!(CONFIG.ip6[0])),
                read_volatile(addr_of!(CONFIG.ip6[1])),
                read_volatile(addr_of!(CONFIG.ip6[2])),
                read_volatile(addr_of!(CONFIG.ip6[3])),
            ],
            read_volatile(addr_of!(CONFIG.port6)),
        )
    }
}

#[inline(always)]
fn connect4<const LIMITER: bool>(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid bpf_sock_addr; fields are read at constant offsets.
    let (ip4, port) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_ip4)),
            read_volatile(addr_of!((*sa).user_port)),
        )
    };
    let (watch_ip4, watch_port4) = watched4();
    if watch_port4 == 0 || ip4 != watch_ip4 || port_of_user_port(port) != watch_port4 {
        return ALLOW;
    }
    on_watched_connect::<LIMITER>(ctx)
}

#[inline(always)]
fn connect6<const LIMITER: bool>(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4; the verifier wants the IPv6 address one u32 at a time.
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
    if !is_agent6(ip6, port_of_user_port(port)) {
        return ALLOW;
    }
    on_watched_connect::<LIMITER>(ctx)
}

/// Whether an IPv6 destination is the agent: its IPv6 listener, or its IPv4 one v4-mapped (a v4
/// client on an `AF_INET6` socket, `::ffff:a.b.c.d`, triggers only connect6).
#[inline(always)]
fn is_agent6(ip6: [u32; 4], port: u16) -> bool {
    let (watch_ip6, watch_port6) = watched6();
    let (watch_ip4, watch_port4) = watched4();
    let to_ip6 = watch_port6 != 0 && port == watch_port6 && ip6 == watch_ip6;
    let to_ip4 = watch_port4 != 0
        && port == watch_port4
        && ip6[0] == 0
        && ip6[1] == 0
        && ip6[2] == V4_MAPPED_WORD
        && ip6[3] == watch_ip4;
    to_ip6 || to_ip4
}

/// `user_port` is a network-order u16 in the low 16 bits.
#[inline(always)]
fn port_of_user_port(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// A connect to the agent: check the pod's open-connection cap and token bucket, then record the
/// caller under the socket cookie.
#[inline(always)]
fn on_watched_connect<const LIMITER: bool>(ctx: &SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in connect4.
    let sock_type = unsafe { read_volatile(addr_of!((*sa).type_)) };
    // Only TCP connections are ever accepted: a UDP record would never be consumed.
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    // SAFETY: helpers allowed in cgroup sock_addr programs (5.7+), no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let pod_cgroup_id = pod_cgroup_id();
    let pod_key = if pod_cgroup_id != 0 {
        pod_cgroup_id
    } else {
        cgroup_id
    };
    // SAFETY: a plain global, see CONFIG.
    let (max_open, limit) = unsafe {
        (
            read_volatile(addr_of!(CONFIG.max_open_per_pod)),
            read_volatile(addr_of!(CONFIG.limit)),
        )
    };
    // The cap first: a pod at its cap is refused without spending a token.
    if max_open != 0 && at_open_cap(pod_key, max_open) {
        count_event(EVENT_OPEN_CAP_REFUSED);
        return REFUSE;
    }
    if LIMITER && limit.rate != 0 && !take_token(pod_key, limit) {
        count_event(EVENT_RATE_REFUSED);
        return REFUSE;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let record = CallerRecord {
        cgroup_id,
        // SAFETY: helpers allowed in cgroup sock_addr programs, called with our own context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        pod_cgroup_id,
        // SAFETY: helper with no arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
        open_epoch: 0,
    };
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A failed record must not break the caller's connect: the agent then sees no record, that's all.
    if CALLER_BY_COOKIE
        .insert(cookie, record, BPF_ANY.into())
        .is_err()
    {
        count_event(EVENT_COOKIE_RECORD_FAILED);
    }
    ALLOW
}

/// The pod cgroup of the calling task: for the first pod parent (deepest first) that is its
/// ancestor, the ancestor one level below it. 0 when none is (or the task sits in a parent itself).
///
/// Checking `kubepods/burstable` before `kubepods` is what places a Guaranteed pod (directly under
/// `kubepods`) and a Burstable one (under `kubepods/burstable`) both right.
#[inline(always)]
fn pod_cgroup_id() -> u64 {
    let Some(parents) = POD_PARENTS.get_ptr(0) else {
        return 0;
    };
    // SAFETY: a live array value; userspace rewrites it only when a parent appears.
    let count = unsafe { read_volatile(addr_of!((*parents).count)) } as usize;
    let mut i = 0;
    while i < MAX_POD_PARENTS && i < count {
        // SAFETY: as above; `i` is below the array's length.
        let (id, level) = unsafe {
            (
                read_volatile(addr_of!((*parents).parents[i].id)),
                read_volatile(addr_of!((*parents).parents[i].level)),
            )
        };
        // The helper returns 0 for a level deeper than the task's own cgroup.
        // SAFETY: helper allowed in cgroup sock_addr programs (5.7+), any level is valid.
        if id != 0 && unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) } == id {
            // SAFETY: as above.
            return unsafe { bpf_get_current_ancestor_cgroup_id(level as i32 + 1) };
        }
        i += 1;
    }
    0
}

/// Whether the pod already holds `max_open` connections to the agent. Read without a lock: a burst
/// of concurrent connects may overshoot the cap by the number of threads racing, no more.
#[inline(always)]
fn at_open_cap(pod_key: u64, max_open: u32) -> bool {
    let Some(state) = OPEN_BY_POD.get_ptr_mut(pod_key) else {
        return false;
    };
    // SAFETY: a live map value; other CPUs update it with atomics, an aligned load is atomic.
    unsafe {
        if read_volatile(addr_of!((*state).open)) < u64::from(max_open) {
            return false;
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(addr_of_mut!((*state).refused), 1);
    }
    true
}

/// Whether the pod's token bucket lets one more connect through. Only in the limiter programs.
#[inline(always)]
fn take_token(pod_key: u64, limit: ConnectLimit) -> bool {
    // Look up first and insert only on a miss: an LRU update takes a free node before it checks
    // whether the key exists, and when the map is full that means evicting someone's bucket.
    let state = match CONNECT_STATE.get_ptr_mut(pod_key) {
        Some(state) => state,
        None => {
            // NOEXIST keeps the bucket of a concurrent creator.
            let _ =
                CONNECT_STATE.insert(pod_key, CgroupConnectState::default(), BPF_NOEXIST.into());
            match CONNECT_STATE.get_ptr_mut(pod_key) {
                Some(state) => state,
                None => {
                    // No room: don't punish the caller for it.
                    count_event(EVENT_LIMITER_STATE_FULL);
                    return true;
                }
            }
        }
    };
    // SAFETY: `state` points into a map value that stays valid for this program run; every access
    // is atomic because other CPUs update the same value.
    unsafe {
        let (counter, allowed) = match gcra_admit(addr_of_mut!((*state).tat_ns), limit) {
            Admit::Yes => (addr_of_mut!((*state).allowed), true),
            Admit::No => (addr_of_mut!((*state).denied), false),
            Admit::Contended => {
                count_event(EVENT_LIMITER_CONTENDED);
                (addr_of_mut!((*state).contended), true)
            }
        };
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1);
        allowed
    }
}

enum Admit {
    Yes,
    No,
    /// Every compare-and-swap lost to another CPU: let through, never refused.
    Contended,
}

/// The bucket as GCRA: `tat` is when the bucket will be full again plus one interval. A connect is
/// allowed if, after adding one interval, `tat` is at most `burst` intervals ahead of now. One word,
/// updated with compare-and-swap, so CPUs never race.
///
/// Why contention lets the connect through: a lost compare-and-swap means another CPU just moved
/// `tat`, i.e. just admitted a connect of the same pod. Every retry re-reads `tat` and decides
/// again, so a refusal is only ever the bucket's own answer on a value it read. Losing all four
/// rounds takes four other admissions landing inside this program's few-instruction window, one
/// after the other; letting the connect through then leaks at most one connect per four admitted
/// ones, and only under that contention, while a refusal would punish a pod for the kernel's
/// scheduling. Counted (`contended`, `EVENT_LIMITER_CONTENDED`) so that it shows if it ever happens.
///
/// # Safety
/// `tat` must point to a live map value word.
#[inline(always)]
unsafe fn gcra_admit(tat: *mut u64, limit: ConnectLimit) -> Admit {
    let interval = 1_000_000_000 / u64::from(limit.rate);
    let tolerance = interval * u64::from(limit.burst.max(1));
    // SAFETY: helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // Bounded retries keep the verifier happy.
    let mut i = 0;
    while i < 4 {
        // An aligned 64-bit load is single-copy atomic; an atomic-load intrinsic would need
        // load-acquire (cpu v4), and the compare-and-swap below catches a stale value anyway.
        // SAFETY: the caller guarantees `tat` is valid.
        let old = unsafe { read_volatile(tat) };
        let new = if old > now { old } else { now } + interval;
        if new - now > tolerance {
            return Admit::No;
        }
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                tat, old, new,
            )
        };
        if swapped {
            return Admit::Yes;
        }
        i += 1;
    }
    Admit::Contended
}

#[sock_ops]
pub fn agent_sock_ops(ctx: SockOpsContext) -> u32 {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: the kernel hands us a valid bpf_sock_ops; fields are read at constant offsets.
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    // Every TCP socket of the node comes through here, for many ops: leave at once unless it is
    // one of ours, and before any helper or map call.
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return SOCK_OPS_OK;
    }
    let f = SockOpsFields::read(ops);
    if !f.to_agent() {
        return SOCK_OPS_OK;
    }
    let Some(key) = f.conn_key() else {
        return SOCK_OPS_OK;
    };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        on_tcp_connect(&ctx, key);
    } else if f.new_state == BPF_TCP_ESTABLISHED {
        // The record's age is what the agent checks on accept: count it from the handshake, so a
        // connect whose SYN had to be retransmitted is not taken for a stale one.
        if let Some(record) = CALLER_BY_CONN.get_ptr_mut(key) {
            // SAFETY: a live map value; userspace only reads it.
            unsafe { write_volatile(addr_of_mut!((*record).ktime_ns), bpf_ktime_get_ns()) };
        }
    } else if f.new_state == BPF_TCP_CLOSE {
        // The socket's addresses are still set here (the callback runs before the state change
        // unbinds the port), whichever way it closes: reset, refused, timed out, disconnected.
        release(key);
        // SAFETY: helper allowed in sock_ops, called with our own context.
        let _ = CONN_BY_COOKIE.remove(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) });
    }
    SOCK_OPS_OK
}

/// `TCP_CONNECT_CB`, still in the caller's `connect()`: the source port is bound now.
#[inline(always)]
fn on_tcp_connect(ctx: &SockOpsContext, key: ConnKey) {
    // A record left under this 4-tuple belongs to a socket whose end we never saw (that socket is
    // gone: this one could not have its tuple otherwise). It must not be handed to this connection.
    if CALLER_BY_CONN.get_ptr(key).is_some() {
        release(key);
        count_event(EVENT_LEFTOVER_REMOVED);
    }
    // SAFETY: helper allowed in sock_ops, called with our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(mut record) = (unsafe { CALLER_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let _ = CALLER_BY_COOKIE.remove(cookie);
    // SAFETY: a plain global, see CONFIG.
    if unsafe { read_volatile(addr_of!(CONFIG.max_open_per_pod)) } != 0 {
        record.open_epoch = open_add(record.pod_key());
    }
    if CALLER_BY_CONN
        .insert(key, record, BPF_NOEXIST.into())
        .is_err()
    {
        count_event(EVENT_CONN_RECORD_FAILED);
        open_sub(record.pod_key(), record.open_epoch);
        return;
    }
    // Without this entry a release would not find the record; the state callback below still
    // would, at TCP_CLOSE.
    if CONN_BY_COOKIE.insert(cookie, key, BPF_ANY.into()).is_err() {
        count_event(EVENT_CONN_RECORD_FAILED);
    }
    // Ask for this socket's state changes (and only this socket's), so that its record and count
    // go when it reaches TCP_CLOSE. Other programs' flags are kept.
    // SAFETY: as above; the flags field is read at a constant offset.
    let flags = unsafe { read_volatile(addr_of!((*ctx.ops).bpf_sock_ops_cb_flags)) };
    // SAFETY: helper allowed in sock_ops, called with our own context.
    let _ =
        unsafe { bpf_sock_ops_cb_flags_set(ctx.ops, (flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32) };
}

/// A socket is released (its last file reference closed): if it was a connection to the agent,
/// delete its record and uncount it. Runs for every inet socket released in the cgroup tree.
#[cgroup_sock(sock_release)]
pub fn agent_sock_release(ctx: SockContext) -> i32 {
    let sk: *mut bpf_sock = ctx.sock;
    // Fields only, every one read before any branch (see SockOpsFields::read), and compared with
    // the global: an unrelated socket costs no helper and no map call.
    // SAFETY: the kernel hands us a valid bpf_sock; fields are read at constant offsets.
    let (family, protocol, port, ip4, ip6) = unsafe {
        (
            read_volatile(addr_of!((*sk).family)),
            read_volatile(addr_of!((*sk).protocol)),
            u16::from_be(read_volatile(addr_of!((*sk).dst_port))),
            read_volatile(addr_of!((*sk).dst_ip4)),
            [
                read_volatile(addr_of!((*sk).dst_ip6[0])),
                read_volatile(addr_of!((*sk).dst_ip6[1])),
                read_volatile(addr_of!((*sk).dst_ip6[2])),
                read_volatile(addr_of!((*sk).dst_ip6[3])),
            ],
        )
    };
    if protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let to_agent = match family {
        AF_INET => {
            let (watch_ip4, watch_port4) = watched4();
            watch_port4 != 0 && port == watch_port4 && ip4 == watch_ip4
        }
        AF_INET6 => is_agent6(ip6, port),
        _ => false,
    };
    if !to_agent {
        return ALLOW;
    }
    // SAFETY: helper allowed in cgroup sock programs, called with our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(key) = (unsafe { CONN_BY_COOKIE.get(cookie) }).copied() {
        release(key);
        let _ = CONN_BY_COOKIE.remove(cookie);
    }
    ALLOW
}

/// The connection is over: delete its record, and uncount it. The delete decides: whoever deletes
/// the record uncounts it, so each count is undone exactly once.
#[inline(always)]
fn release(key: ConnKey) {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(record) = (unsafe { CALLER_BY_CONN.get(key) }).copied() else {
        return;
    };
    if CALLER_BY_CONN.remove(key).is_ok() {
        open_sub(record.pod_key(), record.open_epoch);
    }
}

/// One more open connection for the pod: the counter's epoch, or 0 if no counter could be made
/// (map full; the connection then goes uncounted).
#[inline(always)]
fn open_add(pod_key: u64) -> u64 {
    let state = match OPEN_BY_POD.get_ptr_mut(pod_key) {
        Some(state) => state,
        None => {
            let fresh = OpenState {
                // SAFETY: helper with no arguments. `| 1`: never 0, which means "not counted".
                epoch: unsafe { bpf_ktime_get_ns() } | 1,
                open: 0,
                refused: 0,
            };
            // NOEXIST keeps a concurrent creator's counter, and its epoch is the one read below.
            let _ = OPEN_BY_POD.insert(pod_key, fresh, BPF_NOEXIST.into());
            match OPEN_BY_POD.get_ptr_mut(pod_key) {
                Some(state) => state,
                None => {
                    count_event(EVENT_OPEN_STATE_FULL);
                    return 0;
                }
            }
        }
    };
    // SAFETY: a live map value; `epoch` never changes after creation, `open` is updated
    // atomically by every CPU.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(addr_of_mut!((*state).open), 1);
        read_volatile(addr_of!((*state).epoch))
    }
}

/// One open connection fewer, on the counter it was counted in: none if it was not counted, or if
/// that counter is gone (userspace removed it; a newer one has another epoch).
#[inline(always)]
fn open_sub(pod_key: u64, epoch: u64) {
    if epoch == 0 {
        return;
    }
    if let Some(state) = OPEN_BY_POD.get_ptr_mut(pod_key) {
        // SAFETY: as in open_add; adding !0 subtracts one.
        unsafe {
            if read_volatile(addr_of!((*state).epoch)) == epoch {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    addr_of_mut!((*state).open),
                    u64::MAX,
                );
            }
        }
    }
}

/// The `bpf_sock_ops` fields the programs need.
struct SockOpsFields {
    family: u32,
    remote_port: u32,
    local_port: u32,
    remote_ip4: u32,
    local_ip4: u32,
    remote_ip6: [u32; 4],
    local_ip6: [u32; 4],
    /// `args[1]` of `BPF_SOCK_OPS_STATE_CB`: the state the socket enters.
    new_state: u32,
}

impl SockOpsFields {
    /// Every field is read unconditionally, before looking at the family: reads under a branch get
    /// merged by LLVM into one load from a computed ctx offset, which the verifier rejects.
    #[inline(always)]
    fn read(ops: *mut bpf_sock_ops) -> SockOpsFields {
        // SAFETY: a valid bpf_sock_ops; constant offsets; one u32 at a time for the IPv6 arrays.
        unsafe {
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
                new_state: read_volatile(addr_of!((*ops).__bindgen_anon_1.args[1])),
            }
        }
    }

    /// `remote_port` is a network-order u16 in the high 16 bits.
    #[inline(always)]
    fn remote_port(&self) -> u16 {
        u16::from_be((self.remote_port >> 16) as u16)
    }

    /// Whether the peer is the agent's listener: compares against the global only.
    #[inline(always)]
    fn to_agent(&self) -> bool {
        let port = self.remote_port();
        match self.family {
            AF_INET => {
                let (watch_ip4, watch_port4) = watched4();
                watch_port4 != 0 && port == watch_port4 && self.remote_ip4 == watch_ip4
            }
            AF_INET6 => is_agent6(self.remote_ip6, port),
            _ => false,
        }
    }

    /// The connection as the server will name it. The client is the local end here.
    #[inline(always)]
    fn conn_key(&self) -> Option<ConnKey> {
        let (client, server) = match self.family {
            AF_INET => (v4_mapped(self.local_ip4), v4_mapped(self.remote_ip4)),
            // A v4-mapped peer on an AF_INET6 socket already reads `::ffff:a.b.c.d` here, which
            // is exactly how v4 addresses are stored in the key.
            AF_INET6 => (self.local_ip6, self.remote_ip6),
            _ => return None,
        };
        Some(ConnKey {
            client_addr: words_to_bytes(client),
            server_addr: words_to_bytes(server),
            client_port: self.local_port as u16,
            server_port: self.remote_port(),
            _pad: 0,
        })
    }
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

/// Feature probe, never attached: it loads only where the kernel's verifier knows 64-bit
/// compare-and-swap (5.12+), which is what the token bucket needs.
#[socket_filter]
pub fn probe_cmpxchg64(_ctx: SkBuffContext) -> i64 {
    if let Some(word) = PROBE.get_ptr_mut(0) {
        // SAFETY: a live array value.
        let _ = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(word, 0, 1)
        };
    }
    0
}

/// For tests only, never attached by the agent: someone else's sock_ops program, attached beside
/// ours. It sets a `reply` (the longest initial SYN timeout, which the kernel caps at
/// `TCP_RTO_MAX`), to prove that ours does not make the kernel discard it; and, carelessly, it
/// clears every callback flag of an established socket, ours included, to prove that records are
/// released at close without our state callback.
#[sock_ops]
pub fn test_sock_ops_other(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    // SAFETY: a valid bpf_sock_ops, constant offsets; the helper is allowed in sock_ops.
    unsafe {
        match read_volatile(addr_of!((*ops).op)) {
            BPF_SOCK_OPS_TIMEOUT_INIT => {
                write_volatile(addr_of_mut!((*ops).__bindgen_anon_1.reply), i32::MAX as u32);
            }
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                let _ = bpf_sock_ops_cb_flags_set(ops, 0);
            }
            _ => {}
        }
    }
    SOCK_OPS_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
