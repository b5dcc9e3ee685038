//! The watcher's events applied to the view, and the view's state in metrics.
//!
//! A list (`Init`, `InitApply`…, `InitDone`) is gathered apart and replaces the view only once
//! complete: pods deleted while the watch was away leave then, and a list cut short by an error
//! leaves the last view in place. Watch events (`Apply`, `Delete`) change the view one pod at a
//! time. A pod is published only when what the view keeps of it changed (most updates of a pod
//! are its status, not its names or containers).

use std::sync::Arc;

use kube::runtime::watcher::Event;
use prometheus::{IntCounter, IntGauge};

use super::pod::{Update, WatchedPod};
use super::{PodView, Pods};
use crate::metrics::Metrics;

/// What the view reports, resolved once.
#[derive(Clone)]
pub struct ViewMetrics {
    /// `pod_identity_pod_view_pods`.
    pub pods: IntGauge,
    /// `pod_identity_pod_view_synced`: 1 while the view follows the API server's.
    pub synced: IntGauge,
    /// `pod_identity_pod_view_left_out_total`: pods not kept because the view was full.
    pub left_out: IntCounter,
    /// `pod_identity_pod_view_errors_total{reason}`.
    pub forbidden: IntCounter,
    pub expired: IntCounter,
    pub unavailable: IntCounter,
}

impl ViewMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let error = |reason: &str| metrics.pod_view_errors.with_label_values(&[reason]);
        ViewMetrics {
            pods: metrics.pod_view_pods.clone(),
            synced: metrics.pod_view_synced.clone(),
            left_out: metrics.pod_view_left_out.clone(),
            forbidden: error("forbidden"),
            expired: error("expired"),
            unavailable: error("unavailable"),
        }
    }
}

/// The task's side of the view: the pods it knows, and a list being gathered.
pub struct Reflector {
    view: PodView,
    pods: Pods,
    /// A list under way (from `Init` to `InitDone`).
    relist: Option<Pods>,
    /// Whether a list has completed.
    listed: bool,
    capacity: usize,
    metrics: ViewMetrics,
}

impl Reflector {
    pub fn new(view: PodView, capacity: usize, metrics: ViewMetrics) -> Self {
        metrics.synced.set(0);
        Reflector {
            view,
            pods: Pods::new(),
            relist: None,
            listed: false,
            capacity,
            metrics,
        }
    }

    /// Applies one event of the watcher.
    pub fn apply(&mut self, event: Event<WatchedPod>) {
        match event {
            Event::Init => self.relist = Some(Pods::new()),
            Event::InitApply(pod) => {
                if let Some(relist) = self.relist.as_mut() {
                    upsert(relist, &pod, self.capacity, &self.metrics.left_out);
                } else {
                    // Not from the watcher (it starts every list with `Init`): applied as it comes.
                    self.apply(Event::Apply(pod));
                }
            }
            Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.pods = relist;
                }
                self.listed = true;
                self.publish();
                self.metrics.synced.set(1);
            }
            Event::Apply(pod) => {
                if upsert(&mut self.pods, &pod, self.capacity, &self.metrics.left_out) {
                    self.publish();
                }
                self.metrics.synced.set(1);
            }
            Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref()
                    && self.pods.remove(uid).is_some()
                {
                    self.publish();
                }
                self.metrics.synced.set(1);
            }
        }
    }

    /// The watch failed: the view stays as it is, no longer in step with the API server.
    pub fn failed(&mut self) {
        self.metrics.synced.set(0);
    }

    /// The watch has run without failing for a while since it last failed: in step again, if
    /// the view was ever listed and no list is under way. Whether it now is.
    pub fn resumed(&mut self) -> bool {
        let resumed = self.listed && self.relist.is_none();
        if resumed {
            self.metrics.synced.set(1);
        }
        resumed
    }

    fn publish(&self) {
        self.metrics
            .pods
            .set(i64::try_from(self.pods.len()).unwrap_or(i64::MAX));
        self.view.publish(self.pods.clone());
    }
}

/// Puts what `pod` means into `pods`; whether `pods` changed. A new pod past `capacity` is left
/// out (and counted): the pods already known keep their names.
fn upsert(pods: &mut Pods, pod: &WatchedPod, capacity: usize, left_out: &IntCounter) -> bool {
    match Update::of(pod) {
        Update::Keep(uid, info) => {
            match pods.get(&uid) {
                Some(known) if **known == info => return false,
                None if pods.len() >= capacity => {
                    left_out.inc();
                    return false;
                }
                _ => {}
            }
            pods.insert(uid, Arc::new(info));
            true
        }
        Update::Finished(uid) => pods.remove(&uid).is_some(),
        Update::Unusable => false,
    }
}
