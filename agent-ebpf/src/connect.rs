//! `cgroup/connect4` and `cgroup/connect6`: on a `connect()` to the agent's listener, apply the
//! open-connection cap and token bucket of the caller's pod (every caller outside pods shares one
//! key), and record the caller under the socket cookie. Every other connect on the node is let
//! through after a few loads and compares against the `.rodata` global: no helper, no map lookup.
//!
//! Nothing goes uncounted: a pod whose counter or record cannot be made is refused (`EPERM`), never
//! let through unlimited.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::{addr_of, addr_of_mut, read_volatile},
};

use agent_common::{
    CallerRecord, EVENT_COOKIE_RECORD_FAILED, EVENT_OPEN_CAP_REFUSED, EVENT_RATE_REFUSED,
    MAX_POD_PARENTS, pod_key,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    limiter::take_token,
    maps::{CALLER_BY_COOKIE, CONFIG, POD_PARENTS, count_event},
    record::open_state,
    util::{ALLOW, REFUSE, SOCK_STREAM, is_agent6, port_of_user_port, watched4},
};

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

/// A connect to the agent: check the pod's open-connection cap and token bucket, then record the
/// caller under the socket cookie. Whatever cannot be counted or recorded is refused.
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
    // Outside pods, one key for all: a node user's many cgroups share one budget.
    let pod_key = pod_key(pod_cgroup_id);
    // SAFETY: a plain global, see CONFIG.
    let (max_open, limit) = unsafe {
        (
            read_volatile(addr_of!(CONFIG.max_open_per_pod)),
            read_volatile(addr_of!(CONFIG.limit)),
        )
    };
    // The cap first: a pod at its cap is refused without spending a token.
    if max_open != 0 && at_open_cap(pod_key, max_open) {
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
        sock_cookie: 0,
        established: 0,
        _pad: 0,
    };
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A connection the kernel cannot vouch for would reach the agent unrecorded: refuse it here,
    // where the caller gets an error at once and nothing is left to count.
    if CALLER_BY_COOKIE
        .insert(cookie, record, BPF_ANY.into())
        .is_err()
    {
        count_event(EVENT_COOKIE_RECORD_FAILED);
        return REFUSE;
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

/// Whether the pod already holds `max_open` connections to the agent, or has no counter and none
/// can be made (then nothing could count this connection: refused too). Read without a lock: a
/// burst of concurrent connects may overshoot the cap by the number of threads racing, no more.
/// Counts the refusal.
#[inline(always)]
fn at_open_cap(pod_key: u64, max_open: u32) -> bool {
    let Some(state) = open_state(pod_key) else {
        return true;
    };
    // SAFETY: a live map value; other CPUs update it with atomics, an aligned load is atomic.
    unsafe {
        if read_volatile(addr_of!((*state).open)) < u64::from(max_open) {
            return false;
        }
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(addr_of_mut!((*state).refused), 1);
    }
    count_event(EVENT_OPEN_CAP_REFUSED);
    true
}
