//! The credential cache: wraps a [`Retriever`] so that pods are answered from memory.
//!
//! - Keyed by the token, bounded (least recently used evicted first) by `--max-cache-size`.
//! - Concurrent requests for one uncached token share one upstream call (moka's
//!   `try_get_with` coalesces them; nobody polls).
//! - Each entry has a renewal task that sleeps until the entry is due — the earlier of the
//!   retention limit and expiry minus a lead, spread by jitter — and renews it, paced by
//!   `--max-service-qps`. A transient failure keeps the old credentials and retries with backoff;
//!   a permanent one evicts. Entries whose token has expired, or whose owner is gone (a predicate
//!   passed in), are evicted instead of renewed.
//! - Nothing on the hit path calls upstream, builds JSON or holds a lock across an await.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use moka::future::Cache;
use moka::notification::RemovalCause;
use prometheus::IntCounter;
use rand::Rng as _;

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

/// A cached token and its current credentials.
pub struct Entry {
    token: Arc<str>,
    /// The token's claims, read once when it was first seen. EKS Auth accepted the token, so
    /// they are as good as verified.
    pub claims: Arc<Claims>,
    issued: ArcSwap<Issued>,
    /// The cgroup of the last caller the kernel attributed (0: none), for the owner predicate.
    owner_cgroup: AtomicU64,
    renewal: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Entry {
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
}

/// Evicted or dropped: its renewal task goes too.
impl Drop for Entry {
    fn drop(&mut self) {
        if let Ok(mut renewal) = self.renewal.lock()
            && let Some(task) = renewal.take()
        {
            task.abort();
        }
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

struct Inner<R> {
    retriever: R,
    /// `None` when caching is off.
    entries: Option<Cache<Arc<str>, Arc<Entry>>>,
    config: CacheConfig,
    clock: Clock,
    renewal_pace: DefaultDirectRateLimiter,
    keep: Option<KeepPredicate>,
    metrics: Metrics,
    states: StateCounters,
}

impl<R: Retriever> CredentialCache<R> {
    /// A cache in front of `retriever`. `keep` decides whether an entry is still worth renewing.
    pub fn new(
        retriever: R,
        config: CacheConfig,
        clock: Clock,
        metrics: Metrics,
        keep: Option<KeepPredicate>,
    ) -> Self {
        let entries = config.enabled().then(|| {
            let evicted = metrics.cache_state.with_label_values(&["evicted"]);
            let entries = metrics.cache_entries.clone();
            Cache::builder()
                .max_capacity(config.max_entries)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .eviction_listener(move |_token, _entry, cause| {
                    // Entries are only ever inserted where none was, so nothing is replaced.
                    if cause != RemovalCause::Replaced {
                        evicted.inc();
                        entries.dec();
                    }
                })
                .build()
        });
        let qps = NonZeroU32::new(config.renewals_per_second).unwrap_or(NonZeroU32::MIN);
        CredentialCache {
            inner: Arc::new(Inner {
                retriever,
                entries,
                config,
                clock,
                renewal_pace: RateLimiter::direct(Quota::per_second(qps)),
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
            entries.invalidate(token).await;
            return None;
        }
        self.inner.states.hit.inc();
        Some(Served {
            issued,
            lookup: Lookup::Hit,
            entry: Some(entry),
        })
    }

    /// Credentials for a token [`Self::lookup`] did not find, from one upstream call shared by
    /// every concurrent request for the token.
    pub async fn fetch(
        &self,
        token: &str,
        claims: Arc<Claims>,
    ) -> Result<Served, Arc<UpstreamError>> {
        let inner = &self.inner;
        let Some(entries) = &inner.entries else {
            let issued = inner
                .call_upstream(token, "fetch")
                .await
                .map_err(Arc::new)?;
            inner.states.miss.inc();
            return Ok(Served {
                issued: Arc::new(issued),
                lookup: Lookup::Miss,
                entry: None,
            });
        };
        let ran = AtomicBool::new(false);
        let key: Arc<str> = Arc::from(token);
        let entry = entries
            .try_get_with(key.clone(), async {
                ran.store(true, Ordering::Relaxed);
                let issued = inner.call_upstream(token, "fetch").await?;
                Ok::<_, UpstreamError>(Arc::new(Entry {
                    token: key,
                    claims,
                    issued: ArcSwap::from_pointee(issued),
                    owner_cgroup: AtomicU64::new(0),
                    renewal: Mutex::new(None),
                }))
            })
            .await?;
        let lookup = if ran.load(Ordering::Relaxed) {
            inner.metrics.cache_entries.inc();
            inner.schedule_renewal(&entry);
            // Moka applies its bound (and the recency of buffered reads) in housekeeping: run it
            // now, on the miss path, so the cache never holds more than its size.
            entries.run_pending_tasks().await;
            Lookup::Miss
        } else {
            Lookup::Coalesced
        };
        inner.states.lookup(lookup).inc();
        Ok(Served {
            issued: entry.issued(),
            lookup,
            entry: Some(entry),
        })
    }

    /// A cached entry with usable credentials that `matches`, for serving a new token of the same
    /// owner while EKS Auth is failing. Walks the cache: for the failure path only.
    pub fn find(&self, matches: impl Fn(&Entry) -> bool) -> Option<Arc<Entry>> {
        let entries = self.inner.entries.as_ref()?;
        entries
            .iter()
            .map(|(_, entry)| entry)
            .find(|entry| matches(entry) && self.inner.usable(&entry.issued()))
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
    /// Whether credentials have enough life left to hand out.
    fn usable(&self, issued: &Issued) -> bool {
        self.clock.until(issued.credentials.expiration) >= self.config.min_remaining
    }

    /// One upstream call, measured.
    async fn call_upstream(
        &self,
        token: &str,
        kind: &'static str,
    ) -> Result<Issued, UpstreamError> {
        let in_flight = &self.metrics.upstream_in_flight;
        in_flight.inc();
        let started = tokio::time::Instant::now();
        let result = self.retriever.fetch(token).await;
        in_flight.dec();
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) if e.class() == ErrorClass::Permanent => "permanent_error",
            Err(_) => "transient_error",
        };
        self.metrics
            .upstream_duration
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics
                .cache_errors
                .with_label_values(&[kind, &e.code])
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

    fn schedule_renewal(self: &Arc<Self>, entry: &Arc<Entry>) {
        let task = tokio::spawn(renew(Arc::downgrade(self), Arc::downgrade(entry)));
        if let Ok(mut renewal) = entry.renewal.lock() {
            *renewal = Some(task.abort_handle());
        }
    }

    /// Whether `entry` is still the one cached for its token (not evicted or replaced).
    async fn is_cached(&self, entry: &Arc<Entry>) -> bool {
        match &self.entries {
            Some(entries) => entries
                .get(&entry.token)
                .await
                .is_some_and(|cached| Arc::ptr_eq(&cached, entry)),
            None => false,
        }
    }

    async fn evict(&self, entry: &Entry) {
        if let Some(entries) = &self.entries {
            entries.invalidate(&entry.token).await;
        }
    }
}

/// An entry's renewal loop. Holds only weak references while it sleeps, so that an evicted
/// entry or a dropped cache is not kept alive by it.
async fn renew<R: Retriever>(inner: Weak<Inner<R>>, entry: Weak<Entry>) {
    let mut delay = match (inner.upgrade(), entry.upgrade()) {
        (Some(inner), Some(entry)) => inner.renewal_delay(&entry.issued()),
        _ => return,
    };
    let mut failures = 0;
    loop {
        tokio::time::sleep(delay).await;
        let (Some(inner), Some(entry)) = (inner.upgrade(), entry.upgrade()) else {
            return;
        };
        if !inner.is_cached(&entry).await {
            return;
        }
        let token_expired = inner.clock.unix_now() >= entry.claims.exp;
        let owner_gone = inner.keep.as_ref().is_some_and(|keep| !keep(&entry));
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
            inner.evict(&entry).await;
            return;
        }
        inner.renewal_pace.until_ready().await;
        match inner.call_upstream(&entry.token, "refresh").await {
            Ok(issued) => {
                delay = inner.renewal_delay(&issued);
                entry.issued.store(Arc::new(issued));
                inner.states.refresh.inc();
                failures = 0;
            }
            Err(e) if e.class() == ErrorClass::Permanent => {
                tracing::warn!(code = %e.code, message = %e.message, namespace = entry.claims.namespace(),
                    "renewal refused permanently; evicting cached credentials");
                inner.evict(&entry).await;
                return;
            }
            Err(e) => {
                failures += 1;
                delay = inner.backoff(failures);
                tracing::warn!(code = %e.code, message = %e.message, retry_in = ?delay,
                    "renewal failed; keeping the cached credentials");
            }
        }
    }
}

#[cfg(test)]
mod tests;
