//! The per-pod token bucket of the connect programs (GCRA on one word, compare-and-swap): only in
//! the `agent_connect4`/`6` builds, since `BPF_CMPXCHG` needs Linux 5.12.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    ptr::{addr_of_mut, read_volatile},
};

use agent_common::{
    CgroupConnectState, ConnectLimit, EVENT_LIMITER_CONTENDED, EVENT_LIMITER_STATE_FULL,
};
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};

use crate::maps::{CONNECT_STATE, count_event};

/// Whether the pod's token bucket lets one more connect through. Only in the limiter programs.
#[inline(always)]
pub fn take_token(pod_key: u64, limit: ConnectLimit) -> bool {
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
