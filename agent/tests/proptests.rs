//! Property tests of the time arithmetic: when the cache renews credentials (and retries a
//! renewal), and what the per-pod request limit lets through and answers.
//!
//! Through the public API only: the renewal schedule is observed on a real cache with tokio's
//! paused time (the wall clock follows it), the limits on a real `Attribution`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pod_identity_agent::backoff::Backoff;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pod_identity_agent::attribution::{Attribution, Caller, Policy};
use pod_identity_agent::cgroup::{CgroupInfo, PodCgroup, Qos};
use pod_identity_agent::clock::Clock;
use pod_identity_agent::config::{AdmissionConfig, CacheConfig, RateLimit};
use pod_identity_agent::credentials::admission::Share;
use pod_identity_agent::credentials::cache::CredentialCache;
use pod_identity_agent::credentials::{Association, Credentials, Issued, Retriever, UpstreamError};
use pod_identity_agent::http::RequestError;
use pod_identity_agent::metrics::Metrics;
use pod_identity_agent::token::Claims;
use proptest::prelude::*;

/// `cases` cases; failures are reported, not persisted (an integration test has no source
/// directory of its own for proptest's regression files).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

mod renewal {
    use super::*;

    const MIN_REMAINING: Duration = Duration::from_secs(15);

    /// EKS Auth: the first answer lives `first_life`, renewals six hours; renewals fail
    /// transiently `failures` times first. Every call is timed (paused time, from the start).
    #[derive(Clone)]
    struct Upstream(Arc<UpstreamState>);

    struct UpstreamState {
        clock: Clock,
        origin: tokio::time::Instant,
        first_life: Duration,
        failures: Mutex<u32>,
        calls: Mutex<Vec<Duration>>,
    }

    impl Retriever for Upstream {
        async fn fetch(&self, _token: &str) -> Result<Issued, UpstreamError> {
            let s = &self.0;
            let n = {
                let mut calls = s.calls.lock().unwrap();
                calls.push(s.origin.elapsed());
                calls.len()
            };
            if n > 1 {
                let mut failures = s.failures.lock().unwrap();
                if *failures > 0 {
                    *failures -= 1;
                    return Err(UpstreamError::new(
                        503,
                        "ServiceUnavailableException",
                        "down",
                    ));
                }
            }
            let life = if n == 1 {
                s.first_life
            } else {
                Duration::from_secs(6 * 3600)
            };
            Ok(Issued::new(
                Credentials {
                    access_key_id: format!("ASIA{n}"),
                    secret_access_key: "secret".into(),
                    session_token: "session".into(),
                    account_id: "111122223333".into(),
                    expiration: s.clock.now() + life,
                },
                Association::default(),
            ))
        }
    }

    #[derive(Debug, Clone)]
    struct Schedule {
        life: Duration,
        retention: Duration,
        lead: Duration,
        jitter: Duration,
        backoff: (Duration, Duration),
    }

    impl Schedule {
        /// The rule the cache documents: the earlier of the retention limit and expiry minus the
        /// lead (capped at half the life), then up to `min(jitter, due / 4)` earlier.
        fn window(&self) -> (Duration, Duration) {
            let lead = self.lead.min(self.life / 2);
            let due = self.retention.min(self.life - lead);
            (due - self.jitter.min(due / 4), due)
        }
    }

    fn schedules() -> impl Strategy<Value = Schedule> {
        (
            0u64..48 * 3600,
            1u64..12 * 3600,
            0u64..2 * 3600,
            0u64..1800,
            (1u64..10, 10u64..600),
        )
            .prop_map(
                |(life, retention, lead, jitter, (first, longest))| Schedule {
                    life: Duration::from_secs(life),
                    retention: Duration::from_secs(retention),
                    lead: Duration::from_secs(lead),
                    jitter: Duration::from_secs(jitter),
                    backoff: (Duration::from_secs(first), Duration::from_secs(longest)),
                },
            )
    }

    /// Caches one token under `s` with paused time, lets `horizon` pass, and returns the upstream
    /// calls' times (the first is the fetch, at zero).
    fn run(s: &Schedule, failures: u32, horizon: Duration) -> Vec<Duration> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let clock = Clock::tokio(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_593_600));
            let upstream = Upstream(Arc::new(UpstreamState {
                clock,
                origin: tokio::time::Instant::now(),
                first_life: s.life,
                failures: Mutex::new(failures),
                calls: Mutex::new(Vec::new()),
            }));
            let cache = CredentialCache::new(
                upstream.clone(),
                CacheConfig {
                    max_entries: 10,
                    max_retention: s.retention,
                    renew_before_expiry: s.lead,
                    min_remaining: MIN_REMAINING,
                    // High enough that the renewal pacer never holds these tests up.
                    renewals_per_second: 100_000,
                    renewal_jitter: s.jitter,
                    retry_backoff: Backoff::new(s.backoff.0, s.backoff.1),
                    admission: AdmissionConfig::default(),
                },
                clock,
                Metrics::new().unwrap(),
                None,
            );
            let claims = Arc::new(Claims {
                exp: i64::MAX / 2,
                ..Claims::default()
            });
            cache.fetch("token", claims, Share::Unplaced).await.unwrap();
            tokio::time::sleep(horizon).await;
            let calls = upstream.0.calls.lock().unwrap().clone();
            drop(cache);
            calls
        })
    }

    /// Tokio's timers have millisecond resolution.
    const TICK: Duration = Duration::from_millis(2);

    proptest! {
        #![proptest_config(config(256))]

        /// The first renewal falls in its window: never after the retention limit, never later
        /// than the lead (or half the life) before expiry, never earlier than the jitter allows,
        /// never before the fetch.
        #[test]
        fn the_first_renewal_falls_in_its_window(s in schedules()) {
            let (earliest, latest) = s.window();
            let calls = run(&s, 0, latest + TICK);
            prop_assert!(calls.len() >= 2, "no renewal by {latest:?}: {calls:?}");
            let renewal = calls[1];
            prop_assert!(renewal + TICK >= earliest && renewal <= latest + TICK,
                "renewed at {renewal:?}, window {earliest:?}..={latest:?}");
            prop_assert!(renewal <= s.retention + TICK);
            prop_assert!(renewal <= s.life - s.lead.min(s.life / 2) + TICK);
            prop_assert!(renewal >= (latest - latest / 4).saturating_sub(TICK));
        }

        /// Credentials long-lived enough to be served at all are renewed while they still are:
        /// before they are down to the least life the agent hands out.
        #[test]
        fn renewal_comes_while_the_credentials_are_still_served(
            s in schedules().prop_filter("servable, lead past the floor",
                |s| s.life >= 2 * MIN_REMAINING && s.lead >= MIN_REMAINING),
        ) {
            let calls = run(&s, 0, s.life);
            prop_assert!(calls.len() >= 2, "never renewed: {calls:?}");
            prop_assert!(calls[1] <= s.life - MIN_REMAINING + TICK,
                "renewed at {:?}, {:?} before expiry", calls[1], s.life.saturating_sub(calls[1]));
        }

        /// Without jitter, longer-lived credentials are never renewed earlier.
        #[test]
        fn renewal_is_monotone_in_the_lifetime(s in schedules(), extra in 0u64..24 * 3600) {
            let s = Schedule { jitter: Duration::ZERO, ..s };
            let longer = Schedule { life: s.life + Duration::from_secs(extra), ..s.clone() };
            let short = run(&s, 0, s.window().1 + TICK);
            let long = run(&longer, 0, longer.window().1 + TICK);
            prop_assert!(short[1] <= long[1] + TICK,
                "life {:?} renewed at {:?}, life {:?} at {:?}", s.life, short[1], longer.life, long[1]);
        }

        /// A renewal that fails transiently is retried after the first backoff, doubling up to
        /// the longest (the README's "1 s doubling to 60 s").
        #[test]
        fn failed_renewals_back_off_doubling_to_the_longest(
            s in schedules().prop_filter("a renewal in the first day", |s| s.life >= Duration::from_secs(60)),
            failures in 1u32..8,
        ) {
            let (first, longest) = s.backoff;
            let expected: Vec<Duration> = (0..failures)
                .map(|i| first.saturating_mul(1 << i).min(longest))
                .collect();
            let horizon = s.window().1 + expected.iter().sum::<Duration>() + TICK * (failures + 1);
            let calls = run(&s, failures, horizon);
            prop_assert!(calls.len() >= 2 + failures as usize, "{calls:?}");
            let gaps: Vec<Duration> = calls[1..].windows(2).map(|w| w[1] - w[0]).collect();
            for (i, (gap, want)) in gaps.iter().zip(&expected).enumerate() {
                prop_assert!(gap.abs_diff(*want) <= TICK, "retry {}: waited {gap:?}, expected {want:?}", i + 1);
            }
        }
    }

    /// The README's figures: the first retry of a failed renewal comes after 1 s.
    #[test]
    fn the_first_retry_waits_the_first_backoff() {
        let s = Schedule {
            life: Duration::from_secs(6 * 3600),
            retention: Duration::from_secs(3600),
            lead: Duration::from_secs(70 * 60),
            jitter: Duration::ZERO,
            backoff: (Duration::from_secs(1), Duration::from_secs(60)),
        };
        let calls = run(&s, 3, Duration::from_secs(3600 + 10));
        let gaps: Vec<u64> = calls[1..]
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs())
            .collect();
        assert_eq!(calls[1], Duration::from_secs(3600));
        assert_eq!(gaps[..3], [1, 2, 4], "{calls:?}");
    }
}

mod limits {
    use super::*;

    fn attribution(rate: u32, burst: u32) -> Attribution {
        let policy = Policy {
            pod_request: RateLimit {
                per_second: rate,
                burst,
            },
            ..Policy::off()
        };
        let refused = prometheus::IntCounter::new("refused", "refused").unwrap();
        Attribution::new(None, None, policy, refused)
    }

    /// A caller the kernel placed in pod `uid` (or in no pod).
    fn caller(uid: Option<&str>, port: u16) -> Caller {
        let peer = std::net::SocketAddr::from(([169, 254, 200, 1], port));
        let Some(uid) = uid else {
            return Caller::unattributed(peer);
        };
        Caller {
            peer,
            process: None,
            cgroup: Some(Arc::new(CgroupInfo {
                id: 1,
                path: format!("/kubepods/burstable/pod{uid}/c"),
                pod: Some(PodCgroup {
                    pod_uid: Arc::from(uid),
                    container_id: None,
                    qos: Qos::Burstable,
                }),
            })),
        }
    }

    /// The burst the limiter is configured with (0: the rate).
    fn effective_burst(rate: u32, burst: u32) -> u32 {
        if burst == 0 { rate } else { burst }
    }

    /// `n` requests as fast as possible: how many went through, the refusals' waits, and how
    /// long it took (refill during the loop is allowed for).
    fn flood(a: &Attribution, c: &Caller, n: u32) -> (u32, Vec<Duration>, Duration) {
        let started = std::time::Instant::now();
        let mut admitted = 0;
        let mut waits = Vec::new();
        for _ in 0..n {
            match a.check_pod_rate(c) {
                Ok(()) => admitted += 1,
                Err(wait) => waits.push(wait),
            }
        }
        (admitted, waits, started.elapsed())
    }

    /// At most this many cells refill in `elapsed` at `rate`, plus one in progress.
    fn refill(rate: u32, elapsed: Duration) -> u32 {
        u32::try_from((elapsed.as_secs_f64() * f64::from(rate)).ceil() as u64).unwrap_or(u32::MAX)
            + 1
    }

    proptest! {
        #![proptest_config(config(128))]

        /// A pod gets its burst at once, and past it only what refills; each refusal says to wait
        /// no more than one emission interval (1 / rate).
        #[test]
        fn a_pod_gets_its_burst_then_the_rate(rate in 1u32..500, burst in 0u32..100, extra in 1u32..100) {
            let a = attribution(rate, burst);
            let burst = effective_burst(rate, burst);
            let pod = caller(Some("0b5e3c2a-1111-4222-8333-444455556666"), 1);
            let (admitted, waits, elapsed) = flood(&a, &pod, burst + extra);
            prop_assert!(admitted >= burst, "{admitted} of a burst of {burst}");
            prop_assert!(admitted <= burst + refill(rate, elapsed), "{admitted} in {elapsed:?}");
            let interval = Duration::from_secs(1) / rate;
            for w in waits {
                // Zero when the next cell came due between the refusal and the reading of the
                // clock: `Retry-After` says 1 then.
                prop_assert!(w <= interval, "wait {w:?}, interval {interval:?}");
            }
        }

        /// One pod's flood takes nothing from another's allowance; callers in no pod share one.
        #[test]
        fn pods_do_not_share_and_the_unplaced_do(rate in 1u32..100, burst in 1u32..50) {
            let a = attribution(rate, burst);
            let flooder = caller(Some("11111111-2222-4333-8444-555555555555"), 1);
            flood(&a, &flooder, burst * 3);
            let neighbour = caller(Some("0b5e3c2a-1111-4222-8333-444455556666"), 2);
            let (admitted, _, _) = flood(&a, &neighbour, burst);
            prop_assert_eq!(admitted, burst);

            let (first, _, t1) = flood(&a, &caller(None, 3), burst);
            let (second, _, t2) = flood(&a, &caller(None, 4), burst);
            prop_assert_eq!(first, burst);
            prop_assert!(second <= refill(rate, t1 + t2), "unplaced callers got {first} + {second}");
        }

        /// `Retry-After` is the wait in whole seconds, rounded up, at least 1: a client that
        /// waits that long finds its allowance refilled.
        #[test]
        fn retry_after_rounds_the_wait_up(nanos in 0u64..86_400_000_000_000) {
            let wait = Duration::from_nanos(nanos);
            let response = RequestError::PodThrottled { retry_after: wait }.to_response();
            prop_assert_eq!(response.status(), 429);
            let secs: u64 = response.headers()[http::header::RETRY_AFTER]
                .to_str().unwrap().parse().unwrap();
            prop_assert!(secs >= 1);
            prop_assert!(Duration::from_secs(secs) >= wait);
            prop_assert!(Duration::from_secs(secs) < wait + Duration::from_secs(1) || secs == 1);
        }
    }

    proptest! {
        #![proptest_config(config(12))]

        /// Waiting what a refusal says is enough (real time: small waits only).
        #[test]
        fn waiting_the_refusals_wait_is_enough(rate in 20u32..200, burst in 1u32..10) {
            let a = attribution(rate, burst);
            let pod = caller(Some("0b5e3c2a-1111-4222-8333-444455556666"), 1);
            flood(&a, &pod, burst);
            let wait = match a.check_pod_rate(&pod) {
                Ok(()) => return Ok(()), // refilled already: nothing to wait for
                Err(wait) => wait,
            };
            std::thread::sleep(wait);
            prop_assert!(a.check_pod_rate(&pod).is_ok(), "still refused after {wait:?}");
        }
    }
}
