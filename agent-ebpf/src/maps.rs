//! The maps and the `.rodata` global the programs share, and the node-wide event counters.
//!
//! Sizes here are placeholders: userspace sets every map's size at load, from the pod count and the
//! per-pod cap (`agent/src/ebpf/sizes.rs`).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use agent_common::{
    CALLER_BY_CONN_ENTRIES, CALLER_BY_CONN_MAP, CALLER_BY_COOKIE_ENTRIES, CALLER_BY_COOKIE_MAP,
    CONFIG_GLOBAL, CONN_BY_COOKIE_MAP, CONNECT_STATE_ENTRIES, CONNECT_STATE_MAP, CallerRecord,
    CgroupConnectState, ConnKey, EVENT_COUNT, EVENTS_MAP, OPEN_BY_POD_ENTRIES, OPEN_BY_POD_MAP,
    OpenState, POD_PARENTS_MAP, PROBE_MAP, PodParents, WatchConfig,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};

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
pub static CONFIG: WatchConfig = WatchConfig::EMPTY;

#[map(name = "POD_PARENTS")]
pub static POD_PARENTS: Array<PodParents> = Array::with_max_entries(1, 0);

/// Entries live for the span of one `connect()` call (written by connect4/6, consumed at
/// `TCP_CONNECT_CB` in the same call). Only a connect that fails in between (no route, no free
/// port, refused by another program) leaves one behind; cookies are never reused, and a new
/// `connect()` on the same socket overwrites it before anything reads it, so an orphan is never
/// handed out. The socket's release deletes an orphan (see `sock_release`), userspace prunes
/// those older than the record TTL, and LRU makes room on its own.
/// To evict a live entry, a flood would have to cycle the whole map within the microseconds that
/// entry lives.
#[map(name = "CALLER_BY_COOKIE")]
pub static CALLER_BY_COOKIE: LruHashMap<u64, CallerRecord> =
    LruHashMap::with_max_entries(CALLER_BY_COOKIE_ENTRIES, 0);

/// A plain hash, not LRU: an entry is deleted when its connection closes, never evicted, so one
/// pod's connections cannot push out another's. A pod holds at most `max_open_per_pod` entries,
/// and every caller outside pods together as many (one key, `NON_POD_KEY`); the map is sized at
/// load for `--max-pods` pods and that one key at their cap, with headroom, so no one can take
/// the pods' share. Not preallocated: memory follows real use.
#[map(name = "CALLER_BY_CONN")]
pub static CALLER_BY_CONN: HashMap<ConnKey, CallerRecord> =
    HashMap::with_max_entries(CALLER_BY_CONN_ENTRIES, BPF_F_NO_PREALLOC);

/// The 4-tuple of each connection in [`CALLER_BY_CONN`], by socket cookie, for the sock_release
/// program. Same life, same size, same reasons for a plain hash.
#[map(name = "CONN_BY_COOKIE")]
pub static CONN_BY_COOKIE: HashMap<u64, ConnKey> =
    HashMap::with_max_entries(CALLER_BY_CONN_ENTRIES, BPF_F_NO_PREALLOC);

/// LRU so that buckets of pods long gone make room on their own if userspace does not prune them;
/// looked up before any insert, so an existing bucket never costs anyone else theirs.
#[map(name = "CONNECT_STATE")]
pub static CONNECT_STATE: LruHashMap<u64, CgroupConnectState> =
    LruHashMap::with_max_entries(CONNECT_STATE_ENTRIES, 0);

/// A plain hash: counters are never evicted, only removed by userspace for pods that are gone
/// (and if one is removed early, its epoch keeps the count right; see `OpenState::epoch`).
#[map(name = "OPEN_BY_POD")]
pub static OPEN_BY_POD: HashMap<u64, OpenState> =
    HashMap::with_max_entries(OPEN_BY_POD_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "EVENTS")]
pub static EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_COUNT, 0);

#[map(name = "PROBE")]
pub static PROBE: Array<u64> = Array::with_max_entries(1, 0);

/// Counts a rare event (off the fast path: map-full, refusals, contention). Per-CPU, so no cache
/// line bounces between CPUs; still an atomic add, since a preempted program's slot can be
/// updated by another program on the same CPU.
#[inline(always)]
pub fn count_event(event: u32) {
    if let Some(n) = EVENTS.get_ptr_mut(event) {
        // SAFETY: a live per-CPU array slot.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
    }
}
