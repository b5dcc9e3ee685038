//! Aggregation and rate limiting of the Events, after the kubelet's recorder (client-go's
//! `EventCorrelator`), with the same constants.
//!
//! - **Series.** Observations of one pod and one reason make one Event: the first is created
//!   (`POST`), the next ones raise its `count` and `lastTimestamp` (and `series`) and replace its
//!   message (a strategic merge `PATCH`, as the kubelet sends). Where the kubelet keys by message
//!   too, this keys by (pod UID, reason) only: the messages of one reason differ in little else.
//! - **Spam filter.** API calls per pod draw from a token bucket: a burst of 25, then one per 5
//!   minutes. Unlike the kubelet's, an observation held back is not lost: it is counted into the
//!   series, and the next call carries the count.
//! - **Repeated throttling only.** A single 429 is normal life for an SDK; throttling is reported
//!   once a pod was throttled 3 times within a minute.
//! - **Bounded.** At most 4096 series (the least recently seen goes first), as many buckets, and a
//!   short memory of pods that could not be named. A failed call is retried with backoff, up to
//!   12 attempts (client-go's), then its update is abandoned and counted.
//!
//! Plain state and decisions, no I/O: [`super::events::run`] feeds it and sends what it asks.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Event, EventSeries, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::time::Instant;

use super::COMPONENT;
use super::events::{Observation, Outcomes, PodIdentity, Reason, Reporter, Subject, message};

/// The kubelet's limits, and ours for throttling.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most series kept.
    pub max_series: usize,
    /// API calls per pod: a burst, then one per `refill`.
    pub burst: u32,
    pub refill: Duration,
    /// Throttling is reported from this many occurrences within `repeat_window` on.
    pub throttle_repeats: u32,
    pub repeat_window: Duration,
    /// How long a pod that could not be named is not looked up again.
    pub unnamed_memory: Duration,
    /// Attempts at sending one update before it is abandoned.
    pub max_attempts: u32,
}

impl Limits {
    /// client-go's `EventCorrelator` defaults (LRU 4096, spam filter burst 25 and one per 300 s,
    /// 12 tries per event).
    pub fn kubelet() -> Self {
        Limits {
            max_series: 4096,
            burst: 25,
            refill: Duration::from_secs(300),
            throttle_repeats: 3,
            repeat_window: Duration::from_secs(60),
            unnamed_memory: Duration::from_secs(60),
            max_attempts: 12,
        }
    }
}

/// A series' key: the pod's UID and the reason.
pub type Key = (Arc<str>, Reason);

/// An API call to make.
#[derive(Debug, Clone)]
pub enum Call {
    Create {
        key: Key,
        namespace: String,
        event: Box<Event>,
        count: u32,
    },
    Patch {
        key: Key,
        namespace: String,
        name: String,
        patch: serde_json::Value,
        count: u32,
    },
}

impl Call {
    fn key(&self) -> &Key {
        match self {
            Call::Create { key, .. } | Call::Patch { key, .. } => key,
        }
    }

    fn count(&self) -> u32 {
        match self {
            Call::Create { count, .. } | Call::Patch { count, .. } => *count,
        }
    }
}

/// A call and how it went.
pub struct Sent {
    pub call: Call,
    pub result: Result<Event, kube::Error>,
}

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
    not_before: Instant,
}

/// A token bucket.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, limits: &Limits) {
        let gained = now.duration_since(self.at).as_secs_f64() / limits.refill.as_secs_f64();
        self.tokens = (self.tokens + gained).min(f64::from(limits.burst));
        self.at = now;
    }

    fn next_token(&self, limits: &Limits) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.at + limits.refill.mul_f64(missing)
    }
}

/// The Events' state: series, buckets, and the queue of series with something to send.
pub struct Correlator {
    limits: Limits,
    backoff: (Duration, Duration),
    reporter: Reporter,
    outcomes: Outcomes,
    series: HashMap<Key, Series>,
    buckets: HashMap<Arc<str>, Bucket>,
    unnamed: HashMap<Arc<str>, Instant>,
    pending: VecDeque<Key>,
}

impl Correlator {
    pub fn new(
        limits: Limits,
        backoff: (Duration, Duration),
        reporter: Reporter,
        outcomes: Outcomes,
    ) -> Self {
        Correlator {
            limits,
            backoff,
            reporter,
            outcomes,
            series: HashMap::new(),
            buckets: HashMap::new(),
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
        // Buckets of pods without a series are full again soon enough: forget them first.
        if self.buckets.len() >= self.limits.max_series {
            let live: std::collections::HashSet<&Arc<str>> =
                self.series.keys().map(|(uid, _)| uid).collect();
            self.buckets.retain(|uid, _| live.contains(uid));
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

    /// The next API call due at `now`, if any (taking a token of its pod's bucket).
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
            let limits = &self.limits;
            let bucket = self.buckets.entry(key.0.clone()).or_insert(Bucket {
                tokens: f64::from(limits.burst),
                at: now,
            });
            bucket.refill(now, limits);
            if bucket.tokens < 1.0 {
                self.pending.push_back(key);
                continue;
            }
            bucket.tokens -= 1.0;
            let call = self.call(&key);
            if let Some(series) = self.series.get_mut(&key) {
                series.queued = false;
                series.sending = true;
            }
            return call;
        }
        None
    }

    /// When a queued series can next be sent (its backoff over and a token in its bucket).
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.pending
            .iter()
            .filter_map(|key| {
                let series = self.series.get(key)?;
                if !self.wants_to_send(series, key.1) {
                    return Some(now);
                }
                let token = match self.buckets.get(&key.0) {
                    Some(bucket) => {
                        let mut bucket = Bucket {
                            tokens: bucket.tokens,
                            at: bucket.at,
                        };
                        bucket.refill(now, &self.limits);
                        bucket.next_token(&self.limits)
                    }
                    None => now,
                };
                Some(series.not_before.max(token))
            })
            .min()
    }

    fn call(&self, key: &Key) -> Option<Call> {
        let series = self.series.get(key)?;
        let pod = &series.pod;
        let count = series.count;
        let count_i32 = i32::try_from(count).unwrap_or(i32::MAX);
        let last = timestamp(series.last);
        let event_series = (count > 1).then_some(EventSeries {
            count: Some(count_i32),
            last_observed_time: Some(MicroTime(last)),
        });
        Some(match &series.object {
            Some(name) => Call::Patch {
                key: key.clone(),
                namespace: pod.namespace.clone(),
                name: name.clone(),
                patch: json!({
                    "count": count_i32,
                    "lastTimestamp": Time(last),
                    "message": series.message,
                    "series": event_series,
                }),
                count,
            },
            None => Call::Create {
                key: key.clone(),
                namespace: pod.namespace.clone(),
                event: Box::new(Event {
                    metadata: ObjectMeta {
                        name: Some(event_name(&pod.name, series.last, series.failures)),
                        namespace: Some(pod.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    involved_object: ObjectReference {
                        api_version: Some("v1".to_owned()),
                        kind: Some("Pod".to_owned()),
                        name: Some(pod.name.clone()),
                        namespace: Some(pod.namespace.clone()),
                        uid: Some(pod.uid.clone()),
                        ..ObjectReference::default()
                    },
                    reason: Some(key.1.as_str().to_owned()),
                    message: Some(series.message.clone()),
                    type_: Some("Warning".to_owned()),
                    count: Some(count_i32),
                    first_timestamp: Some(Time(timestamp(series.first))),
                    last_timestamp: Some(Time(last)),
                    series: event_series,
                    source: Some(EventSource {
                        component: Some(COMPONENT.to_owned()),
                        host: Some(self.reporter.host.clone()).filter(|h| !h.is_empty()),
                    }),
                    reporting_component: Some(COMPONENT.to_owned()),
                    reporting_instance: Some(self.reporter.host.clone()).filter(|h| !h.is_empty()),
                    ..Event::default()
                }),
                count,
            },
        })
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
            (Call::Patch { .. }, Err(e)) if super::status_code(&e) == Some(404) => {
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
                    let (first, longest) = self.backoff;
                    let exponent = series.failures.saturating_sub(1).min(16);
                    series.not_before = now + (first * 2u32.pow(exponent)).min(longest);
                }
            }
        }
        self.enqueue(key);
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// `<pod>.<nanoseconds in hex>`, as the kubelet names its Events (the pod's name shortened so
/// that the whole stays a valid object name); `attempt` makes a retried create's name new.
fn event_name(pod: &str, at: SystemTime, attempt: u32) -> String {
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        + u128::from(attempt);
    let mut end = pod.len().min(253 - 1 - 32);
    while !pod.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}.{nanos:x}", &pod[..end])
}
