//! Hits, one shared upstream call per cold token, errors shared and remembered, deadlines, and
//! the bookkeeping of calls.

use super::*;
use crate::credentials::cache::call::give_up_at;

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
