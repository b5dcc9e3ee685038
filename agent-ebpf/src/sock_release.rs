//! `cgroup/sock_release`: when a socket to the agent is released, delete its record and uncount
//! it, as sock_ops does at `TCP_CLOSE` (whichever of the two comes first does it). Two ways
//! because each misses a case the other sees: the state callback is a per-socket flag that
//! another sock_ops program could clear, and at release a socket whose connect failed or was
//! disconnected may no longer name its peer.
//!
//! It also drops the pending record of a socket whose `connect()` failed before
//! `TCP_CONNECT_CB` (no route, no free port): such a socket never named its peer.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext, bindings::bpf_sock, helpers::bpf_get_socket_cookie, macros::cgroup_sock,
    programs::SockContext,
};

use crate::{
    maps::CONN_BY_COOKIE,
    record::{forget_pending, release},
    util::{AF_INET, AF_INET6, ALLOW, IPPROTO_TCP, is_agent6, watched4},
};

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
    // A socket that never named a peer may hold a pending record (its connect to the agent
    // failed early); the only other TCP sockets released without a peer are listeners and
    // sockets never connected, rare enough for one map delete.
    if !to_agent && port != 0 {
        return ALLOW;
    }
    // SAFETY: helper allowed in cgroup sock programs, called with our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    forget_pending(cookie);
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(key) = (unsafe { CONN_BY_COOKIE.get(cookie) }).copied() {
        release(key, cookie);
        let _ = CONN_BY_COOKIE.remove(cookie);
    }
    ALLOW
}
