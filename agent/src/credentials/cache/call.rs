//! A token's first upstream call: made once in a task of its own, coalesced among the requests
//! for the token, paced by the admission path (in the queue of the caller's pod), and waited for
//! by each request until its deadline. The task's entry in the `calls` map goes with the task,
//! even when it panics or is aborted ([`CallGuard`]).

use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    CallState, CredentialCache, FetchError, Fetched, Inner, Kind, Lookup, Served, Stage, lock,
};
use crate::credentials::admission::{Class, Outcome, Permit, Share};
use crate::credentials::{ErrorClass, Issued, Retriever, UpstreamError};
use crate::token::Claims;

/// When a request waiting for a call expected to end at `ready_at` gives up, if it must: at its
/// deadline when the credentials should be there by then; otherwise so that the SDK's next
/// attempt, `retry_delay` after the refusal (botocore and the JS SDK pause a fixed second and
/// ignore `Retry-After`), arrives as they are expected — never past the deadline, so that each
/// of the SDK's attempts waits its share instead of all three failing within two seconds.
pub(super) fn give_up_at(
    arrived: Instant,
    deadline: Instant,
    ready_at: Instant,
    retry_delay: Duration,
) -> Instant {
    if ready_at <= deadline {
        return deadline;
    }
    ready_at
        .checked_sub(retry_delay)
        .unwrap_or(arrived)
        .clamp(arrived, deadline)
}

impl<R: Retriever> Inner<R> {
    /// A token's first upstream call, paced by the admission path; a throttled call goes back to
    /// the head of the queue. Stores what it got when `claims` are given (caching on), and tells
    /// the requests waiting on `progress`.
    pub(super) async fn call(
        self: Arc<Self>,
        token: Arc<str>,
        claims: Option<Arc<Claims>>,
        share: Share,
        progress: watch::Sender<CallState>,
    ) -> Result<Fetched, FetchError> {
        let result = match self.call_paced(&token, share, &progress).await {
            Ok(issued) => Ok(match claims {
                Some(claims) => {
                    let entry = self.store(token.clone(), claims, issued).await;
                    Fetched {
                        issued: entry.issued(),
                        entry: Some(entry),
                    }
                }
                None => Fetched {
                    issued: Arc::new(issued),
                    entry: None,
                },
            }),
            Err(FetchError::Upstream(e)) if e.class() == ErrorClass::Permanent => {
                if let Some(refused) = &self.refused {
                    refused
                        .insert(token.clone(), (Instant::now(), e.clone()))
                        .await;
                }
                Err(FetchError::Upstream(e))
            }
            Err(e) => Err(e),
        };
        progress.send_modify(|state| state.stage = Stage::Done(result.clone()));
        result
    }

    pub(super) async fn call_paced(
        &self,
        token: &str,
        share: Share,
        progress: &watch::Sender<CallState>,
    ) -> Result<Issued, FetchError> {
        let mut ticket = self
            .admission
            .enqueue(Class::Cold(share))
            .map_err(|retry_after| FetchError::Queued {
                retry_after,
                throttled: None,
            })?;
        let mut throttled = 0;
        loop {
            let (seq, share) = (ticket.seq(), ticket.share().clone());
            let queued = Stage::Queued(share.clone(), seq);
            progress.send_modify(|state| state.stage = queued);
            let Some(permit) = ticket.admitted().await else {
                return Err(FetchError::Upstream(Arc::new(shut_down())));
            };
            progress.send_modify(|state| state.stage = Stage::Calling);
            match self.call_upstream(token, Kind::Fetch, permit).await {
                Err(e)
                    if e.is_throttling() && throttled < self.config.admission.throttle_retries =>
                {
                    throttled += 1;
                    let e = Arc::new(e);
                    progress.send_modify(|state| state.throttled = Some(e));
                    ticket = self.admission.requeue(share, seq);
                }
                result => return result.map_err(|e| FetchError::Upstream(Arc::new(e))),
            }
        }
    }

    /// Waits for a token's call, until the request's deadline at most (see [`give_up_at`]). The
    /// estimate is made on arrival and again whenever the call moves or the give-up time comes
    /// (the rate may have changed meanwhile).
    pub(super) async fn wait(
        &self,
        mut call: watch::Receiver<CallState>,
        arrived: Instant,
    ) -> Result<Fetched, FetchError> {
        let config = &self.config.admission;
        let deadline = arrived + config.wait_deadline;
        loop {
            let (ready_at, throttled) = {
                let state = call.borrow_and_update();
                let now = Instant::now();
                let ready_at = match &state.stage {
                    Stage::Done(result) => return result.clone(),
                    Stage::Queued(share, seq) => {
                        now + self.admission.eta(share, *seq) + self.admission.latency()
                    }
                    Stage::Calling => now + self.admission.latency(),
                };
                (ready_at, state.throttled.clone())
            };
            let give_up = give_up_at(arrived, deadline, ready_at, config.sdk_retry_delay);
            let now = Instant::now();
            if now >= give_up {
                return Err(FetchError::Queued {
                    retry_after: ready_at.saturating_duration_since(now),
                    throttled,
                });
            }
            tokio::select! {
                changed = call.changed() => {
                    if changed.is_err() {
                        // The call ended (its last state was seen above), or its task was
                        // dropped without an answer (shut down, or it panicked).
                        return match &call.borrow().stage {
                            Stage::Done(result) => result.clone(),
                            _ => Err(FetchError::Upstream(Arc::new(call_lost()))),
                        };
                    }
                }
                () = tokio::time::sleep_until(give_up) => {}
            }
        }
    }

    /// One upstream call, measured, its outcome told to the admission path. The in-flight gauge
    /// is a guard: a call dropped midway (its renewal aborted) still leaves it.
    pub(super) async fn call_upstream(
        &self,
        token: &str,
        kind: Kind,
        permit: Permit,
    ) -> Result<Issued, UpstreamError> {
        let _in_flight = InFlight::new(&self.metrics.upstream_in_flight);
        let started = Instant::now();
        let result = self.retriever.fetch(token).await;
        let took = started.elapsed();
        let (outcome, pace) = match &result {
            Ok(_) => ("success", Outcome::Accepted),
            Err(e) if e.is_throttling() => ("transient_error", Outcome::Throttled),
            Err(e) if e.class() == ErrorClass::Permanent => ("permanent_error", Outcome::Accepted),
            Err(_) => ("transient_error", Outcome::Failed),
        };
        self.admission.record(permit, pace, took);
        self.metrics
            .upstream_duration
            .with_label_values(&[outcome])
            .observe(took.as_secs_f64());
        if let Err(e) = &result {
            self.metrics
                .cache_errors
                .with_label_values(&[kind.as_str(), e.code_label()])
                .inc();
        }
        result
    }
}

/// A call's task ended without an answer: the runtime is shutting down, or the task panicked (its
/// entry in `calls` is gone with it, so the next request makes a fresh call).
pub(super) fn call_lost() -> UpstreamError {
    UpstreamError::new(503, "CallLost", "the upstream call ended without an answer")
}

pub(super) fn shut_down() -> UpstreamError {
    UpstreamError::new(503, "ShuttingDown", "the agent is shutting down")
}

/// `pod_identity_upstream_in_flight` up while it lives.
pub(super) struct InFlight(IntGauge);

impl InFlight {
    pub(super) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A token's entry in the `calls` map, removed when the call's task ends — returns, panics or is
/// aborted — so that a lost call never leaves its token answered 503 for ever. Removes only its
/// own call's entry (the receiver's channel), never a later call's.
pub(super) struct CallGuard<R: Retriever> {
    inner: Weak<Inner<R>>,
    token: Arc<str>,
    call: watch::Receiver<CallState>,
}

impl<R: Retriever> CallGuard<R> {
    pub(super) fn new(
        inner: &Arc<Inner<R>>,
        token: Arc<str>,
        call: &watch::Receiver<CallState>,
    ) -> Self {
        CallGuard {
            inner: Arc::downgrade(inner),
            token,
            call: call.clone(),
        }
    }
}

impl<R: Retriever> Drop for CallGuard<R> {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut calls = lock(&inner.calls);
        if calls
            .get(&self.token)
            .is_some_and(|c| c.same_channel(&self.call))
        {
            calls.remove(&self.token);
        }
    }
}

impl<R: Retriever> CredentialCache<R> {
    /// Credentials for a token [`Self::lookup`] did not find: from the token's upstream call,
    /// started here or shared with the requests already waiting for it.
    /// The call waits in `share`'s queue (the pod the kernel saw the caller in), and counts
    /// against it alone — even after the caller has gone.
    pub async fn fetch(
        &self,
        token: &str,
        claims: Arc<Claims>,
        share: Share,
    ) -> Result<Served, FetchError> {
        let arrived = Instant::now();
        let inner = &self.inner;
        let (Some(entries), Some(refused)) = (&inner.entries, &inner.refused) else {
            return self.fetch_uncached(token, share, arrived).await;
        };
        if let Some((seen, err)) = refused.get(token).await
            && seen.elapsed() < inner.config.admission.permanent_error_ttl
        {
            inner.metrics.permanent_error_hits.inc();
            return Err(FetchError::Upstream(err));
        }
        let (call, lookup) = loop {
            enum Found {
                Call(watch::Receiver<CallState>),
                Started(watch::Receiver<CallState>),
                Cached,
            }
            let found = {
                let mut calls = lock(&inner.calls);
                if let Some(call) = calls.get(token) {
                    Found::Call(call.clone())
                } else if entries.contains_key(token) {
                    // Stored by a call that ended since the lookup (which stores, then leaves).
                    Found::Cached
                } else {
                    let key: Arc<str> = Arc::from(token);
                    let (tx, rx) = watch::channel(CallState {
                        stage: Stage::Calling,
                        throttled: None,
                    });
                    calls.insert(key.clone(), rx.clone());
                    // The guard leaves the map with the task, however it ends.
                    let guard = CallGuard::new(inner, key.clone(), &rx);
                    let call = inner
                        .clone()
                        .call(key, Some(claims.clone()), share.clone(), tx);
                    tokio::spawn(async move {
                        let _guard = guard;
                        call.await
                    });
                    Found::Started(rx)
                }
            };
            match found {
                Found::Call(rx) => break (rx, Lookup::Coalesced),
                Found::Started(rx) => break (rx, Lookup::Miss),
                Found::Cached => {
                    if let Some(served) = self.lookup(token).await {
                        return Ok(served);
                    }
                }
            }
        };
        let fetched = inner
            .wait(call, arrived)
            .await
            .inspect_err(|e| inner.count_deferred(e))?;
        inner.states.lookup(lookup).inc();
        Ok(Served {
            issued: fetched.issued,
            lookup,
            entry: fetched.entry,
        })
    }

    /// Caching off: an upstream call per request, paced all the same, abandoned with the request.
    async fn fetch_uncached(
        &self,
        token: &str,
        share: Share,
        arrived: Instant,
    ) -> Result<Served, FetchError> {
        let (tx, rx) = watch::channel(CallState {
            stage: Stage::Calling,
            throttled: None,
        });
        let call = self.inner.clone().call(Arc::from(token), None, share, tx);
        let fetched = tokio::select! {
            biased;
            done = call => done,
            done = self.inner.wait(rx, arrived) => done,
        }
        .inspect_err(|e| self.inner.count_deferred(e))?;
        self.inner.states.miss.inc();
        Ok(Served {
            issued: fetched.issued,
            lookup: Lookup::Miss,
            entry: None,
        })
    }
}
