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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use moka::future::Cache;
use moka::notification::RemovalCause;
use prometheus::IntCounter;
use tokio::sync::watch;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::admission::{Admission, AdmissionGauges, Share};
use super::{Issued, Retriever, UpstreamError};
use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::metrics::Metrics;

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
    /// The error code, for logs.
    pub fn code(&self) -> &str {
        match self {
            FetchError::Upstream(e) => &e.code,
            FetchError::Queued { .. } => "Queued",
        }
    }
}

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
    /// Waiting for its turn, as this cold ticket of this share.
    Queued(Share, u64),
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
}

mod call;
mod entry;
mod renewal;
mod store;

pub use entry::{Entry, KeepPredicate};
use entry::{Identity, forget_identity};

#[cfg(test)]
mod tests;
