//! Aggregation and rate limiting of the Events, after the kubelet's recorder (client-go's
//! `EventCorrelator`), with the same constants.
//!
//! - **Series.** Observations of one pod and one reason make one Event: the first is created
//!   (`POST`), the next ones raise its `count` and `lastTimestamp` (and `series`) and replace its
//!   message (a strategic merge `PATCH`, as the kubelet sends). Where the kubelet keys by message
//!   too, this keys by (pod UID, reason) only: the messages of one reason differ in little else.
//! - **Spam filter.** API calls per pod draw from the pod's allowance in one
//!   [`KeyedLimiter`](crate::limiter::KeyedLimiter): a burst of 25, then one per 5 minutes.
//!   Unlike the kubelet's, an observation held back is not lost: it is counted into the series,
//!   and the next call carries the count.
//! - **Repeated throttling only.** A single 429 is normal life for an SDK; throttling is reported
//!   once a pod was throttled 3 times within a minute.
//! - **Bounded.** At most 4096 series (the least recently seen goes first), as many pod
//!   allowances, and a short memory of pods that could not be named. A failed call is retried
//!   with backoff, up to 12 attempts (client-go's), then its update is abandoned and counted.
//!
//! Plain state and decisions, no I/O: [`super::run`] feeds it and sends what it asks. The parts:
//! [`limits`] (the constants and the per-pod allowance), [`call`] (the API calls, built from a
//! series).

mod call;
mod limits;

use crate::backoff::Backoff;
use crate::limiter::KeyedLimiter;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;

pub use call::{Call, Key, Reporter, Sent};
pub use limits::Limits;

use super::message::message;
use super::observation::{Observation, PodIdentity, Reason, Subject};
use super::recorder::Outcomes;

/// One Event as the agent knows it.
struct Series {
    pod: PodIdentity,
    message: String,
    count: u32,
    first: SystemTime,
    last: SystemTime,
    /// When the current count started (the repeat window of throttling).
    window_start: Instant,
    last_seen: Instant,
    /// The Event's name once created.
    object: Option<String>,
    /// The count the API has.
    sent: u32,
    sending: bool,
    queued: bool,
    failures: u32,
    /// Not sent before: the backoff after a failed call, or the pod's allowance refilling.
    not_before: Instant,
}

/// The Events' state: series, the pods' allowances, and the queue of series with something to
/// send.
pub struct Correlator {
    limits: Limits,
    backoff: Backoff,
    reporter: Reporter,
    outcomes: Outcomes,
    series: HashMap<Key, Series>,
    allowances: KeyedLimiter<Arc<str>>,
    unnamed: HashMap<Arc<str>, Instant>,
    pending: VecDeque<Key>,
}

impl Correlator {
    pub fn new(limits: Limits, backoff: Backoff, reporter: Reporter, outcomes: Outcomes) -> Self {
        Correlator {
            allowances: limits.allowance(),
            limits,
            backoff,
            reporter,
            outcomes,
            series: HashMap::new(),
            unnamed: HashMap::new(),
            pending: VecDeque::new(),
        }
    }

    /// Series kept.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Pods with an allowance in memory.
    #[cfg(test)]
    pub fn allowances(&self) -> usize {
        self.allowances.len()
    }

    /// Counts an observation into its pod's series. `names` is asked only for a pod the agent
    /// has no series of yet.
    pub fn observe(
        &mut self,
        observation: Observation,
        names: &dyn Fn(&str) -> Option<PodIdentity>,
        now: Instant,
        wall: SystemTime,
    ) {
        let Observation {
            reason,
            subject,
            detail,
        } = observation;
        let (uid, verified) = match subject {
            Subject::Verified(pod) => (Arc::<str>::from(pod.uid.as_str()), Some(pod)),
            Subject::Kernel(uid) => (uid, None),
        };
        let key = (uid, reason);
        let pod = match verified {
            Some(pod) => pod,
            None => match self.series.get(&key) {
                Some(series) => series.pod.clone(),
                None => match self.name(&key.0, names, now) {
                    Some(pod) => pod,
                    None => {
                        self.outcomes.unnamed.inc();
                        return;
                    }
                },
            },
        };
        let message = message(reason, &detail, &pod);
        if let Some(series) = self.series.get_mut(&key) {
            let fresh = series.object.is_none() && series.sent == 0 && !series.sending;
            if reason == Reason::Throttled
                && fresh
                && now.duration_since(series.window_start) > self.limits.repeat_window
            {
                series.count = 0;
                series.first = wall;
                series.window_start = now;
            }
            series.count = series.count.saturating_add(1);
            series.last = wall;
            series.last_seen = now;
            series.message = message;
            series.pod = pod;
        } else {
            if self.series.len() >= self.limits.max_series {
                self.evict_one();
            }
            self.series.insert(
                key.clone(),
                Series {
                    pod,
                    message,
                    count: 1,
                    first: wall,
                    last: wall,
                    window_start: now,
                    last_seen: now,
                    object: None,
                    sent: 0,
                    sending: false,
                    queued: false,
                    failures: 0,
                    not_before: now,
                },
            );
        }
        self.enqueue(key);
    }

    /// The pod's identity from `names`, remembering for a while the pods it could not name.
    fn name(
        &mut self,
        uid: &Arc<str>,
        names: &dyn Fn(&str) -> Option<PodIdentity>,
        now: Instant,
    ) -> Option<PodIdentity> {
        if let Some(at) = self.unnamed.get(uid)
            && now.duration_since(*at) < self.limits.unnamed_memory
        {
            return None;
        }
        let pod = names(uid);
        if pod.is_none() {
            if self.unnamed.len() >= self.limits.max_series {
                self.unnamed.clear();
            }
            self.unnamed.insert(uid.clone(), now);
        } else {
            self.unnamed.remove(uid);
        }
        pod
    }

    fn enqueue(&mut self, key: Key) {
        if let Some(series) = self.series.get_mut(&key)
            && !series.queued
        {
            series.queued = true;
            self.pending.push_back(key);
        }
    }

    /// Drops the least recently seen series that is not being sent.
    fn evict_one(&mut self) {
        let oldest = self
            .series
            .iter()
            .filter(|(_, s)| !s.sending)
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(k, _)| k.clone());
        if let Some(key) = oldest
            && let Some(series) = self.series.remove(&key)
            && series.count > series.sent
        {
            self.outcomes.abandoned.inc();
        }
        // Allowances refilled whole are as good as new: forget them. Past the bound even so,
        // forget them all (every pod starts again with a burst): memory stays bounded.
        if self.allowances.len() >= self.limits.max_series {
            self.allowances.prune();
            if self.allowances.len() >= self.limits.max_series {
                self.allowances = self.limits.allowance();
            }
        }
    }

    /// Whether the series has something to send that its reason lets it send.
    fn wants_to_send(&self, series: &Series, reason: Reason) -> bool {
        series.count > series.sent
            && !series.sending
            && (reason != Reason::Throttled
                || series.object.is_some()
                || series.count >= self.limits.throttle_repeats)
    }

    /// The next API call due at `now`, if any (taking one from its pod's allowance).
    pub fn next_call(&mut self, now: Instant) -> Option<Call> {
        for _ in 0..self.pending.len() {
            let key = self.pending.pop_front()?;
            let Some(series) = self.series.get(&key) else {
                continue;
            };
            if !self.wants_to_send(series, key.1) {
                if let Some(series) = self.series.get_mut(&key) {
                    series.queued = false;
                }
                continue;
            }
            if series.not_before > now {
                self.pending.push_back(key);
                continue;
            }
            if let Err(wait) = self.allowances.check(&key.0) {
                // Not before the allowance has one again: what `next_due` tells the task.
                if let Some(series) = self.series.get_mut(&key) {
                    series.not_before = now + wait;
                }
                self.pending.push_back(key);
                continue;
            }
            let call = self.call(&key);
            if let Some(series) = self.series.get_mut(&key) {
                series.queued = false;
                series.sending = true;
            }
            return call;
        }
        None
    }

    /// When a queued series can next be sent: its backoff over, and its pod's allowance refilled
    /// as far as [`Correlator::next_call`] last found it short.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.pending
            .iter()
            .filter_map(|key| {
                let series = self.series.get(key)?;
                if !self.wants_to_send(series, key.1) {
                    return Some(now);
                }
                Some(series.not_before)
            })
            .min()
    }

    /// Takes in how a call went: a success records what the API has; a patch of an Event that
    /// is gone (expired) recreates it; other failures retry with backoff, then give up.
    pub fn finished(&mut self, sent: Sent, now: Instant) {
        let Sent { call, result } = sent;
        let key = call.key().clone();
        let Some(series) = self.series.get_mut(&key) else {
            return;
        };
        series.sending = false;
        match (&call, result) {
            (Call::Create { event, .. }, Ok(created)) => {
                series.object = created
                    .metadata
                    .name
                    .or_else(|| event.metadata.name.clone());
                series.sent = call.count();
                series.failures = 0;
                self.outcomes.created.inc();
            }
            (Call::Patch { .. }, Ok(_)) => {
                series.sent = call.count();
                series.failures = 0;
                self.outcomes.updated.inc();
            }
            (Call::Patch { .. }, Err(e)) if crate::kubernetes::status_code(&e) == Some(404) => {
                series.object = None;
                series.sent = 0;
            }
            (_, Err(_)) => {
                series.failures += 1;
                if series.failures >= self.limits.max_attempts {
                    series.failures = 0;
                    series.sent = series.count;
                    self.outcomes.abandoned.inc();
                } else {
                    series.not_before = now + self.backoff.after(series.failures);
                }
            }
        }
        self.enqueue(key);
    }
}
