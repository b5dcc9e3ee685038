//! The agent's eBPF programs, attached at the cgroup v2 root so they see every process on the node.
//!
//! - `cgroup/connect4`, `cgroup/connect6` (two builds of each, see below): on a `connect()` to the
//!   agent's listener, apply the pod's open-connection cap and token bucket (every caller outside
//!   pods shares one), and record the caller under the socket cookie; refuse what cannot be
//!   counted or recorded. Every other connect on the node is let through after a few loads and
//!   compares against a `.rodata` global: no helper, no map lookup.
//! - `sockops`: for sockets to the agent only (checked before any helper or map call), at
//!   `BPF_SOCK_OPS_TCP_CONNECT_CB` move the record from the cookie to the connection's 4-tuple (which
//!   the agent can compute after `accept()`), stamped with the socket cookie (a 4-tuple recorded
//!   from another network namespace stays its first owner's), count the connection as open for
//!   its pod and turn keepalive on; when the socket enters `TCP_CLOSE_WAIT` or `TCP_CLOSE`, delete
//!   the record and uncount it, only if the socket made it. Always returns 1, so that the
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
//! One file per program (`connect`, `sock_ops`, `sock_release`, `limiter` for the connect
//! programs' token bucket, `probe`), beside the maps (`maps`), the record's life (`record`) and
//! shared helpers (`util`).
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

mod connect;
mod limiter;
mod maps;
mod probe;
mod record;
mod sock_ops;
mod sock_release;
mod util;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
