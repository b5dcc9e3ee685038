//! Open connections per pod, capped: a slot taken at accept and given back when the connection
//! ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::PodKey;

/// Open connections per pod, capped.
pub(super) struct OpenConnections {
    pub(super) limit: usize,
    pub(super) by_pod: Mutex<HashMap<PodKey, usize>>,
}

impl OpenConnections {
    /// One more connection for `key`, unless it holds `limit` already.
    pub(super) fn take(this: &Arc<Self>, key: PodKey) -> Option<ConnectionSlot> {
        let mut by_pod = this.by_pod.lock().unwrap_or_else(PoisonError::into_inner);
        let open = by_pod.entry(key.clone()).or_insert(0);
        if *open >= this.limit {
            return None;
        }
        *open += 1;
        Some(ConnectionSlot {
            owner: this.clone(),
            key,
        })
    }
}

/// A pod's open connection; gives its slot back when dropped (the connection ended).
pub(super) struct ConnectionSlot {
    owner: Arc<OpenConnections>,
    key: PodKey,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut by_pod = self
            .owner
            .by_pod
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = by_pod.get_mut(&self.key) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                by_pod.remove(&self.key);
            }
        }
    }
}
