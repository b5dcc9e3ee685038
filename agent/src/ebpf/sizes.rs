//! Map sizes, set at load from the pod count and the per-pod cap, so that the pods' share of the
//! record maps cannot be taken by anyone else.
//!
//! Every connection to the agent holds one record from `connect()` to its end, and the kernel
//! holds each key (a pod, or all callers outside pods together) to `max_open_per_pod` of them. The
//! record maps hold `(max_pods + 1) × max_open_per_pod × HEADROOM`: room for every pod and the
//! shared non-pod key at their caps at once.

use agent_common::{
    CALLER_BY_CONN_MAP, CALLER_BY_COOKIE_ENTRIES, CALLER_BY_COOKIE_MAP, CONN_BY_COOKIE_MAP,
    CONNECT_STATE_ENTRIES, CONNECT_STATE_MAP, OPEN_BY_POD_ENTRIES, OPEN_BY_POD_MAP,
};

/// Why twice the caps: the cap is read without a lock, so concurrent connects of one key may
/// overshoot it by the number of threads racing; and a key's counter pruned as gone while its
/// connections live makes a new one, whose count starts again beside the old connections.
const HEADROOM: u32 = 2;
/// Counters per key slot: pods that are gone keep theirs until the next prune (seconds), so pod
/// churn needs more counters than pods running at once. Counters are small and not preallocated.
const COUNTERS_PER_KEY: u32 = 16;

/// Entry counts of the maps userspace sizes at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MapSizes {
    pub by_cookie: u32,
    pub by_conn: u32,
    pub connect_state: u32,
    pub open_by_pod: u32,
}

impl MapSizes {
    /// Sizes for `max_pods` pods, each (and every caller outside pods together) holding at most
    /// `max_open_per_pod` connections, on a node of `cpus` CPUs.
    pub fn new(max_pods: u32, max_open_per_pod: u32, cpus: u32) -> MapSizes {
        let keys = max_pods.saturating_add(1);
        MapSizes {
            // Entries live for one connect() call; LRU, with per-CPU free lists: a few hundred
            // per CPU.
            by_cookie: CALLER_BY_COOKIE_ENTRIES.max(512u32.saturating_mul(cpus)),
            by_conn: keys
                .saturating_mul(max_open_per_pod)
                .saturating_mul(HEADROOM)
                .max(1),
            connect_state: CONNECT_STATE_ENTRIES.max(keys.saturating_mul(COUNTERS_PER_KEY)),
            open_by_pod: OPEN_BY_POD_ENTRIES.max(keys.saturating_mul(COUNTERS_PER_KEY)),
        }
    }

    pub fn entries(self) -> [(&'static str, u32); 5] {
        [
            (CALLER_BY_COOKIE_MAP, self.by_cookie),
            (CALLER_BY_CONN_MAP, self.by_conn),
            (CONN_BY_COOKIE_MAP, self.by_conn),
            (CONNECT_STATE_MAP, self.connect_state),
            (OPEN_BY_POD_MAP, self.open_by_pod),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_maps_hold_every_pod_and_the_non_pod_key_at_their_caps() {
        // EKS's default max pods, and the kernel cap of the default --pod-max-connections.
        let eks = MapSizes::new(110, 256, 2);
        assert_eq!(eks.by_conn, 111 * 256 * 2);
        assert_eq!(eks.by_cookie, CALLER_BY_COOKIE_ENTRIES);
        assert_eq!(eks.open_by_pod, OPEN_BY_POD_ENTRIES);
        // The per-pod cap and the pod count change the record maps to match.
        assert_eq!(MapSizes::new(4, 64, 2).by_conn, 5 * 64 * 2);
        assert_eq!(MapSizes::new(110, 512, 2).by_conn, 2 * eks.by_conn);
        assert!(MapSizes::new(1000, 256, 2).open_by_pod >= 1001 * 16);
        assert_eq!(MapSizes::new(110, 256, 96).by_cookie, 96 * 512);
    }
}
