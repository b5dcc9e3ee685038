//! Many pods at once against EKS Auth's pace, and one pod flooding forged tokens.

use super::*;

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
