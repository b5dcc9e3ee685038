//! Renewal before expiry and within the retention limit, failures, and which entries are kept:
//! least recently used first, never renewed once evicted, gone with their owner or their token.

use super::*;

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
