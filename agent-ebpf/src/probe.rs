//! A feature probe, never attached: 64-bit compare-and-swap (Linux 5.12+), which the token bucket
//! needs.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{macros::socket_filter, programs::SkBuffContext};

use crate::maps::PROBE;

/// Loads only where the kernel's verifier knows 64-bit compare-and-swap.
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
