//! The credential cache: wraps a [`Retriever`] so that pods are answered from memory.
//!
//! - Keyed by the token, bounded (least recently used evicted first) by `--max-cache-size`.
//!   Only pods' requests count as use: renewals read no entry through the cache.
//! - A token not cached gets one upstream call, in a task of its own, shared by every request
//!   for the token while it runs (nobody polls) and stored when it succeeds — even if the pod
//!   that asked has given up, so that its SDK's retry is a hit. The call waits for its turn in
//!   the admission path ([`super::admission`]), which paces calls to what EKS Auth accepts; a
//!   throttled call goes back to the head of the queue. A request waits for the call until its
//!   deadline, and is answered 429 with `Retry-After` when the credentials cannot come by then.
//! - A token's permanent error (invalid, expired, denied, no association) is remembered for a
//!   short while: an SDK retrying a bad token costs one upstream call.
//! - Each entry has a renewal task that sleeps until the entry is due — the earlier of the
//!   retention limit and expiry minus a lead, spread by jitter — and renews it, paced by
//!   `--max-service-qps` and after pods' first requests. A transient failure keeps the old
//!   credentials and retries with backoff; a permanent one evicts. Entries whose token has
//!   expired, or whose owner is gone (a predicate passed in), are evicted instead of renewed.
//!   An entry removed from the cache is never renewed again, nor is one superseded by a newer
//!   verified entry of the same pod, namespace and service account (the kubelet rotated the
//!   token): that one is still served until it is evicted or expires.
//! - Removal is exact: an entry judged stale is removed only if it is still the one cached.
//! - Nothing on the hit path calls upstream, builds JSON or holds a lock across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};
use prometheus::{IntCounter, IntGauge};
use rand::Rng as _;
use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::admission::{Admission, AdmissionGauges, Class, Outcome, Permit};
use super::{ErrorClass, Issued, Retriever, UpstreamError};
use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::metrics::Metrics;
use crate::token::Claims;

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// From the cache.
    Hit,
    /// This request's own upstream call.
    Miss,
    /// Another request's upstream call for the same token, shared.
    Coalesced,
}

impl Lookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Coalesced => "coalesced",
        }
    }
}

/// Why the cache has no credentials for a request.
#[derive(Debug, Clone)]
pub enum FetchError {
    /// EKS Auth refused the token, or failed, or could not be reached.
    Upstream(Arc<UpstreamError>),
    /// The token's upstream call was still waiting for its turn (EKS Auth's pace) at the
    /// request's deadline; its credentials are expected in `retry_after`. `throttled`: EKS Auth's
    /// last answer to the call, when it was a throttling.
    Queued {
        retry_after: Duration,
        throttled: Option<Arc<UpstreamError>>,
    },
}

impl FetchError {
    /// Whether asking again later can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Upstream(e) => e.class() == ErrorClass::Transient,
            FetchError::Queued { .. } => true,
        }
    }

    /// The error code, for logs.
    pub fn code(&self) -> &str {
        match self {
            FetchError::Upstream(e) => &e.code,
            FetchError::Queued { .. } => "Queued",
        }
    }
}

/// A cached token and its current credentials.
pub struct Entry {
    token: Arc<str>,
    /// The token's claims, read once when it was first seen. Once EKS Auth accepted the token
    /// (an entry fetched or renewed with it), they are as good as verified.
    pub claims: Arc<Claims>,
    issued: ArcSwap<Issued>,
    /// The cgroup of the last caller the kernel attributed (0: none), for the owner predicate.
    owner_cgroup: AtomicU64,
    /// EKS Auth accepted this entry's own token (false for a rotation alias until it renews).
    verified: AtomicBool,
    /// Removed from the cache (evicted, invalidated or replaced): never renewed again.
    retired: AtomicBool,
    /// A newer verified entry of the same pod, namespace and service account exists.
    superseded: AtomicBool,
    renewal: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Entry {
    fn new(token: Arc<str>, claims: Arc<Claims>, issued: Arc<Issued>, verified: bool) -> Self {
        Entry {
            token,
            claims,
            issued: ArcSwap::new(issued),
            owner_cgroup: AtomicU64::new(0),
            verified: AtomicBool::new(verified),
            retired: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
            renewal: Mutex::new(None),
        }
    }

    pub fn issued(&self) -> Arc<Issued> {
        self.issued.load_full()
    }

    /// Records the cgroup the entry was last served to.
    pub fn set_owner_cgroup(&self, cgroup_id: u64) {
        self.owner_cgroup.store(cgroup_id, Ordering::Relaxed);
    }

    pub fn owner_cgroup(&self) -> Option<u64> {
        match self.owner_cgroup.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// Whether EKS Auth accepted this entry's own token (a rotation alias is not, until it renews).
    pub fn is_verified(&self) -> bool {
        self.verified.load(Ordering::Relaxed)
    }

    /// Whether a newer verified entry of the same pod has taken over its renewals.
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Relaxed)
    }

    /// Still cached and not superseded: worth renewing.
    fn renewable(&self) -> bool {
        !self.retired.load(Ordering::Relaxed) && !self.is_superseded()
    }

    fn abort_renewal(&self) {
        if let Ok(mut renewal) = self.renewal.lock()
            && let Some(task) = renewal.take()
        {
            task.abort();
        }
    }

    /// Which of two tokens of a pod the kubelet issued later.
    fn age_key(&self) -> (i64, i64) {
        (self.claims.iat.unwrap_or(i64::MIN), self.claims.exp)
    }
}

/// Evicted or dropped: its renewal task goes too.
impl Drop for Entry {
    fn drop(&mut self) {
        self.abort_renewal();
    }
}

/// Decides whether an entry is still worth renewing (policy, passed in by the caller).
pub type KeepPredicate = Arc<dyn Fn(&Entry) -> bool + Send + Sync>;

/// A request's answer: the credentials and how they were found.
#[derive(Clone)]
pub struct Served {
    pub issued: Arc<Issued>,
    pub lookup: Lookup,
    /// The cache entry, when caching is on.
    pub entry: Option<Arc<Entry>>,
}

/// The cache. Cheap to clone; the renewal tasks end when the last clone is dropped.
pub struct CredentialCache<R> {
    inner: Arc<Inner<R>>,
}

impl<R> Clone for CredentialCache<R> {
    fn clone(&self) -> Self {
        CredentialCache {
            inner: self.inner.clone(),
        }
    }
}

/// The `pod_identity_cache_state` series, resolved once: no label lookup per request.
struct StateCounters {
    hit: IntCounter,
    miss: IntCounter,
    coalesced: IntCounter,
    refresh: IntCounter,
}

impl StateCounters {
    fn new(metrics: &Metrics) -> Self {
        let state = |s: &str| metrics.cache_state.with_label_values(&[s]);
        StateCounters {
            hit: state("hit"),
            miss: state("miss"),
            coalesced: state("coalesced"),
            refresh: state("refresh"),
        }
    }

    fn lookup(&self, lookup: Lookup) -> &IntCounter {
        match lookup {
            Lookup::Hit => &self.hit,
            Lookup::Miss => &self.miss,
            Lookup::Coalesced => &self.coalesced,
        }
    }
}

/// Whose credentials an entry holds: the pod its token names, and the namespace and service
/// account. Read from a verified entry's claims (EKS Auth accepted the token, so they are
/// genuine), shared rather than copied; compared and hashed by those three names.
#[derive(Debug, Clone)]
struct Identity(Arc<Claims>);

impl Identity {
    /// The identity `claims` name, if they name a pod, a namespace and a service account.
    fn of_claims(claims: &Arc<Claims>) -> Option<Identity> {
        let identity = Identity(claims.clone());
        identity.names()?;
        Some(identity)
    }

    fn of(entry: &Entry) -> Option<Identity> {
        Identity::of_claims(&entry.claims)
    }

    /// Pod UID, namespace, service account.
    fn names(&self) -> Option<(&str, &str, &str)> {
        Some((
            self.0.pod_uid()?,
            self.0.namespace()?,
            self.0.service_account()?,
        ))
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.names() == other.names()
    }
}

impl Eq for Identity {}

impl std::hash::Hash for Identity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.names().hash(state);
    }
}

/// A token's permanent error, and when EKS Auth gave it.
type Refusal = (Instant, Arc<UpstreamError>);

/// The newest verified entry of each identity.
type Identities = Arc<Mutex<HashMap<Identity, Weak<Entry>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a token's upstream call stands, for the requests waiting on it.
#[derive(Clone)]
struct CallState {
    stage: Stage,
    /// EKS Auth's last throttling of the call, if it was throttled.
    throttled: Option<Arc<UpstreamError>>,
}

#[derive(Clone)]
enum Stage {
    /// Waiting for its turn, as this cold ticket.
    Queued(u64),
    /// Under way.
    Calling,
    Done(Result<Fetched, FetchError>),
}

/// What an upstream call produced.
#[derive(Clone)]
struct Fetched {
    issued: Arc<Issued>,
    entry: Option<Arc<Entry>>,
}

/// Why an upstream call is made: a pod's first request, or a renewal.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Fetch,
    Refresh,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Fetch => "fetch",
            Kind::Refresh => "refresh",
        }
    }
}

struct Inner<R> {
    retriever: R,
    /// `None` when caching is off.
    entries: Option<Cache<Arc<str>, Arc<Entry>>>,
    /// Permanent errors per token, with when they were seen (`None` when caching is off).
    refused: Option<Cache<Arc<str>, Refusal>>,
    /// Upstream calls under way for tokens not cached yet.
    calls: Mutex<HashMap<Arc<str>, watch::Receiver<CallState>>>,
    identities: Identities,
    config: CacheConfig,
    clock: Clock,
    admission: Admission,
    /// `--max-service-qps`: one renewal per tick, in the order they asked (the lock is fair). On
    /// tokio's clock, so that it follows the runtime's time (paused in tests) as every other
    /// timer of the cache does; after an idle spell one renewal goes at once, never a burst.
    renewal_pace: tokio::sync::Mutex<Interval>,
    keep: Option<KeepPredicate>,
    metrics: Metrics,
    states: StateCounters,
}

impl<R: Retriever> CredentialCache<R> {
    /// A cache in front of `retriever`. `keep` decides whether an entry is still worth renewing.
    /// Starts the admission path's dispatcher: call it inside a tokio runtime.
    pub fn new(
        retriever: R,
        config: CacheConfig,
        clock: Clock,
        metrics: Metrics,
        keep: Option<KeepPredicate>,
    ) -> Self {
        let identities = Identities::default();
        let entries = config.enabled().then(|| {
            let evicted = metrics.cache_state.with_label_values(&["evicted"]);
            let entries = metrics.cache_entries.clone();
            let identities = identities.clone();
            Cache::builder()
                .max_capacity(config.max_entries)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .eviction_listener(move |_token, entry: Arc<Entry>, cause| {
                    // Not cached any more (replaced ones included): its renewal stops.
                    entry.retired.store(true, Ordering::Relaxed);
                    forget_identity(&identities, &entry);
                    if cause != RemovalCause::Replaced {
                        evicted.inc();
                        entries.dec();
                    }
                })
                .build()
        });
        // Moka's time-to-live frees the memory; the age is checked on reads with tokio's clock.
        let refused = config.enabled().then(|| {
            Cache::builder()
                .max_capacity(config.admission.permanent_error_entries)
                .time_to_live(config.admission.permanent_error_ttl)
                .build()
        });
        let period = Duration::from_secs(1) / config.renewals_per_second.max(1);
        let mut renewal_pace = tokio::time::interval(period.max(Duration::from_nanos(1)));
        renewal_pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let queued = |t: &str| metrics.upstream_queued.with_label_values(&[t]);
        let admission = Admission::new(
            config.admission.clone(),
            AdmissionGauges {
                rate: metrics.upstream_rate.clone(),
                queued_cold: queued(Kind::Fetch.as_str()),
                queued_renewals: queued(Kind::Refresh.as_str()),
            },
        );
        CredentialCache {
            inner: Arc::new(Inner {
                retriever,
                entries,
                refused,
                calls: Mutex::new(HashMap::new()),
                identities,
                config,
                clock,
                admission,
                renewal_pace: tokio::sync::Mutex::new(renewal_pace),
                keep,
                states: StateCounters::new(&metrics),
                metrics,
            }),
        }
    }

    /// Cached credentials for `token`, if they have comfortable life left. Entries whose
    /// credentials ran short (renewals kept failing) are dropped here, so [`Self::fetch`] tries
    /// afresh.
    pub async fn lookup(&self, token: &str) -> Option<Served> {
        let entries = self.inner.entries.as_ref()?;
        let entry = entries.get(token).await?;
        let issued = entry.issued();
        if !self.inner.usable(&issued) {
            self.inner.remove_exact(&entry).await;
            return None;
        }
        self.inner.states.hit.inc();
        Some(Served {
            issued,
            lookup: Lookup::Hit,
            entry: Some(entry),
        })
    }

    /// Credentials for a token [`Self::lookup`] did not find: from the token's upstream call,
    /// started here or shared with the requests already waiting for it.
    pub async fn fetch(&self, token: &str, claims: Arc<Claims>) -> Result<Served, FetchError> {
        let arrived = Instant::now();
        let inner = &self.inner;
        let (Some(entries), Some(refused)) = (&inner.entries, &inner.refused) else {
            return self.fetch_uncached(token, arrived).await;
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
                    tokio::spawn(inner.clone().call(key, Some(claims.clone()), tx));
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
    async fn fetch_uncached(&self, token: &str, arrived: Instant) -> Result<Served, FetchError> {
        let (tx, rx) = watch::channel(CallState {
            stage: Stage::Calling,
            throttled: None,
        });
        let call = self.inner.clone().call(Arc::from(token), None, tx);
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

    /// Token rotation during an EKS Auth failure: the newest verified entry of the pod, namespace
    /// and service account that `claims` name (`pod_uid` is the caller's pod, from the kernel),
    /// if its credentials are usable. It is stored under the new token too — an alias, renewed
    /// (and so verified) with the new token once EKS Auth answers — so the pod's next requests
    /// are hits. The caller decides when this applies.
    pub async fn serve_rotated(
        &self,
        token: &str,
        claims: Arc<Claims>,
        pod_uid: &str,
    ) -> Option<Served> {
        let inner = &self.inner;
        let entries = inner.entries.as_ref()?;
        // The pod the kernel saw must be the one the token names.
        if claims.pod_uid() != Some(pod_uid) {
            return None;
        }
        let identity = Identity::of_claims(&claims)?;
        let verified = lock(&inner.identities).get(&identity)?.upgrade()?;
        let issued = verified.issued();
        if verified.retired.load(Ordering::Relaxed) || !inner.usable(&issued) {
            return None;
        }
        // Not verified: it does not supersede anything until its own token renews it.
        let alias = Arc::new(Entry::new(Arc::from(token), claims, issued, false));
        let stored = entries
            .entry(alias.token.clone())
            .or_insert_with(std::future::ready(alias.clone()))
            .await;
        if stored.is_fresh() {
            inner.metrics.cache_entries.inc();
            inner.schedule_renewal(&alias, inner.backoff(0));
            tracing::warn!(
                pod_uid,
                namespace = alias.claims.namespace(),
                service_account = alias.claims.service_account(),
                "EKS Auth failed for a rotated token; serving the pod's cached credentials"
            );
        }
        let entry = stored.into_value();
        inner.states.hit.inc();
        Some(Served {
            issued: entry.issued(),
            lookup: Lookup::Hit,
            entry: Some(entry),
        })
    }

    /// A verified entry with usable credentials that `matches`. Walks the cache (without
    /// touching recency): not for the request path.
    pub fn find(&self, matches: impl Fn(&Entry) -> bool) -> Option<Arc<Entry>> {
        let entries = self.inner.entries.as_ref()?;
        entries.iter().map(|(_, entry)| entry).find(|entry| {
            entry.is_verified() && matches(entry) && self.inner.usable(&entry.issued())
        })
    }

    /// Entries cached now.
    pub async fn entry_count(&self) -> u64 {
        match &self.inner.entries {
            Some(entries) => {
                entries.run_pending_tasks().await;
                entries.entry_count()
            }
            None => 0,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.entries.is_some()
    }
}

/// When a request waiting for a call expected to end at `ready_at` gives up, if it must: at its
/// deadline when the credentials should be there by then; otherwise so that the SDK's next
/// attempt, `retry_delay` after the refusal (botocore and the JS SDK pause a fixed second and
/// ignore `Retry-After`), arrives as they are expected — never past the deadline, so that each
/// of the SDK's attempts waits its share instead of all three failing within two seconds.
fn give_up_at(
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
    /// A request answered "not yet" (its call queued past its deadline, or no room in the queue).
    fn count_deferred(&self, e: &FetchError) {
        if matches!(e, FetchError::Queued { .. }) {
            self.metrics.upstream_deferred.inc();
        }
    }

    /// Whether credentials have enough life left to hand out.
    fn usable(&self, issued: &Issued) -> bool {
        self.clock.until(issued.credentials.expiration) >= self.config.min_remaining
    }

    /// A token's first upstream call, paced by the admission path; a throttled call goes back to
    /// the head of the queue. Stores what it got when `claims` are given (caching on), and tells
    /// the requests waiting on `progress`.
    async fn call(
        self: Arc<Self>,
        token: Arc<str>,
        claims: Option<Arc<Claims>>,
        progress: watch::Sender<CallState>,
    ) -> Result<Fetched, FetchError> {
        let shared = claims.is_some();
        let result = match self.call_paced(&token, &progress).await {
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
        if shared {
            lock(&self.calls).remove(&token);
        }
        result
    }

    async fn call_paced(
        &self,
        token: &str,
        progress: &watch::Sender<CallState>,
    ) -> Result<Issued, FetchError> {
        let mut ticket =
            self.admission
                .enqueue(Class::Cold)
                .map_err(|retry_after| FetchError::Queued {
                    retry_after,
                    throttled: None,
                })?;
        let mut throttled = 0;
        loop {
            let seq = ticket.seq();
            progress.send_modify(|state| state.stage = Stage::Queued(seq));
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
                    ticket = self.admission.requeue(seq);
                }
                result => return result.map_err(|e| FetchError::Upstream(Arc::new(e))),
            }
        }
    }

    /// Waits for a token's call, until the request's deadline at most (see [`give_up_at`]). The
    /// estimate is made on arrival and again whenever the call moves or the give-up time comes
    /// (the rate may have changed meanwhile).
    async fn wait(
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
                    Stage::Queued(seq) => now + self.admission.eta(*seq) + self.admission.latency(),
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
                        // The call ended (its last state was seen above) or was dropped.
                        return match &call.borrow().stage {
                            Stage::Done(result) => result.clone(),
                            _ => Err(FetchError::Upstream(Arc::new(shut_down()))),
                        };
                    }
                }
                () = tokio::time::sleep_until(give_up) => {}
            }
        }
    }

    /// Stores a verified entry for `token` and starts its renewals.
    async fn store(
        self: &Arc<Self>,
        token: Arc<str>,
        claims: Arc<Claims>,
        issued: Issued,
    ) -> Arc<Entry> {
        let entry = Arc::new(Entry::new(token.clone(), claims, Arc::new(issued), true));
        if let Some(entries) = &self.entries {
            let put = entry.clone();
            let stored = entries
                .entry(token)
                .and_compute_with(|_| std::future::ready(Op::Put(put)))
                .await;
            if matches!(stored, CompResult::Inserted(_)) {
                self.metrics.cache_entries.inc();
            }
            self.schedule_renewal(&entry, self.renewal_delay(&entry.issued()));
            self.register(&entry);
            // Moka applies its bound (and the recency of buffered reads) in housekeeping: run it
            // now, on the miss path, so the cache never holds more than its size.
            entries.run_pending_tasks().await;
        }
        entry
    }

    /// Records a verified entry as its identity's newest, superseding an older one; or marks it
    /// superseded when a newer token of the pod is verified already.
    fn register(&self, entry: &Arc<Entry>) {
        let Some(identity) = Identity::of(entry) else {
            return;
        };
        let mut identities = lock(&self.identities);
        let current = identities.get(&identity).and_then(Weak::upgrade);
        match current {
            Some(current) if Arc::ptr_eq(&current, entry) => {}
            Some(current) if current.age_key() > entry.age_key() && current.renewable() => {
                entry.superseded.store(true, Ordering::Relaxed);
            }
            _ => {
                identities.insert(identity, Arc::downgrade(entry));
                drop(identities);
                if let Some(older) = current {
                    older.superseded.store(true, Ordering::Relaxed);
                    older.abort_renewal();
                    tracing::debug!(
                        namespace = entry.claims.namespace(),
                        service_account = entry.claims.service_account(),
                        "a newer token of the pod is verified: the older entry is no longer renewed"
                    );
                }
            }
        }
    }

    /// One upstream call, measured, its outcome told to the admission path. The in-flight gauge
    /// is a guard: a call dropped midway (its renewal aborted) still leaves it.
    async fn call_upstream(
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

    /// When fresh credentials are due for renewal: the earlier of the retention limit and
    /// expiry minus a lead (capped at half their life), less a random share of the jitter.
    fn renewal_delay(&self, issued: &Issued) -> Duration {
        let life = self.clock.until(issued.credentials.expiration);
        let lead = self.config.renew_before_expiry.min(life / 2);
        let due = self.config.max_retention.min(life - lead);
        let jitter = self.config.renewal_jitter.min(due / 4);
        let spread = rand::rng().random_range(Duration::ZERO..=jitter);
        due - spread
    }

    fn backoff(&self, failures: u32) -> Duration {
        let (first, longest) = self.config.retry_backoff;
        first.saturating_mul(1 << failures.min(16)).min(longest)
    }

    fn schedule_renewal(self: &Arc<Self>, entry: &Arc<Entry>, first: Duration) {
        let task = tokio::spawn(renew(Arc::downgrade(self), Arc::downgrade(entry), first));
        if let Ok(mut renewal) = entry.renewal.lock() {
            *renewal = Some(task.abort_handle());
        }
    }

    /// Removes `entry` if it is still the one cached for its token: never a fresher one stored
    /// since under the same key.
    async fn remove_exact(&self, entry: &Arc<Entry>) {
        if let Some(entries) = &self.entries {
            entries
                .entry(entry.token.clone())
                .and_compute_with(|cached| {
                    std::future::ready(match cached {
                        Some(cached) if Arc::ptr_eq(cached.value(), entry) => Op::Remove,
                        _ => Op::Nop,
                    })
                })
                .await;
        }
    }
}

/// An evicted entry is no longer its identity's newest.
fn forget_identity(identities: &Identities, entry: &Arc<Entry>) {
    let Some(identity) = Identity::of(entry) else {
        return;
    };
    let mut identities = lock(identities);
    if identities
        .get(&identity)
        .is_some_and(|newest| std::ptr::eq(newest.as_ptr(), Arc::as_ptr(entry)))
    {
        identities.remove(&identity);
    }
}

fn shut_down() -> UpstreamError {
    UpstreamError::new(503, "ShuttingDown", "the agent is shutting down")
}

/// `pod_identity_upstream_in_flight` up while it lives.
struct InFlight(IntGauge);

impl InFlight {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An entry's renewal loop. Holds only weak references while it sleeps, so that an evicted
/// entry or a dropped cache is not kept alive by it. Reads the entry itself, never through the
/// cache, so renewals do not count as use.
///
/// A renewal ([`renew_once`]) is boxed, allocated only once the entry is due, and within it what
/// is large — the SDK's call, several KiB of state, and the cache's removal — only once it runs:
/// otherwise every entry's task would carry all of it while it sleeps, and every renewal waiting
/// for its turn during an outage (all of them, at worst) the SDK's share. A sleeping task is the
/// timer and two weak references.
async fn renew<R: Retriever>(inner: Weak<Inner<R>>, entry: Weak<Entry>, first: Duration) {
    let mut next = Next::After(first);
    let mut failures = 0;
    while let Next::After(delay) = next {
        tokio::time::sleep(delay).await;
        let (Some(inner), Some(entry)) = (inner.upgrade(), entry.upgrade()) else {
            return;
        };
        next = Box::pin(renew_once(&inner, &entry, &mut failures)).await;
    }
}

/// What a renewal loop does next.
enum Next {
    /// Renew again after this long.
    After(Duration),
    /// Stop: the entry is gone, superseded or refused, or the cache is shutting down.
    Stop,
}

/// One renewal of `entry`, when it is due: paced by `--max-service-qps` and the admission path.
/// `failures`: transient failures in a row so far (for the backoff).
async fn renew_once<R: Retriever>(
    inner: &Arc<Inner<R>>,
    entry: &Arc<Entry>,
    failures: &mut u32,
) -> Next {
    if !entry.renewable() {
        return Next::Stop;
    }
    let token_expired = inner.clock.unix_now() >= entry.claims.exp;
    let owner_gone = inner.keep.as_ref().is_some_and(|keep| !keep(entry));
    if token_expired || owner_gone {
        tracing::info!(
            namespace = entry.claims.namespace(),
            service_account = entry.claims.service_account(),
            reason = if token_expired {
                "token expired"
            } else {
                "owner gone"
            },
            "cached credentials no longer renewed"
        );
        Box::pin(inner.remove_exact(entry)).await;
        return Next::Stop;
    }
    inner.renewal_pace.lock().await.tick().await;
    let Ok(ticket) = inner.admission.enqueue(Class::Renewal) else {
        return Next::Stop;
    };
    let Some(permit) = ticket.admitted().await else {
        return Next::Stop;
    };
    // Evicted or superseded while it waited for its turn.
    if !entry.renewable() {
        inner.admission.refund(permit);
        return Next::Stop;
    }
    match Box::pin(inner.call_upstream(&entry.token, Kind::Refresh, permit)).await {
        Ok(issued) => {
            let delay = inner.renewal_delay(&issued);
            entry.issued.store(Arc::new(issued));
            entry.verified.store(true, Ordering::Relaxed);
            inner.states.refresh.inc();
            inner.register(entry);
            *failures = 0;
            Next::After(delay)
        }
        Err(e) if e.class() == ErrorClass::Permanent => {
            tracing::warn!(code = %e.code, message = %e.message, namespace = entry.claims.namespace(),
                "renewal refused permanently; evicting cached credentials");
            Box::pin(inner.remove_exact(entry)).await;
            Next::Stop
        }
        Err(e) => {
            // The first retry waits the first backoff (`retry_backoff.0`), then doubling.
            let delay = inner.backoff(*failures);
            *failures += 1;
            tracing::warn!(code = %e.code, message = %e.message, retry_in = ?delay,
                "renewal failed; keeping the cached credentials");
            Next::After(delay)
        }
    }
}

#[cfg(test)]
mod tests;
