//! A connection's record and its place in its pod's count: made at `TCP_CONNECT_CB` from what
//! connect4/6 noted, deleted when the connection ends, by the socket that made it and no other.
//!
//! The delete decides: whoever deletes a record uncounts it, so each count is undone exactly once.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use agent_common::{
    CallerRecord, ConnKey, EVENT_CONN_RECORD_FAILED, EVENT_FOREIGN_RELEASE, EVENT_LEFTOVER_REMOVED,
    EVENT_OPEN_STATE_FULL, EVENT_RECORD_MISSING, EVENT_TUPLE_COLLISION, OpenState,
};
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};

use crate::maps::{
    CALLER_BY_CONN, CALLER_BY_COOKIE, CONFIG, CONN_BY_COOKIE, OPEN_BY_POD, count_event,
};

/// What became of a connection's record at `TCP_CONNECT_CB`.
pub enum Recorded {
    Yes,
    /// Its 4-tuple is another namespace's record for now; this one stays pending under the
    /// cookie until the handshake decides (see [`on_established`]).
    Contested,
    No,
}

/// `TCP_CONNECT_CB` of socket `cookie` with 4-tuple `key`: moves the record connect4/6 noted under
/// the cookie to the 4-tuple, stamped with the cookie, and counts the connection for its pod.
///
/// The 4-tuple is what the agent sees after `accept()`, in its own namespace: O(1) to look up, but
/// a pod with its own network namespace (or `IP_TRANSPARENT`) can make a socket with another
/// pod's 4-tuple. Within one namespace the kernel lets no two live sockets share a 4-tuple, so a
/// record of the same namespace is a leftover and goes; one of another namespace stays until a
/// handshake tells the real peer apart.
#[inline(always)]
pub fn record_connection(cookie: u64, key: ConnKey) -> Recorded {
    // SAFETY: the value is copied out.
    let Some(record) = (unsafe { CALLER_BY_COOKIE.get(cookie) }).copied() else {
        count_event(EVENT_RECORD_MISSING);
        return Recorded::No;
    };
    // SAFETY: the value is copied out.
    if let Some(owner) = (unsafe { CALLER_BY_CONN.get(key) }).copied() {
        if owner.netns_cookie != record.netns_cookie {
            count_event(EVENT_TUPLE_COLLISION);
            return Recorded::Contested;
        }
        if CALLER_BY_CONN.remove(key).is_ok() {
            open_sub(owner.pod_key(), owner.open_epoch);
            count_event(EVENT_LEFTOVER_REMOVED);
        }
    }
    let _ = CALLER_BY_COOKIE.remove(cookie);
    insert(cookie, key, record)
}

/// `ACTIVE_ESTABLISHED_CB`: the client socket got the agent's SYN-ACK, and its ACK has not left,
/// so the agent cannot have accepted the connection yet. Marks its record established. A 4-tuple
/// another namespace's socket holds, not established, is taken over: the agent's SYN-ACK went to
/// this socket, so the other can never be the agent's peer.
#[inline(always)]
pub fn on_established(cookie: u64, key: ConnKey) {
    // SAFETY: helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(record) = CALLER_BY_CONN.get_ptr_mut(key) {
        // SAFETY: a live map value; userspace only reads it.
        unsafe {
            if read_volatile(addr_of!((*record).sock_cookie)) == cookie {
                // The age the agent checks counts from here, so a connect whose SYN had to be
                // retransmitted is not taken for a stale one.
                write_volatile(addr_of_mut!((*record).ktime_ns), now);
                write_volatile(addr_of_mut!((*record).established), 1);
                return;
            }
            if read_volatile(addr_of!((*record).established)) != 0 {
                return;
            }
        }
    }
    // SAFETY: the value is copied out before the entry is removed.
    let Some(mut mine) = (unsafe { CALLER_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let _ = CALLER_BY_COOKIE.remove(cookie);
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(owner) = (unsafe { CALLER_BY_CONN.get(key) }).copied()
        && CALLER_BY_CONN.remove(key).is_ok()
    {
        open_sub(owner.pod_key(), owner.open_epoch);
    }
    mine.ktime_ns = now;
    mine.established = 1;
    let _ = insert(cookie, key, mine);
}

/// Writes `record` under `key`, stamped with the socket's cookie and counted for its pod.
#[inline(always)]
fn insert(cookie: u64, key: ConnKey, mut record: CallerRecord) -> Recorded {
    record.sock_cookie = cookie;
    // SAFETY: a plain global, see CONFIG.
    if unsafe { read_volatile(addr_of!(CONFIG.max_open_per_pod)) } != 0 {
        record.open_epoch = open_add(record.pod_key());
    }
    // NOEXIST: a racing socket of another namespace loses here instead of overwriting.
    if CALLER_BY_CONN
        .insert(key, record, BPF_NOEXIST.into())
        .is_err()
    {
        count_event(EVENT_CONN_RECORD_FAILED);
        open_sub(record.pod_key(), record.open_epoch);
        return Recorded::No;
    }
    // Without this entry a release would not find the record; the state callback still would.
    if CONN_BY_COOKIE.insert(cookie, key, BPF_ANY.into()).is_err() {
        count_event(EVENT_CONN_RECORD_FAILED);
    }
    Recorded::Yes
}

/// Socket `cookie`'s connection `key` is over: delete its record, and uncount it. A record another
/// socket made (same 4-tuple, other namespace) is left alone.
#[inline(always)]
pub fn release(key: ConnKey, cookie: u64) {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(record) = (unsafe { CALLER_BY_CONN.get(key) }).copied() else {
        return;
    };
    if record.sock_cookie != cookie {
        count_event(EVENT_FOREIGN_RELEASE);
        return;
    }
    if CALLER_BY_CONN.remove(key).is_ok() {
        open_sub(record.pod_key(), record.open_epoch);
    }
}

/// The pod's open-connection counter, made if missing; `None` if none can be made (map full,
/// counted).
#[inline(always)]
pub fn open_state(pod_key: u64) -> Option<*mut OpenState> {
    if let Some(state) = OPEN_BY_POD.get_ptr_mut(pod_key) {
        return Some(state);
    }
    let fresh = OpenState {
        // SAFETY: helper with no arguments. `| 1`: never 0, which means "not counted".
        epoch: unsafe { bpf_ktime_get_ns() } | 1,
        open: 0,
        refused: 0,
    };
    // NOEXIST keeps a concurrent creator's counter, and its epoch is the one read after.
    let _ = OPEN_BY_POD.insert(pod_key, fresh, BPF_NOEXIST.into());
    let state = OPEN_BY_POD.get_ptr_mut(pod_key);
    if state.is_none() {
        count_event(EVENT_OPEN_STATE_FULL);
    }
    state
}

/// One more open connection for the pod: the counter's epoch, or 0 if no counter could be made
/// (connect4/6 made it a moment ago; only a prune in between loses it).
#[inline(always)]
fn open_add(pod_key: u64) -> u64 {
    let Some(state) = open_state(pod_key) else {
        return 0;
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

/// A record of this socket still pending under its cookie (its `connect()` failed before
/// `TCP_CONNECT_CB`): gone with the socket.
#[inline(always)]
pub fn forget_pending(cookie: u64) {
    let _ = CALLER_BY_COOKIE.remove(cookie);
}
