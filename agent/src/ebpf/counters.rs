//! What the programs counted, read off the request path: per-pod connects, node-wide events, and
//! the pruning of state whose pod is gone.

use agent_common::{
    CALLER_BY_COOKIE_MAP, CONNECT_STATE_MAP, EVENT_CONN_RECORD_FAILED, EVENT_COOKIE_RECORD_FAILED,
    EVENT_FOREIGN_RELEASE, EVENT_LEFTOVER_REMOVED, EVENT_LIMITER_CONTENDED,
    EVENT_LIMITER_STATE_FULL, EVENT_OPEN_CAP_REFUSED, EVENT_OPEN_STATE_FULL, EVENT_RATE_REFUSED,
    EVENT_RECORD_MISSING, EVENT_TUPLE_COLLISION, EVENTS_MAP, NON_POD_KEY, OPEN_BY_POD_MAP,
};
use std::sync::PoisonError;

use aya::maps::MapError;

use super::{EbpfError, Programs, RECORD_TTL, callers, error::map_error};

/// A pod's connects to the agent, as the kernel counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectCounters {
    /// Let through by the token bucket (0 while the rate is 0: then no bucket is kept).
    pub allowed: u64,
    /// Refused with `EPERM`: by the token bucket, or at the open-connection cap.
    pub denied: u64,
    /// Connections it holds open now.
    pub open: u64,
}

/// Rare events the programs counted, node-wide (see `agent_common::EVENT_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelEvents {
    pub limiter_contended: u64,
    pub limiter_state_full: u64,
    pub open_state_full: u64,
    pub cookie_record_failed: u64,
    pub conn_record_failed: u64,
    pub leftover_removed: u64,
    pub open_cap_refused: u64,
    pub rate_refused: u64,
    pub record_missing: u64,
    pub tuple_collision: u64,
    pub foreign_release: u64,
}

impl KernelEvents {
    /// Every counter with its metric label, in `agent_common::EVENT_*` order.
    #[must_use]
    pub fn labelled(&self) -> [(&'static str, u64); 11] {
        [
            ("limiter_contended", self.limiter_contended),
            ("limiter_state_full", self.limiter_state_full),
            ("open_state_full", self.open_state_full),
            ("cookie_record_failed", self.cookie_record_failed),
            ("conn_record_failed", self.conn_record_failed),
            ("leftover_removed", self.leftover_removed),
            ("open_cap_refused", self.open_cap_refused),
            ("rate_refused", self.rate_refused),
            ("record_missing", self.record_missing),
            ("tuple_collision", self.tuple_collision),
            ("foreign_release", self.foreign_release),
        ]
    }
}

/// What [`Programs::prune_connect_state`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Token buckets of pods (or cgroups) that are gone.
    pub buckets: u64,
    /// Open-connection counters of pods that are gone.
    pub open_counters: u64,
    /// Records of connects that failed before their connection existed.
    pub orphan_records: u64,
}

impl Programs {
    /// Per-pod counters (keyed by pod cgroup id, or `NON_POD_KEY` for every caller outside pods),
    /// for metrics.
    /// Walks two maps: blocking, call it off the async runtime.
    ///
    /// # Errors
    /// Reading a map failed.
    pub fn connect_counters(&self) -> Result<Vec<(u64, ConnectCounters)>, EbpfError> {
        let mut by_key = std::collections::BTreeMap::<u64, ConnectCounters>::new();
        for entry in self.connect_state.iter() {
            let (key, state) = entry.map_err(map_error(CONNECT_STATE_MAP, "read"))?;
            let c = by_key.entry(key).or_default();
            c.allowed += state.allowed + state.contended;
            c.denied += state.denied;
        }
        for entry in self.open_by_pod.iter() {
            let (key, state) = entry.map_err(map_error(OPEN_BY_POD_MAP, "read"))?;
            let c = by_key.entry(key).or_default();
            c.denied += state.refused;
            c.open = state.open;
        }
        Ok(by_key.into_iter().collect())
    }

    /// The programs' rare events, summed over CPUs.
    ///
    /// # Errors
    /// Reading the map failed.
    pub fn kernel_events(&self) -> Result<KernelEvents, EbpfError> {
        let total = |event: u32| -> Result<u64, EbpfError> {
            let per_cpu = self
                .events
                .get(&event, 0)
                .map_err(map_error(EVENTS_MAP, "read"))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(KernelEvents {
            limiter_contended: total(EVENT_LIMITER_CONTENDED)?,
            limiter_state_full: total(EVENT_LIMITER_STATE_FULL)?,
            open_state_full: total(EVENT_OPEN_STATE_FULL)?,
            cookie_record_failed: total(EVENT_COOKIE_RECORD_FAILED)?,
            conn_record_failed: total(EVENT_CONN_RECORD_FAILED)?,
            leftover_removed: total(EVENT_LEFTOVER_REMOVED)?,
            open_cap_refused: total(EVENT_OPEN_CAP_REFUSED)?,
            rate_refused: total(EVENT_RATE_REFUSED)?,
            record_missing: total(EVENT_RECORD_MISSING)?,
            tuple_collision: total(EVENT_TUPLE_COLLISION)?,
            foreign_release: total(EVENT_FOREIGN_RELEASE)?,
        })
    }

    /// Removes the connect state of pods (and cgroups) for which `is_alive` says no, and records of
    /// connects that failed before their connection existed (older than [`RECORD_TTL`]). Safe with
    /// a wrong answer: a live pod's bucket starts afresh, and its open-connection count restarts
    /// from its new connections (a counter's epoch keeps older connections from uncounting the new
    /// one). Walks maps: blocking, call it periodically off the async runtime.
    ///
    /// # Errors
    /// Reading or writing a map failed.
    pub fn prune_connect_state(&self, is_alive: impl Fn(u64) -> bool) -> Result<Pruned, EbpfError> {
        let mut m = self
            .maintenance
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut pruned = Pruned::default();
        // Keys first, removals after: deleting while walking a hash map can restart the walk.
        let gone = |keys: aya::maps::MapKeys<'_, u64>, name| -> Result<Vec<u64>, EbpfError> {
            keys.map(|k| k.map_err(map_error(name, "read")))
                // The key of every caller outside pods is no cgroup: never gone.
                .filter(|k| {
                    k.as_ref()
                        .map_or(true, |k| *k != NON_POD_KEY && !is_alive(*k))
                })
                .collect()
        };
        for key in gone(m.connect_state.keys(), CONNECT_STATE_MAP)? {
            pruned.buckets += removed(m.connect_state.remove(&key), CONNECT_STATE_MAP)?;
        }
        for key in gone(m.open_by_pod.keys(), OPEN_BY_POD_MAP)? {
            pruned.open_counters += removed(m.open_by_pod.remove(&key), OPEN_BY_POD_MAP)?;
        }
        let now = callers::monotonic_now_ns();
        let ttl = u64::try_from(RECORD_TTL.as_nanos()).unwrap_or(u64::MAX);
        let orphans: Vec<u64> = m
            .by_cookie
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| now.saturating_sub(r.ktime_ns) > ttl)
            .map(|(cookie, _)| cookie)
            .collect();
        for cookie in orphans {
            pruned.orphan_records += removed(m.by_cookie.remove(&cookie), CALLER_BY_COOKIE_MAP)?;
        }
        Ok(pruned)
    }
}

/// Deletes racing with the kernel's own are fine: gone is gone.
fn removed(result: Result<(), MapError>, name: &'static str) -> Result<u64, EbpfError> {
    match result {
        Ok(()) => Ok(1),
        Err(MapError::KeyNotFound) => Ok(0),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(0),
        Err(source) => Err(EbpfError::Map {
            name,
            step: "remove",
            source,
        }),
    }
}
