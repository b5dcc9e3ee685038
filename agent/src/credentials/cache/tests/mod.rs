//! Cache behaviour under tokio's paused clock, against a scripted upstream. This file holds the
//! upstream (minting, scripted answers, EKS Auth's throttling) and the fixtures the parts share:
//! [`fetch`] (hits, shared calls, errors, deadlines), [`renewal`] (renewal, retention, eviction),
//! [`rotation`] (a pod's rotated tokens), [`bursts`] (many pods at once, floods).

mod bursts;
mod fetch;
mod renewal;
mod rotation;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::time::SystemTime;

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
