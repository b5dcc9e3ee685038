//! Cache behaviour under tokio's paused clock, against a scripted upstream.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::time::SystemTime;

use super::call::give_up_at;
use super::*;
use crate::credentials::admission::Share;
use crate::credentials::{Association, Credentials};
use crate::proof::Proof;
use crate::token::Claims;

/// EKS Auth's throttling: a token bucket.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// An upstream that mints credentials valid for `lifetime`, or answers what the script says, or
/// throttles past its rate limit.
struct Upstream {
    calls: AtomicUsize,
    throttled: AtomicUsize,
    by_token: Mutex<HashMap<String, usize>>,
    script: Mutex<VecDeque<UpstreamError>>,
    limit: Mutex<Option<Bucket>>,
    lifetime: Duration,
    delay: Duration,
    clock: Clock,
    /// The next call panics (a bug in the client, say).
    panic_next: std::sync::atomic::AtomicBool,
    /// Tokens starting with this are refused as EKS Auth refuses a forged one.
    forged_prefix: Option<&'static str>,
}

impl Upstream {
    fn new(clock: Clock, lifetime: Duration) -> Arc<Self> {
        Self::with(clock, lifetime, Duration::from_millis(20), None)
    }

    /// Answers after `delay`; throttles past `limit` (calls per second, burst).
    fn with(
        clock: Clock,
        lifetime: Duration,
        delay: Duration,
        limit: Option<(f64, f64)>,
    ) -> Arc<Self> {
        Arc::new(Upstream {
            calls: AtomicUsize::new(0),
            throttled: AtomicUsize::new(0),
            by_token: Mutex::new(HashMap::new()),
            script: Mutex::new(VecDeque::new()),
            limit: Mutex::new(limit.map(|(rate, burst)| Bucket {
                rate,
                burst,
                tokens: burst,
                at: Instant::now(),
            })),
            lifetime,
            delay,
            clock,
            panic_next: std::sync::atomic::AtomicBool::new(false),
            forged_prefix: None,
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn calls_for(&self, token: &str) -> usize {
        self.by_token
            .lock()
            .unwrap()
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    fn fail_next(&self, code: &str, status: u16) {
        self.script
            .lock()
            .unwrap()
            .push_back(UpstreamError::new(status, code, "scripted"));
    }
}

impl Retriever for Arc<Upstream> {
    async fn fetch(&self, token: &str) -> Result<Issued, UpstreamError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        *self
            .by_token
            .lock()
            .unwrap()
            .entry(token.to_owned())
            .or_default() += 1;
        let admitted = self.limit.lock().unwrap().as_mut().is_none_or(Bucket::take);
        tokio::time::sleep(self.delay).await;
        if !admitted {
            self.throttled.fetch_add(1, Ordering::SeqCst);
            return Err(UpstreamError::new(
                429,
                "ThrottlingException",
                "Rate exceeded",
            ));
        }
        if let Some(err) = self.script.lock().unwrap().pop_front() {
            return Err(err);
        }
        assert!(
            !self.panic_next.swap(false, Ordering::SeqCst),
            "the retriever panics"
        );
        if self.forged_prefix.is_some_and(|p| token.starts_with(p)) {
            return Err(UpstreamError::new(
                400,
                "InvalidTokenException",
                "signature",
            ));
        }
        Ok(Issued::new(
            Credentials {
                access_key_id: format!("ASIA{n}"),
                secret_access_key: "secret".into(),
                session_token: format!("session-for-{token}"),
                account_id: "111122223333".into(),
                expiration: self.clock.now() + self.lifetime,
            },
            Association::default(),
        ))
    }
}

fn config(max_entries: u64) -> CacheConfig {
    CacheConfig {
        max_entries,
        renewals_per_second: 1000,
        ..CacheConfig::default()
    }
}

/// `lookup`, then `fetch` on a miss, as the endpoint does.
async fn get(
    cache: &CredentialCache<Arc<Upstream>>,
    token: &str,
    claims: impl FnOnce() -> Arc<Claims>,
) -> Result<Served, FetchError> {
    match cache.lookup(token).await {
        Some(served) => Ok(served),
        None => {
            cache
                .fetch(token, claims(), Share::Pod(Arc::from(token)))
                .await
        }
    }
}

fn cache(
    upstream: &Arc<Upstream>,
    config: CacheConfig,
    keep: Option<KeepPredicate>,
) -> CredentialCache<Arc<Upstream>> {
    cache_with_metrics(upstream, config, keep, Metrics::new().unwrap())
}

fn cache_with_metrics(
    upstream: &Arc<Upstream>,
    config: CacheConfig,
    keep: Option<KeepPredicate>,
    metrics: Metrics,
) -> CredentialCache<Arc<Upstream>> {
    CredentialCache::new(upstream.clone(), config, upstream.clock, metrics, keep)
}

/// Claims of a token that lives a day.
fn subject() -> Arc<Claims> {
    Arc::new(Claims {
        exp: i64::MAX / 2,
        ..Claims::default()
    })
}

/// Claims of a token of pod `pod` (namespace `shop`, service account `sa`) issued at `iat`.
fn pod_token(pod: &str, sa: &str, iat: i64) -> Arc<Claims> {
    let claims = serde_json::json!({
        "exp": iat + 86_400, "iat": iat, "aud": "pods.eks.amazonaws.com",
        "kubernetes.io": {"namespace": "shop", "pod": {"name": "cart", "uid": pod},
                          "serviceaccount": {"name": sa, "uid": "s"}}
    });
    Arc::new(serde_json::from_value(claims).unwrap())
}

async fn key_id(cache: &CredentialCache<Arc<Upstream>>, token: &str) -> (String, Lookup) {
    let served = get(cache, token, subject).await.unwrap();
    (
        served.issued.credentials.access_key_id.clone(),
        served.lookup,
    )
}

fn upstream_status(e: FetchError) -> u16 {
    match e {
        FetchError::Upstream(e) => e.status,
        FetchError::Queued { .. } => 429,
    }
}

#[tokio::test(start_paused = true)]
async fn a_second_request_is_a_hit_without_an_upstream_call() {
    let up = Upstream::new(
        Clock::tokio(SystemTime::now()),
        Duration::from_secs(6 * 3600),
    );
    let cache = cache(&up, config(10), None);
    assert_eq!(key_id(&cache, "t1").await, ("ASIA1".into(), Lookup::Miss));
    assert_eq!(key_id(&cache, "t1").await, ("ASIA1".into(), Lookup::Hit));
    assert_eq!(up.calls(), 1);
    assert_eq!(key_id(&cache, "t2").await.1, Lookup::Miss);
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn fifty_concurrent_cold_requests_make_one_upstream_call() {
    let up = Upstream::new(
        Clock::tokio(SystemTime::now()),
        Duration::from_secs(6 * 3600),
    );
    let cache = cache(&up, config(10), None);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { key_id(&cache, "cold").await })
        })
        .collect();
    let mut lookups = Vec::new();
    for t in tasks {
        let (id, lookup) = t.await.unwrap();
        assert_eq!(id, "ASIA1");
        lookups.push(lookup);
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(lookups.iter().filter(|l| **l == Lookup::Miss).count(), 1);
    assert_eq!(
        lookups.iter().filter(|l| **l == Lookup::Coalesced).count(),
        49
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_cold_requests_share_an_error_too() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    up.fail_next("ServiceUnavailableException", 503);
    let cache = cache(&up, config(10), None);
    let (a, b) = tokio::join!(get(&cache, "t", subject), get(&cache, "t", subject));
    assert_eq!(upstream_status(a.err().unwrap()), 503);
    assert_eq!(upstream_status(b.err().unwrap()), 503);
    assert_eq!(up.calls(), 1);
    // Nothing was cached: the next request tries again.
    assert_eq!(key_id(&cache, "t").await.1, Lookup::Miss);
}

#[tokio::test(start_paused = true)]
async fn a_throttled_first_fetch_is_retried_by_the_agent_not_the_pod() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    up.fail_next("ThrottlingException", 429);
    up.fail_next("ThrottlingException", 429);
    let cache = cache(&up, config(10), None);
    assert_eq!(key_id(&cache, "t").await, ("ASIA3".into(), Lookup::Miss));
    assert_eq!(up.calls_for("t"), 3);
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_remembered_per_token_for_a_while() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let metrics = Metrics::new().unwrap();
    let cache = cache_with_metrics(&up, config(10), None, metrics.clone());
    up.fail_next("InvalidTokenException", 400);
    for _ in 0..4 {
        let err = get(&cache, "bad", subject).await.err().unwrap();
        assert_eq!(upstream_status(err), 400);
    }
    assert_eq!(
        up.calls_for("bad"),
        1,
        "an SDK retrying a bad token costs one call"
    );
    assert_eq!(metrics.permanent_error_hits.get(), 3);
    // Other tokens are not affected; a transient error is not remembered.
    up.fail_next("InternalServerException", 500);
    assert!(get(&cache, "other", subject).await.is_err());
    assert_eq!(key_id(&cache, "other").await.1, Lookup::Miss);
    // Remembered for a short while only.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(key_id(&cache, "bad").await.1, Lookup::Miss);
    assert_eq!(up.calls_for("bad"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_served_by_its_deadline_gets_429_and_its_call_goes_on() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let metrics = Metrics::new().unwrap();
    let cache = cache_with_metrics(&up, config(200), None, metrics.clone());
    // 20 go at once, then from 20/s up (each call that waited raises the rate): the last of
    // 150 calls is ~2 s away.
    let tokens: Vec<String> = (0..150).map(|i| format!("t{i}")).collect();
    let started = Instant::now();
    let tasks: Vec<_> = tokens
        .iter()
        .map(|t| {
            let (cache, t) = (cache.clone(), t.clone());
            tokio::spawn(async move {
                let r = get(&cache, &t, subject).await;
                (r.map(|s| s.lookup), started.elapsed())
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let deadline = Duration::from_millis(1500);
    for (i, (r, took)) in results.iter().enumerate() {
        assert!(
            *took <= deadline + Duration::from_millis(1),
            "{i}: {took:?}"
        );
        match r {
            Ok(_) => {}
            Err(FetchError::Queued { retry_after, .. }) => {
                // Refused so that the SDK's retry, 1 s later, finds the credentials.
                assert!(i >= 20, "{i} refused");
                let next_attempt = *took + Duration::from_secs(1);
                let expected = *took + *retry_after;
                assert!(
                    next_attempt + Duration::from_millis(200) >= expected,
                    "{i}: answered at {took:?}, expected ready at {expected:?}"
                );
            }
            Err(e) => panic!("{i}: {e:?}"),
        }
    }
    let refused = results.iter().filter(|(r, _)| r.is_err()).count();
    assert!(refused > 0 && refused < 100, "{refused} refused");
    assert_eq!(metrics.upstream_deferred.get(), refused as u64);
    // Their calls went on: a second later every token is cached.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for t in &tokens {
        assert_eq!(key_id(&cache, t).await.1, Lookup::Hit, "{t}");
    }
    assert_eq!(up.calls(), 150);
}

#[tokio::test(start_paused = true)]
async fn entries_are_renewed_before_expiry_and_the_new_credentials_served() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let cache = cache(&up, config(10), None);
    assert_eq!(key_id(&cache, "t").await.0, "ASIA1");
    // One-hour credentials: renewed at half-life (30 min), less up to 5 min of jitter.
    tokio::time::sleep(Duration::from_secs(24 * 60)).await;
    assert_eq!(up.calls(), 1, "renewed too early");
    tokio::time::sleep(Duration::from_secs(7 * 60)).await;
    assert_eq!(up.calls(), 2, "not renewed by half-life");
    assert_eq!(key_id(&cache, "t").await, ("ASIA2".into(), Lookup::Hit));
}

#[tokio::test(start_paused = true)]
async fn retention_limit_renews_long_lived_credentials() {
    let up = Upstream::new(
        Clock::tokio(SystemTime::now()),
        Duration::from_secs(12 * 3600),
    );
    let mut cfg = config(10);
    cfg.max_retention = Duration::from_secs(600);
    cfg.renewal_jitter = Duration::ZERO;
    let cache = cache(&up, cfg, None);
    key_id(&cache, "t").await;
    tokio::time::sleep(Duration::from_secs(599)).await;
    assert_eq!(up.calls(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn transient_renewal_failures_keep_the_old_credentials_and_retry() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let mut cfg = config(10);
    cfg.renewal_jitter = Duration::ZERO;
    let cache = cache(&up, cfg, None);
    key_id(&cache, "t").await;
    up.fail_next("InternalServerException", 500);
    up.fail_next("ThrottlingException", 429);
    tokio::time::sleep(Duration::from_secs(30 * 60 + 1)).await;
    assert_eq!(up.calls(), 2, "renewal attempted");
    assert_eq!(
        key_id(&cache, "t").await,
        ("ASIA1".into(), Lookup::Hit),
        "old credentials kept"
    );
    // Backoff 2 s, then 4 s: the third renewal attempt succeeds.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(up.calls(), 4);
    assert_eq!(key_id(&cache, "t").await, ("ASIA4".into(), Lookup::Hit));
}

#[tokio::test(start_paused = true)]
async fn permanent_renewal_failure_evicts() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let metrics = Metrics::new().unwrap();
    let cache = cache_with_metrics(&up, config(10), None, metrics.clone());
    key_id(&cache, "t").await;
    assert_eq!(metrics.cache_entries.get(), 1);
    up.fail_next("AccessDeniedException", 400);
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(up.calls(), 2);
    assert_eq!(cache.entry_count().await, 0);
    assert_eq!(metrics.cache_entries.get(), 0);
    assert_eq!(key_id(&cache, "t").await, ("ASIA3".into(), Lookup::Miss));
}

#[tokio::test(start_paused = true)]
async fn credentials_with_less_than_fifteen_seconds_are_never_served() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let cache = cache(&up, config(10), None);
    key_id(&cache, "t").await;
    // Every renewal fails until the credentials have 10 s left.
    for _ in 0..200 {
        up.fail_next("ServiceUnavailableException", 503);
    }
    tokio::time::sleep(Duration::from_secs(3590)).await;
    let calls = up.calls();
    up.script.lock().unwrap().clear();
    let (id, lookup) = key_id(&cache, "t").await;
    assert_eq!(lookup, Lookup::Miss);
    assert_eq!(id, format!("ASIA{}", calls + 1));
}

#[tokio::test(start_paused = true)]
async fn least_recently_used_entries_go_first() {
    let up = Upstream::new(
        Clock::tokio(SystemTime::now()),
        Duration::from_secs(6 * 3600),
    );
    let cache = cache(&up, config(2), None);
    // Moka applies reads to its LRU order in batches: let each step land before the next.
    key_id(&cache, "a").await;
    cache.entry_count().await;
    key_id(&cache, "b").await;
    cache.entry_count().await;
    key_id(&cache, "a").await; // a is now more recent than b
    cache.entry_count().await;
    key_id(&cache, "c").await;
    assert_eq!(cache.entry_count().await, 2);
    assert_eq!(key_id(&cache, "a").await.1, Lookup::Hit);
    assert_eq!(key_id(&cache, "b").await.1, Lookup::Miss);
}

#[tokio::test(start_paused = true)]
async fn renewals_do_not_count_as_use() {
    let up = Upstream::new(
        Clock::tokio(SystemTime::now()),
        Duration::from_secs(6 * 3600),
    );
    let mut cfg = config(2);
    cfg.max_retention = Duration::from_secs(60);
    cfg.renewal_jitter = Duration::ZERO;
    let cache = cache(&up, cfg, None);
    key_id(&cache, "used").await;
    cache.entry_count().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    key_id(&cache, "idle").await;
    cache.entry_count().await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    key_id(&cache, "used").await; // a pod's request: "used" is now the most recent
    cache.entry_count().await;
    // "used" renews at 60 s, "idle" at 70 s: after the renewals, "idle" must still be the least
    // recently used.
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(up.calls_for("idle"), 2, "renewed");
    key_id(&cache, "new").await;
    assert_eq!(cache.entry_count().await, 2);
    assert_eq!(key_id(&cache, "used").await.1, Lookup::Hit);
    assert_eq!(key_id(&cache, "idle").await.1, Lookup::Miss);
}

#[tokio::test(start_paused = true)]
async fn an_evicted_entry_is_never_renewed() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let mut cfg = config(1);
    cfg.renewal_jitter = Duration::ZERO;
    let cache = cache(&up, cfg, None);
    let evicted = get(&cache, "evicted", subject)
        .await
        .unwrap()
        .entry
        .unwrap();
    key_id(&cache, "kept").await;
    assert_eq!(cache.entry_count().await, 1);
    assert!(evicted.retired.load(Ordering::Relaxed));
    // Even while something still holds the evicted entry, its renewal does nothing.
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(up.calls_for("evicted"), 1);
    assert_eq!(up.calls_for("kept"), 2);
    drop(evicted);
}

/// The start of the rotation tests: a cache (no renewal jitter) holding the credentials of pod
/// `p1`'s service account `cart` for token `old`, issued ten minutes before `now`.
async fn pod_with_an_old_token() -> (Arc<Upstream>, CredentialCache<Arc<Upstream>>, i64, Served) {
    let clock = Clock::tokio(SystemTime::now());
    let up = Upstream::new(clock, Duration::from_secs(3600));
    let mut cfg = config(10);
    cfg.renewal_jitter = Duration::ZERO;
    let cache = cache(&up, cfg, None);
    let now = clock.unix_now();
    let old = get(&cache, "old", || pod_token("p1", "cart", now - 600))
        .await
        .unwrap();
    (up, cache, now, old)
}

#[tokio::test(start_paused = true)]
async fn a_newer_verified_token_of_the_pod_stops_the_older_ones_renewals_not_their_service() {
    let (up, cache, now, old) = pod_with_an_old_token().await;
    let new = get(&cache, "new", || pod_token("p1", "cart", now))
        .await
        .unwrap();
    // Another pod, and another service account of the same pod, are not affected.
    get(&cache, "other-pod", || pod_token("p2", "cart", now - 600))
        .await
        .unwrap();
    get(&cache, "other-sa", || pod_token("p1", "admin", now - 600))
        .await
        .unwrap();
    assert!(old.entry.as_ref().unwrap().is_superseded());
    assert!(!new.entry.as_ref().unwrap().is_superseded());
    // A token of the pod older than the newest, fetched later, is superseded at once.
    let older = get(&cache, "older", || pod_token("p1", "cart", now - 1200))
        .await
        .unwrap();
    assert!(older.entry.as_ref().unwrap().is_superseded());
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(up.calls_for("old"), 1, "the older token was renewed");
    assert_eq!(up.calls_for("older"), 1, "the oldest token was renewed");
    assert_eq!(up.calls_for("new"), 2);
    assert_eq!(up.calls_for("other-pod"), 2);
    assert_eq!(up.calls_for("other-sa"), 2);
    // Still served while its credentials last.
    assert_eq!(key_id(&cache, "old").await.1, Lookup::Hit);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_token_the_kernel_vouches_for_is_adopted_unverified_and_verified_when_it_renews()
{
    let (up, cache, now, old) = pod_with_an_old_token().await;
    let served = cache
        .adopt_rotated("new", pod_token("p1", "cart", now), Proof::empty())
        .await
        .unwrap();
    assert_eq!(up.calls(), 1, "no call for the rotated token");
    assert_eq!(
        served.issued.credentials.access_key_id,
        old.issued.credentials.access_key_id
    );
    let alias = served.entry.unwrap();
    assert!(!alias.is_verified());
    let old = old.entry.unwrap();
    assert!(
        !old.is_superseded(),
        "an unverified token supersedes nothing"
    );
    assert_eq!(key_id(&cache, "new").await, ("ASIA1".into(), Lookup::Hit));
    assert_eq!(up.calls(), 1);
    // When due (the 30 min retention), the new token renews with EKS Auth: now verified, it
    // supersedes the old token's entry, which renewed once too.
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(up.calls_for("new"), 1);
    assert!(alias.is_verified());
    assert_eq!(alias.proof(), Proof::EKS_AUTH);
    assert!(old.is_superseded());
    assert_ne!(key_id(&cache, "new").await.0, "ASIA1");
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(
        up.calls_for("old"),
        2,
        "no renewal of the old token once superseded"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rotated_token_verified_by_signature_is_adopted_with_no_call_and_renewed_with_itself() {
    let (up, cache, now, old) = pod_with_an_old_token().await;
    // Nothing cached for another pod or another service account of the pod.
    for (token, claims) in [
        ("x", pod_token("p2", "cart", now)),
        ("y", pod_token("p1", "admin", now)),
    ] {
        assert!(
            cache
                .adopt_rotated(token, claims, Proof::SIGNATURE)
                .await
                .is_none()
        );
    }
    let served = cache
        .adopt_rotated("new", pod_token("p1", "cart", now), Proof::SIGNATURE)
        .await
        .unwrap();
    assert_eq!(up.calls(), 1, "no call for the rotated token");
    assert_eq!(served.lookup, Lookup::Hit);
    assert_eq!(
        served.issued.credentials.access_key_id,
        old.issued.credentials.access_key_id
    );
    let adopted = served.entry.unwrap();
    assert_eq!(adopted.proof(), Proof::SIGNATURE);
    assert!(adopted.is_verified());
    assert!(old.entry.as_ref().unwrap().is_superseded());
    assert_eq!(key_id(&cache, "new").await, ("ASIA1".into(), Lookup::Hit));
    // When due (the 30 min retention), the new token renews, not the old one.
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!((up.calls_for("old"), up.calls_for("new")), (1, 1));
    assert_ne!(key_id(&cache, "new").await.0, "ASIA1");
    assert_eq!(adopted.proof(), Proof::SIGNATURE | Proof::EKS_AUTH);
}

#[tokio::test(start_paused = true)]
async fn removal_takes_only_the_entry_it_judged() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let cache = cache(&up, config(10), None);
    let judged = get(&cache, "t", subject).await.unwrap().entry.unwrap();
    // A fresher entry is stored under the same token meanwhile.
    let fresher = cache
        .inner
        .store(Arc::from("t"), subject(), up.fetch("t").await.unwrap())
        .await;
    assert!(judged.retired.load(Ordering::Relaxed), "replaced: retired");
    cache.inner.remove_exact(&judged).await;
    let served = get(&cache, "t", subject).await.unwrap();
    assert_eq!(served.lookup, Lookup::Hit);
    assert!(Arc::ptr_eq(served.entry.as_ref().unwrap(), &fresher));
    assert_eq!(cache.entry_count().await, 1);
}

#[tokio::test(start_paused = true)]
async fn the_in_flight_gauge_survives_abandoned_calls() {
    let up = Upstream::with(
        Clock::tokio(SystemTime::now()),
        Duration::from_secs(3600),
        Duration::from_secs(10),
        None,
    );
    let metrics = Metrics::new().unwrap();
    // Caching off: the call belongs to the request, and goes with it.
    let uncached = cache_with_metrics(&up, config(0), None, metrics.clone());
    let abandoned = tokio::time::timeout(
        Duration::from_millis(500),
        uncached.fetch("t", subject(), Share::Unplaced),
    )
    .await;
    assert!(abandoned.is_err());
    assert_eq!(metrics.upstream_in_flight.get(), 0);
    // Caching on: the call outlives the request that gave up, and ends all the same.
    let metrics = Metrics::new().unwrap();
    let cached = cache_with_metrics(&up, config(10), None, metrics.clone());
    let r = tokio::time::timeout(
        Duration::from_millis(500),
        cached.fetch("t", subject(), Share::Unplaced),
    )
    .await;
    assert!(r.is_err());
    assert_eq!(metrics.upstream_in_flight.get(), 1);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(metrics.upstream_in_flight.get(), 0);
    assert_eq!(key_id(&cached, "t").await.1, Lookup::Hit);
}

#[tokio::test(start_paused = true)]
async fn size_zero_disables_caching() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let cache = cache(&up, config(0), None);
    assert!(!cache.is_enabled());
    key_id(&cache, "t").await;
    key_id(&cache, "t").await;
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn entries_whose_owner_is_gone_are_evicted_not_renewed() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    let keep: KeepPredicate = Arc::new(|entry: &Entry| entry.owner_cgroup() != Some(42));
    let cache = cache(&up, config(10), Some(keep));
    let served = get(&cache, "gone", subject).await.unwrap();
    served.entry.unwrap().set_owner_cgroup(42);
    let served = get(&cache, "alive", subject).await.unwrap();
    served.entry.unwrap().set_owner_cgroup(7);
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(up.calls(), 3, "only the live entry was renewed");
    assert_eq!(cache.entry_count().await, 1);
}

#[tokio::test(start_paused = true)]
async fn entries_of_expired_tokens_are_not_renewed() {
    let clock = Clock::tokio(SystemTime::now());
    let up = Upstream::new(clock, Duration::from_secs(3600));
    let cache = cache(&up, config(10), None);
    let exp = clock.unix_now() + 600;
    get(&cache, "t", || {
        Arc::new(Claims {
            exp,
            ..Claims::default()
        })
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(up.calls(), 1);
    assert_eq!(cache.entry_count().await, 0);
}

#[test]
fn give_up_times() {
    let arrived = Instant::now();
    let deadline = arrived + Duration::from_millis(1500);
    let second = Duration::from_secs(1);
    let at = |ms: u64| arrived + Duration::from_millis(ms);
    // Expected in time: wait until the deadline at most.
    assert_eq!(give_up_at(arrived, deadline, at(900), second), deadline);
    // Expected 1.8 s out: answer at 0.8 s, so the SDK's retry comes at 1.8 s.
    assert_eq!(give_up_at(arrived, deadline, at(1800), second), at(800));
    // Far out: each attempt waits its full share.
    assert_eq!(give_up_at(arrived, deadline, at(9000), second), deadline);
}

/// What `n` pods, each with botocore's container provider policy (3 attempts, 2 s timeout,
/// 1 s apart), got from the cache in front of an EKS Auth limited to 50 calls/s (burst 50,
/// 50 ms per call).
struct Burst {
    served: usize,
    calls: usize,
    throttled: usize,
    times: Vec<Duration>,
}

async fn burst(n: usize) -> Burst {
    let up = Upstream::with(
        Clock::tokio(SystemTime::now()),
        Duration::from_secs(6 * 3600),
        Duration::from_millis(50),
        Some((50.0, 50.0)),
    );
    let cache = cache(&up, config(2000), None);
    let pods: Vec<_> = (0..n)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let token = format!("pod-{i}");
                let started = Instant::now();
                for _ in 0..3 {
                    let attempt =
                        tokio::time::timeout(Duration::from_secs(2), get(&cache, &token, subject));
                    if let Ok(Ok(_)) = attempt.await {
                        return Some(started.elapsed());
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                None
            })
        })
        .collect();
    let mut times = Vec::new();
    for p in pods {
        if let Some(t) = p.await.unwrap() {
            times.push(t);
        }
    }
    times.sort();
    Burst {
        served: times.len(),
        calls: up.calls(),
        throttled: up.throttled.load(Ordering::SeqCst),
        times,
    }
}

fn summary(n: usize, b: &Burst) -> String {
    let pct = |p: usize| {
        b.times
            .get(b.times.len() * p / 100)
            .copied()
            .unwrap_or_default()
    };
    format!(
        "{n} pods: {} served, {} upstream calls, {} throttled ({:.1}%), p50 {:?}, p99 {:?}",
        b.served,
        b.calls,
        b.throttled,
        100.0 * b.throttled as f64 / b.calls as f64,
        pct(50),
        pct(99)
    )
}

#[tokio::test(start_paused = true)]
async fn three_hundred_pods_at_once_against_fifty_calls_a_second_all_get_credentials() {
    let b = burst(300).await;
    let summary = summary(300, &b);
    eprintln!("{summary}");
    assert_eq!(b.served, 300, "{summary}");
    assert!(b.throttled * 10 < b.calls, "{summary}");
    assert!(b.calls <= 300 + b.throttled, "{summary}");
}

#[tokio::test(start_paused = true)]
async fn a_thousand_pods_at_once_cost_one_call_each_and_little_throttling() {
    let b = burst(1000).await;
    let summary = summary(1000, &b);
    eprintln!("{summary}");
    assert!(b.throttled * 10 < b.calls, "{summary}");
    assert!(b.calls <= 1000 + b.throttled, "{summary}");
}

/// A call task that panics (reproduced with a retriever that panics once) used to leave its token
/// in `calls` for ever: every later request for it joined the dead call and got 503. The task's
/// guard now takes the entry with it, and the next request makes a fresh call.
#[tokio::test(start_paused = true)]
async fn a_call_that_panics_releases_its_token_for_a_fresh_call() {
    let up = Upstream::new(Clock::tokio(SystemTime::now()), Duration::from_secs(3600));
    up.panic_next.store(true, Ordering::SeqCst);
    let cache = cache(&up, config(10), None);
    let lost = get(&cache, "t", subject).await.err().unwrap();
    assert_eq!(upstream_status(lost), 503);
    assert!(lock(&cache.inner.calls).is_empty());
    assert_eq!(key_id(&cache, "t").await, ("ASIA2".into(), Lookup::Miss));
    assert_eq!(up.calls_for("t"), 2);
}

/// One pod floods distinct forged tokens, far more than EKS Auth's pace, and leaves each request
/// at once; its calls go on (so that a retry would be a hit) but fill only its own queue. A
/// neighbour's first request, a cached pod and a renewal are served meanwhile.
#[tokio::test(start_paused = true)]
async fn a_pod_flooding_forged_tokens_fills_only_its_own_queue() {
    let clock = Clock::tokio(SystemTime::now());
    let up = Arc::new(Upstream {
        forged_prefix: Some("forged-"),
        ..Arc::into_inner(Upstream::with(
            clock,
            Duration::from_secs(3600),
            Duration::from_millis(20),
            Some((50.0, 50.0)),
        ))
        .unwrap()
    });
    let mut cfg = config(100);
    // Renewed 30 s in: during the flood.
    cfg.max_retention = Duration::from_secs(30);
    cfg.renewal_jitter = Duration::ZERO;
    let cache = cache(&up, cfg.clone(), None);
    let fetch = {
        let cache = cache.clone();
        move |token: String, pod: &str| {
            let cache = cache.clone();
            let share = Share::Pod(Arc::from(pod));
            async move { cache.fetch(&token, subject(), share).await }
        }
    };
    fetch("cached".into(), "cached-pod").await.unwrap();
    let flood = tokio::spawn({
        let fetch = fetch.clone();
        async move {
            // ~650 a second, for 60 s; each request given up after 80 ms.
            for i in 0..39_000 {
                let request = fetch(format!("forged-{i}"), "attacker");
                tokio::spawn(tokio::time::timeout(Duration::from_millis(80), request));
                tokio::time::sleep(Duration::from_micros(1538)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(20)).await;
    let queued = cache.inner.admission.queued();
    assert!(
        queued <= cfg.admission.max_queued_per_pod,
        "{queued} queued"
    );
    // The neighbour's first request: answered within its deadline.
    let started = Instant::now();
    let neighbour = fetch("neighbour".into(), "neighbour-pod").await;
    assert!(neighbour.is_ok(), "{:?}", neighbour.err());
    assert!(started.elapsed() <= cfg.admission.wait_deadline);
    assert_eq!(key_id(&cache, "cached").await.1, Lookup::Hit);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(up.calls_for("cached"), 2, "renewed during the flood");
    flood.abort();
}
