//! The queue between the request path and the Events task: the request path's handle
//! ([`EventRecorder`]) never waits, a full queue drops and counts; the task's end
//! ([`EventInbox`]) carries the outcome counters, resolved once.

use prometheus::IntCounter;
use tokio::sync::mpsc;

use super::observation::Observation;
use crate::metrics::Metrics;

/// The request path's handle: queues observations without waiting. Cheap to clone.
#[derive(Clone)]
pub struct EventRecorder {
    queue: mpsc::Sender<Observation>,
    queue_full: IntCounter,
}

impl EventRecorder {
    /// Queues `observation` for the Events task; drops and counts it when the queue is full.
    pub fn record(&self, observation: Observation) {
        // Closed: the task is gone (no usable Kubernetes configuration, counted as such).
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(observation) {
            self.queue_full.inc();
        }
    }
}

/// The Events task's end of the queue.
pub struct EventInbox {
    pub(super) queue: mpsc::Receiver<Observation>,
    pub(super) outcomes: Outcomes,
}

/// `pod_identity_pod_events_total` by outcome, resolved once.
#[derive(Clone)]
pub struct Outcomes {
    pub created: IntCounter,
    pub updated: IntCounter,
    pub unnamed: IntCounter,
    pub abandoned: IntCounter,
}

/// A queue of `capacity` observations between the request path and the Events task.
pub fn channel(capacity: usize, metrics: &Metrics) -> (EventRecorder, EventInbox) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let outcome = |o: &str| metrics.pod_events.with_label_values(&[o]);
    (
        EventRecorder {
            queue: tx,
            queue_full: outcome("queue_full"),
        },
        EventInbox {
            queue: rx,
            outcomes: Outcomes {
                created: outcome("created"),
                updated: outcome("updated"),
                unnamed: outcome("unnamed"),
                abandoned: outcome("abandoned"),
            },
        },
    )
}
