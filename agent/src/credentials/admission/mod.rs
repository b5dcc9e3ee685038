//! Admission to EKS Auth: every upstream call waits for its turn here, so that the agent calls
//! EKS Auth at the pace EKS Auth accepts instead of amplifying its throttling.
//!
//! - A token bucket whose rate adapts to EKS Auth (AIMD). A call that had to wait for its turn
//!   and was accepted raises the rate: by one call per second per call (so doubling every second)
//!   until EKS Auth first throttles, then by `increase_per_second` each second. A
//!   `ThrottlingException` multiplies the rate by `decrease_factor`, once per round: calls sent
//!   before the cut cannot cut again. The rate stays within its bounds; after a quiet spell
//!   without throttling it starts afresh (EKS Auth's limit is shared with other nodes and moves).
//! - Fair queues ([`queues`]): pods' first fetches wait in one queue per pod the kernel saw (and
//!   one for every caller it could not place), each bounded, served round-robin; renewals get a
//!   turn at the end of each round, and every turn when no first fetch waits. One pod's backlog
//!   never holds back another pod's first request or the renewals by more than a turn each.
//! - A waiting call knows its place: [`Admission::eta`] estimates when it will go, from its
//!   place among the turns ahead and the current rate, so a request can decide up front how long
//!   to wait; a refusal says when the caller's own queue would have room, bounded.
//!
//! Mechanism only: it knows nothing of tokens, credentials or HTTP.

mod queues;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::{Gauge, IntGauge};
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::AdmissionConfig;
pub use queues::{MAX_POD_SHARES, Share};
use queues::{Queues, Waiting};

/// The longest `Retry-After` a refusal gives: past it an estimate says little (the rate moves).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Which queue a call waits in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// A pod's first request for a token: someone is waiting. In the queue of the share it
    /// spends.
    Cold(Share),
    /// A background renewal: one turn per round of the first fetches' queues, and every turn
    /// when no first fetch waits.
    Renewal,
}

/// What EKS Auth made of a call, as far as its pace is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (credentials or a refusal of the token): the pace was acceptable.
    Accepted,
    /// `ThrottlingException`: too fast.
    Throttled,
    /// No answer about the pace (a timeout, a server error, unreachable).
    Failed,
}

/// Where the admission path reports its state.
#[derive(Clone)]
pub struct AdmissionGauges {
    /// The current rate, calls per second.
    pub rate: Gauge,
    pub queued_cold: IntGauge,
    pub queued_renewals: IntGauge,
}

/// A place in a queue. Dropping it gives the place up.
#[derive(Debug)]
pub struct Ticket {
    seq: u64,
    /// The queue it waits in (a renewal's: unplaced, never used).
    share: Share,
    rx: oneshot::Receiver<Permit>,
}

impl Ticket {
    /// The ticket's number: its place among the cold calls.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The share whose queue it waits in (a pod past [`MAX_POD_SHARES`] waits with the unplaced
    /// callers).
    pub fn share(&self) -> &Share {
        &self.share
    }

    /// Waits for the turn. `None`: the admission path has shut down.
    pub async fn admitted(self) -> Option<Permit> {
        self.rx.await.ok()
    }
}

/// The right to make one call; report its outcome with [`Admission::record`].
#[derive(Debug)]
pub struct Permit {
    /// The rate's round when the call went: a throttle from an older round does not cut again.
    round: u64,
    /// The call had to wait for the bucket: the rate, not the demand, was what limited.
    limited: bool,
}

/// The pacer. Dropping it stops the dispatcher and fails every waiting ticket.
pub struct Admission {
    shared: Arc<Shared>,
    dispatcher: AbortHandle,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    config: AdmissionConfig,
    gauges: AdmissionGauges,
}

struct State {
    rate: f64,
    /// Below it the rate grows by one call per second per accepted call, above it additively.
    threshold: f64,
    tokens: f64,
    refilled: Instant,
    queues: Queues,
    next_seq: u64,
    round: u64,
    last_throttle: Option<Instant>,
    /// Moving average of accepted calls' duration.
    latency: Duration,
    /// Since the queues were last empty, a call had to wait for the bucket.
    saturated: bool,
}

/// The duration of an upstream call before any was measured.
const FIRST_LATENCY_GUESS: Duration = Duration::from_millis(100);

impl Admission {
    /// Starts the dispatcher (on the current tokio runtime).
    pub fn new(config: AdmissionConfig, gauges: AdmissionGauges) -> Self {
        let rate = config.initial_rate.clamp(config.min_rate, config.max_rate);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rate,
                threshold: config.max_rate,
                tokens: config.burst.min(rate).max(1.0),
                refilled: Instant::now(),
                queues: Queues::default(),
                next_seq: 0,
                round: 0,
                last_throttle: None,
                latency: FIRST_LATENCY_GUESS,
                saturated: false,
            }),
            wake: Notify::new(),
            config,
            gauges,
        });
        shared.gauges.rate.set(rate);
        let dispatcher = tokio::spawn(dispatch(shared.clone())).abort_handle();
        Admission { shared, dispatcher }
    }

    /// A place at the back of `class`'s queue. A first fetch is refused when its share's queue
    /// is full (or, unless it is the share's only call, when every queue together is), with when
    /// its queue is expected to have room (at most [`MAX_RETRY_AFTER`]).
    pub fn enqueue(&self, class: Class) -> Result<Ticket, Duration> {
        let config = &self.shared.config;
        let mut s = self.shared.lock();
        let seq = s.next_seq;
        let (tx, rx) = oneshot::channel();
        let share = match class {
            Class::Cold(share) => {
                let share = s.queues.placed(share);
                let len = s.queues.len_of(&share);
                let cap = match share {
                    Share::Pod(_) => config.max_queued_per_pod,
                    Share::Unplaced => config.max_queued_unplaced,
                };
                if len >= cap || (len > 0 && s.queues.cold_len() >= config.max_queued) {
                    let ahead = s.queues.turns_ahead(&share, seq);
                    let wait = Duration::from_secs_f64(ahead as f64 / s.rate);
                    return Err(wait.min(MAX_RETRY_AFTER));
                }
                s.queues.push_cold(share.clone(), Waiting { seq, tx });
                share
            }
            Class::Renewal => {
                s.queues.push_renewal(Waiting { seq, tx });
                Share::Unplaced
            }
        };
        s.next_seq += 1;
        self.shared.publish_queues(&s);
        drop(s);
        self.shared.wake.notify_one();
        Ok(Ticket { seq, share, rx })
    }

    /// A cold call that was throttled goes again before every call of its share queued after
    /// it: its place is its old number.
    pub fn requeue(&self, share: Share, seq: u64) -> Ticket {
        let mut s = self.shared.lock();
        let (tx, rx) = oneshot::channel();
        s.queues.requeue(share.clone(), Waiting { seq, tx });
        self.shared.publish_queues(&s);
        drop(s);
        self.shared.wake.notify_one();
        Ticket { seq, share, rx }
    }

    /// How long until the cold ticket `seq` of `share` is expected to go, at the current rate:
    /// the turns ahead of it (its own queue's, and a turn per round of every other queue).
    pub fn eta(&self, share: &Share, seq: u64) -> Duration {
        let mut s = self.shared.lock();
        s.refill(Instant::now(), &self.shared.config);
        let ahead = s.queues.turns_ahead(share, seq);
        let missing = (ahead as f64 + 1.0 - s.tokens).max(0.0);
        Duration::from_secs_f64(missing / s.rate)
    }

    /// First fetches waiting, in every queue.
    pub fn queued(&self) -> usize {
        self.shared.lock().queues.cold_len()
    }

    /// The usual duration of an accepted call.
    pub fn latency(&self) -> Duration {
        self.shared.lock().latency
    }

    /// The current rate, calls per second.
    pub fn rate(&self) -> f64 {
        self.shared.lock().rate
    }

    /// A permit that was not used (the call was no longer needed): its token goes back.
    pub fn refund(&self, _permit: Permit) {
        let mut s = self.shared.lock();
        let cap = s.burst_cap(&self.shared.config);
        s.tokens = (s.tokens + 1.0).min(cap);
        drop(s);
        self.shared.wake.notify_one();
    }

    /// Adapts the rate to what EKS Auth made of a call.
    pub fn record(&self, permit: Permit, outcome: Outcome, took: Duration) {
        let config = &self.shared.config;
        let mut s = self.shared.lock();
        match outcome {
            Outcome::Throttled => {
                s.last_throttle = Some(Instant::now());
                if permit.round == s.round {
                    s.round += 1;
                    s.rate = (s.rate * config.decrease_factor).max(config.min_rate);
                    s.threshold = s.rate;
                    // No burst into a service that just said no.
                    s.tokens = s.tokens.min(0.0);
                    tracing::debug!(rate = s.rate, "EKS Auth throttled: slowing down");
                }
            }
            Outcome::Accepted => {
                s.latency = (s.latency * 4 + took) / 5;
                if permit.limited {
                    let step = if s.rate < s.threshold {
                        1.0
                    } else {
                        config.increase_per_second / s.rate
                    };
                    s.rate = (s.rate + step).min(config.max_rate);
                }
            }
            Outcome::Failed => {}
        }
        self.shared.gauges.rate.set(s.rate);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.dispatcher.abort();
        let mut s = self.shared.lock();
        // Dropping the senders fails the waiting tickets.
        s.queues.clear();
        self.shared.publish_queues(&s);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_queues(&self, s: &State) {
        self.gauges.queued_cold.set(s.queues.cold_len() as i64);
        self.gauges
            .queued_renewals
            .set(s.queues.renewals_len() as i64);
    }

    /// Hands out every turn that is due; returns how long until the next one (`None`: nothing
    /// waits).
    fn step(&self) -> Option<Duration> {
        let mut s = self.lock();
        let now = Instant::now();
        s.refill(now, &self.config);
        self.gauges.rate.set(s.rate);
        let st = &mut *s;
        let next = loop {
            // Drops given-up tickets first: they cost no turn.
            if !st.queues.ready() {
                st.saturated = false;
                break None;
            }
            if st.tokens < 1.0 {
                st.saturated = true;
                // At least the timer's resolution: floating point can leave the bucket a hair
                // short of a token, and a wait that rounds to zero fires without time moving on
                // (under a paused clock, for ever).
                let wait = Duration::from_secs_f64((1.0 - st.tokens) / st.rate);
                break Some(wait.max(Duration::from_millis(1)));
            }
            let Some(waiting) = st.queues.pop() else {
                continue;
            };
            let permit = Permit {
                round: st.round,
                limited: st.saturated,
            };
            if waiting.tx.send(permit).is_ok() {
                st.tokens -= 1.0;
            }
        };
        self.publish_queues(&s);
        next
    }
}

impl State {
    /// At most a second's worth, and never more than the configured burst.
    fn burst_cap(&self, config: &AdmissionConfig) -> f64 {
        config.burst.min(self.rate).max(1.0)
    }

    fn refill(&mut self, now: Instant, config: &AdmissionConfig) {
        if let Some(at) = self.last_throttle
            && now.saturating_duration_since(at) >= config.quiet_reset
        {
            self.last_throttle = None;
            self.threshold = config.max_rate;
            self.rate = self.rate.max(config.initial_rate.min(config.max_rate));
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst_cap(config));
        self.refilled = now;
    }
}

/// Hands out turns as the bucket fills, until the admission path is dropped.
async fn dispatch(shared: Arc<Shared>) {
    loop {
        match shared.step() {
            None => shared.wake.notified().await,
            // A new ticket or a changed rate wakes it early: it only looks again.
            Some(wait) => {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shared.wake.notified() => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
