//! `sockops`, for sockets to the agent only (checked before any helper or map call): at
//! `BPF_SOCK_OPS_TCP_CONNECT_CB` move the record from the cookie to the connection's 4-tuple (which
//! the agent can compute after `accept()`; see `record`), turn on TCP keepalive, and ask for the
//! socket's state changes; at `ACTIVE_ESTABLISHED_CB` mark it established (and settle a 4-tuple
//! two namespaces claim); when the socket enters `TCP_CLOSE_WAIT` (the agent closed its end) or
//! `TCP_CLOSE`, delete the record and uncount it. Always returns 1, so that the replies of other
//! sock_ops programs on the node stand.
//!
//! Also a sock_ops program used only by tests (`test_sock_ops_other`).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use agent_common::ConnKey;
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TIMEOUT_INIT, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT,
        bpf_sock_ops,
    },
    helpers::{bpf_get_socket_cookie, bpf_setsockopt, bpf_sock_ops_cb_flags_set},
    macros::sock_ops,
    programs::SockOpsContext,
};

use crate::{
    maps::CONN_BY_COOKIE,
    record::{Recorded, forget_pending, on_established, record_connection, release},
    util::{AF_INET, AF_INET6, SOCK_OPS_OK, is_agent6, v4_mapped, watched4, words_to_bytes},
};

const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
/// Keepalive on the client socket, in seconds: idle time, interval, probes. A connection the agent
/// never accepted (SYN cookies, accept-queue overflow) looks established to the client; the first
/// probe meets a reset once the agent's side has forgotten it, and the record goes with the
/// socket. Connections the agent holds answer the probes and are not disturbed.
const KEEPALIVE: [(i32, i32, i32); 4] = [
    (SOL_SOCKET, SO_KEEPALIVE, 1),
    (SOL_TCP, TCP_KEEPIDLE, 10),
    (SOL_TCP, TCP_KEEPINTVL, 3),
    (SOL_TCP, TCP_KEEPCNT, 2),
];

#[sock_ops]
pub fn agent_sock_ops(ctx: SockOpsContext) -> u32 {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: the kernel hands us a valid bpf_sock_ops; fields are read at constant offsets.
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    // Every TCP socket of the node comes through here, for many ops: leave at once unless it is
    // one of ours, and before any helper or map call.
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return SOCK_OPS_OK;
    }
    let f = SockOpsFields::read(ops);
    if !f.to_agent() {
        return SOCK_OPS_OK;
    }
    let Some(key) = f.conn_key() else {
        return SOCK_OPS_OK;
    };
    // SAFETY: helper allowed in sock_ops, called with our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Still in the caller's `connect()`: the source port is bound now.
        match record_connection(cookie, key) {
            Recorded::Yes | Recorded::Contested => watch_socket(&ctx),
            Recorded::No => {}
        }
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // Called for every socket, whatever its callback flags: another program clearing ours
        // cannot keep a record from being marked established.
        on_established(cookie, key);
    } else if f.new_state == BPF_TCP_CLOSE || f.new_state == BPF_TCP_CLOSE_WAIT {
        // CLOSE_WAIT: the agent closed its end, so the connection is over for the agent, whatever
        // the client does with its own. CLOSE: reset, refused, timed out, disconnected. The
        // socket's addresses are still set here (the callback runs before the state change
        // unbinds the port).
        release(key, cookie);
        forget_pending(cookie);
        let _ = CONN_BY_COOKIE.remove(cookie);
    }
    SOCK_OPS_OK
}

/// Asks for this socket's state changes (and only this socket's), so that its record and count go
/// when the connection ends; other programs' flags are kept. Turns keepalive on (see
/// [`KEEPALIVE`]); where the kernel refuses an option the state callback still does the rest.
#[inline(always)]
fn watch_socket(ctx: &SockOpsContext) {
    // SAFETY: the flags field is read at a constant offset.
    let flags = unsafe { read_volatile(addr_of!((*ctx.ops).bpf_sock_ops_cb_flags)) };
    // SAFETY: helper allowed in sock_ops, called with our own context.
    let _ =
        unsafe { bpf_sock_ops_cb_flags_set(ctx.ops, (flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32) };
    let mut i = 0;
    while i < KEEPALIVE.len() {
        let (level, name, value) = KEEPALIVE[i];
        let mut value = value;
        // SAFETY: helper allowed in sock_ops at TCP_CONNECT_CB (the socket is locked); `value`
        // is a live stack int of the length given.
        let _ = unsafe {
            bpf_setsockopt(
                ctx.as_ptr(),
                level,
                name,
                addr_of_mut!(value).cast(),
                core::mem::size_of::<i32>() as i32,
            )
        };
        i += 1;
    }
}

/// The `bpf_sock_ops` fields the programs need.
pub struct SockOpsFields {
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
