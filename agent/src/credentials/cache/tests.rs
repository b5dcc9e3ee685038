//! Cache behaviour under tokio's paused clock, against a scripted upstream.

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;
use std::time::SystemTime;

use super::*;
use crate::credentials::{Association, Credentials};

/// An upstream that mints credentials valid for `lifetime`, or answers what the script says.
struct Upstream {
    calls: AtomicUsize,
    script: Mutex<VecDeque<UpstreamError>>,
    lifetime: Duration,
    delay: Duration,
    clock: Clock,
}

impl Upstream {
    fn new(clock: Clock, lifetime: Duration) -> Arc<Self> {
        Arc::new(Upstream {
            calls: AtomicUsize::new(0),
            script: Mutex::new(VecDeque::new()),
            lifetime,
            delay: Duration::from_millis(20),
            clock,
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
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
        tokio::time::sleep(self.delay).await;
        if let Some(err) = self.script.lock().unwrap().pop_front() {
            return Err(err);
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
        max_retention: Duration::from_secs(3 * 3600),
        renew_before_expiry: Duration::from_secs(70 * 60),
        min_remaining: Duration::from_secs(15),
        renewals_per_second: 1000,
        renewal_jitter: Duration::from_secs(5 * 60),
        retry_backoff: (Duration::from_secs(1), Duration::from_secs(60)),
    }
}

/// `lookup`, then `fetch` on a miss, as the endpoint does.
async fn get(
    cache: &CredentialCache<Arc<Upstream>>,
    token: &str,
    claims: impl FnOnce() -> Arc<Claims>,
) -> Result<Served, Arc<UpstreamError>> {
    match cache.lookup(token).await {
        Some(served) => Ok(served),
        None => cache.fetch(token, claims()).await,
    }
}

fn cache(
    upstream: &Arc<Upstream>,
    config: CacheConfig,
    keep: Option<KeepPredicate>,
) -> CredentialCache<Arc<Upstream>> {
    CredentialCache::new(
        upstream.clone(),
        config,
        upstream.clock,
        Metrics::new().unwrap(),
        keep,
    )
}

/// Claims of a token that lives a day.
fn subject() -> Arc<Claims> {
    Arc::new(Claims {
        exp: i64::MAX / 2,
        ..Claims::default()
    })
}

async fn key_id(cache: &CredentialCache<Arc<Upstream>>, token: &str) -> (String, Lookup) {
    let served = get(cache, token, subject).await.unwrap();
    (
        served.issued.credentials.access_key_id.clone(),
        served.lookup,
    )
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
    up.fail_next("ThrottlingException", 429);
    let cache = cache(&up, config(10), None);
    let (a, b) = tokio::join!(get(&cache, "t", subject), get(&cache, "t", subject));
    assert_eq!(a.err().unwrap().status, 429);
    assert_eq!(b.err().unwrap().status, 429);
    assert_eq!(up.calls(), 1);
    // Nothing was cached: the next request tries again.
    assert_eq!(key_id(&cache, "t").await.1, Lookup::Miss);
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
    let cache = cache(&up, config(10), None);
    key_id(&cache, "t").await;
    up.fail_next("AccessDeniedException", 400);
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(up.calls(), 2);
    assert_eq!(cache.entry_count().await, 0);
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
