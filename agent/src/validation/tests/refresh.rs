//! When keys are fetched again: an unknown kid, concurrent requests sharing one fetch, no keys,
//! the API server away, failed fetches backing off.

use super::*;

#[tokio::test(start_paused = true)]
async fn an_unknown_kid_is_refetched_once_and_a_rotated_key_is_picked_up() {
    let source = Source::serving(&[RSA_1_JWK]);
    let (v, metrics) = validator(Mode::Auto, &source);
    let old = rs256(RSA_1, RSA_1_JWK);
    assert_eq!(
        v.verify(&old, &claims_of(&old)).await,
        Ok(Verification::Signature)
    );
    assert_eq!(source.fetches(), 1);

    // The API server rotates to key 2; a token signed with it arrives.
    tokio::time::advance(Duration::from_secs(60)).await;
    source.serve(&[RSA_1_JWK, RSA_2_JWK]);
    let new = rs256(RSA_2, RSA_2_JWK);
    assert_eq!(
        v.verify(&new, &claims_of(&new)).await,
        Ok(Verification::Signature)
    );
    assert_eq!(source.fetches(), 2, "one refetch for the unknown kid");

    // A kid the API server does not have: refused, and a flood of them costs no more fetches
    // within the interval.
    tokio::time::advance(Duration::from_secs(60)).await;
    let bogus = sign(
        Algorithm::RS256,
        RSA_2,
        "0000000000000000000000000000000000000000",
        &claims_json(),
    );
    for _ in 0..50 {
        assert_eq!(
            v.verify(&bogus, &claims_of(&bogus)).await,
            Err(ValidationError::UnknownKey)
        );
    }
    assert_eq!(source.fetches(), 3, "at most one fetch per interval");
    assert_eq!(failures(&metrics, Reason::UnknownKey), 50);
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_share_one_fetch_and_wait_for_it_at_most_once() {
    let source = Source::serving(&[RSA_1_JWK]);
    *source.delay.lock().unwrap() = Duration::from_secs(5);
    let (v, _) = validator(Mode::Auto, &source);
    let token = rs256(RSA_1, RSA_1_JWK);
    let claims = claims_of(&token);
    let started = tokio::time::Instant::now();
    let results = futures::future::join_all((0..20).map(|_| v.verify(&token, &claims))).await;
    // The fetch outlasts the wait: every request went on after one wait, unchecked (`auto`).
    assert!(
        results.iter().all(|r| *r == Ok(Verification::Unchecked)),
        "{results:?}"
    );
    assert_eq!(started.elapsed(), RefreshPolicy::default().wait);
    assert_eq!(source.fetches(), 1);
    // The fetch went on, and later requests have the keys.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(v.verify(&token, &claims).await, Ok(Verification::Signature));
    assert_eq!(source.fetches(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_keys_auto_falls_back_and_on_refuses() {
    let source = Source::default();
    source.fail();
    let token = rs256(RSA_1, RSA_1_JWK);
    let (auto, metrics) = validator(Mode::Auto, &source);
    assert_eq!(
        auto.verify(&token, &claims_of(&token)).await,
        Ok(Verification::Unchecked)
    );
    assert_eq!(
        metrics
            .local_validation
            .with_label_values(&["skipped"])
            .get(),
        1
    );
    assert_eq!(
        metrics
            .signing_key_fetches
            .with_label_values(&["error"])
            .get(),
        1
    );
    let (on, _) = validator(Mode::On, &source);
    assert_eq!(
        on.verify(&token, &claims_of(&token)).await,
        Err(ValidationError::NoKeys)
    );
    let (off, _) = validator(Mode::Off, &source);
    assert_eq!(
        off.verify(&token, &claims_of(&token)).await,
        Ok(Verification::Unchecked)
    );
}

#[tokio::test(start_paused = true)]
async fn while_the_api_server_is_away_an_unknown_kid_goes_to_eks_auth_in_auto_only() {
    let source = Source::serving(&[RSA_1_JWK]);
    let (auto, _) = validator(Mode::Auto, &source);
    let (on, _) = validator(Mode::On, &source);
    let known = rs256(RSA_1, RSA_1_JWK);
    assert_eq!(
        auto.verify(&known, &claims_of(&known)).await,
        Ok(Verification::Signature)
    );
    assert_eq!(
        on.verify(&known, &claims_of(&known)).await,
        Ok(Verification::Signature)
    );
    source.fail();
    tokio::time::advance(Duration::from_secs(60)).await;
    let new = rs256(RSA_2, RSA_2_JWK);
    assert_eq!(
        auto.verify(&new, &claims_of(&new)).await,
        Ok(Verification::Unchecked)
    );
    assert_eq!(
        on.verify(&new, &claims_of(&new)).await,
        Err(ValidationError::UnknownKey)
    );
    // Known keys still verify, and still refuse forgeries, while the API server is away.
    assert_eq!(
        auto.verify(&known, &claims_of(&known)).await,
        Ok(Verification::Signature)
    );
    let forged = sign(Algorithm::RS256, RSA_2, &kid(RSA_1_JWK), &claims_json());
    assert!(auto.verify(&forged, &claims_of(&forged)).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_fetch_nobody_waited_for_does_not_hold_up_later_ones() {
    // The start-up's fetch runs with nobody waiting on it.
    let source = Source::serving(&[RSA_1_JWK]);
    let (v, _) = validator(Mode::Auto, &source);
    drop(v.start_fetch());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(source.fetches(), 1);
    source.serve(&[RSA_1_JWK, RSA_2_JWK]);
    let new = rs256(RSA_2, RSA_2_JWK);
    assert_eq!(
        v.verify(&new, &claims_of(&new)).await,
        Ok(Verification::Signature)
    );
    assert_eq!(source.fetches(), 2);
}

/// An API server that cannot give keys (older than 1.34, or away) is asked ever more rarely: 10 s
/// doubling after each failure, up to 10 min; a success resets the pace.
#[tokio::test(start_paused = true)]
async fn failed_fetches_back_off_to_ten_minutes_and_a_success_resets_them() {
    let source = Source::default();
    source.fail();
    let (auto, metrics) = validator(Mode::Auto, &source);
    let token = rs256(RSA_1, RSA_1_JWK);
    let mut fetched_at = Vec::new();
    for second in 0..1800 {
        let before = source.fetches();
        assert_eq!(
            auto.verify(&token, &claims_of(&token)).await,
            Ok(Verification::Unchecked)
        );
        if source.fetches() > before {
            fetched_at.push(second);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(fetched_at, [0, 20, 60, 140, 300, 620, 1220]);
    let failed = metrics.signing_key_fetches.with_label_values(&["error"]);
    assert_eq!(failed.get(), 7);

    // The API server answers again: at the next attempt the keys come, and the pace is reset.
    source.serve(&[RSA_1_JWK]);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        auto.verify(&token, &claims_of(&token)).await,
        Ok(Verification::Signature)
    );
    let fetches = source.fetches();
    let unknown = rs256(RSA_2, RSA_2_JWK);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let _ = auto.verify(&unknown, &claims_of(&unknown)).await;
    assert_eq!(source.fetches(), fetches + 1, "10 s after a success");
}
