//! Local validation with real keys (tests/fixtures/jwks: two RSA keys and a P-256 key, for
//! tests only) against a key source the tests steer, on tokio's paused clock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

const RSA_1: &str = include_str!("../../../tests/fixtures/jwks/rsa-1.pem");
const RSA_2: &str = include_str!("../../../tests/fixtures/jwks/rsa-2.pem");
const EC_1: &str = include_str!("../../../tests/fixtures/jwks/ec-1.pem");
const RSA_1_JWK: &str = include_str!("../../../tests/fixtures/jwks/rsa-1.jwk.json");
const RSA_2_JWK: &str = include_str!("../../../tests/fixtures/jwks/rsa-2.jwk.json");
const EC_1_JWK: &str = include_str!("../../../tests/fixtures/jwks/ec-1.jwk.json");

fn jwk(json: &str) -> Value {
    serde_json::from_str(json).unwrap()
}

fn kid(jwk_json: &str) -> String {
    jwk(jwk_json)["kid"].as_str().unwrap().to_owned()
}

fn set(keys: &[&str]) -> Vec<u8> {
    json!({ "keys": keys.iter().map(|k| jwk(k)).collect::<Vec<_>>() })
        .to_string()
        .into_bytes()
}

fn claims_json() -> Value {
    json!({
        "aud": ["pods.eks.amazonaws.com"], "exp": 4_000_000_000_i64, "iat": 1, "nbf": 1,
        "iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:shop:cart",
        "kubernetes.io": {
            "namespace": "shop",
            "pod": {"name": "cart-1", "uid": "0b5e3c2a-1111-4222-8333-444455556666"},
            "serviceaccount": {"name": "cart", "uid": "s-1"}
        }
    })
}

fn sign(alg: Algorithm, pem: &str, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    };
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn rs256(pem: &str, jwk_json: &str) -> String {
    sign(Algorithm::RS256, pem, &kid(jwk_json), &claims_json())
}

fn claims_of(token: &str) -> Claims {
    Claims::parse(token).unwrap()
}

/// A key source whose answer the test sets, counting fetches.
#[derive(Clone, Default)]
struct Source {
    answer: Arc<Mutex<Option<Vec<u8>>>>,
    delay: Arc<Mutex<Duration>>,
    fetches: Arc<AtomicUsize>,
}

impl Source {
    fn serving(keys: &[&str]) -> Self {
        let source = Source::default();
        source.serve(keys);
        source
    }
    fn serve(&self, keys: &[&str]) {
        *self.answer.lock().unwrap() = Some(set(keys));
    }
    fn fail(&self) {
        *self.answer.lock().unwrap() = None;
    }
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl KeySource for Source {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            self.answer
                .lock()
                .unwrap()
                .clone()
                .ok_or(SourceError::Timeout)
        })
    }
}

fn validator(mode: Mode, source: &Source) -> (Arc<Validator>, Metrics) {
    let metrics = Metrics::new().unwrap();
    let config = ValidationConfig {
        mode,
        audience: crate::token::AUDIENCE.to_owned(),
        state_dir: std::env::temp_dir(),
        refresh: RefreshPolicy::default(),
    };
    let v = Validator::new(&config, Some(Box::new(source.clone())), None, &metrics);
    (v, metrics)
}

fn failures(metrics: &Metrics, reason: Reason) -> u64 {
    metrics
        .local_validation_failures
        .with_label_values(&[reason.as_str()])
        .get()
}

#[tokio::test(start_paused = true)]
async fn rs256_and_es256_tokens_verify_with_the_clusters_keys() {
    let source = Source::serving(&[RSA_1_JWK, EC_1_JWK]);
    let (v, metrics) = validator(Mode::Auto, &source);
    let rsa = rs256(RSA_1, RSA_1_JWK);
    let ec = sign(Algorithm::ES256, EC_1, &kid(EC_1_JWK), &claims_json());
    assert_eq!(
        v.verify(&rsa, &claims_of(&rsa)).await,
        Ok(Verification::Signature)
    );
    assert_eq!(
        v.verify(&ec, &claims_of(&ec)).await,
        Ok(Verification::Signature)
    );
    assert_eq!(
        source.fetches(),
        1,
        "one fetch for the first token, none after"
    );
    assert_eq!(
        metrics
            .local_validation
            .with_label_values(&["success"])
            .get(),
        2
    );
    assert_eq!(metrics.signing_keys.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_forged_signature_with_a_known_kid_is_refused() {
    let source = Source::serving(&[RSA_1_JWK]);
    let (v, metrics) = validator(Mode::Auto, &source);
    // Signed with key 2, naming key 1.
    let forged = sign(Algorithm::RS256, RSA_2, &kid(RSA_1_JWK), &claims_json());
    assert_eq!(
        v.verify(&forged, &claims_of(&forged)).await,
        Err(ValidationError::Signature(SignatureError::Signature))
    );
    // A payload changed after signing.
    let good = rs256(RSA_1, RSA_1_JWK);
    let mut parts: Vec<&str> = good.split('.').collect();
    let mut other = claims_json();
    other["kubernetes.io"]["namespace"] = json!("admin");
    let payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        other.to_string(),
    );
    parts[1] = &payload;
    let tampered = parts.join(".");
    assert_eq!(
        v.verify(&tampered, &claims_of(&tampered)).await,
        Err(ValidationError::Signature(SignatureError::Signature))
    );
    // The algorithm is the key's, not the token's choice.
    let hs = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid(RSA_1_JWK));
        jsonwebtoken::encode(&header, &claims_json(), &EncodingKey::from_secret(b"k")).unwrap()
    };
    assert_eq!(
        v.verify(&hs, &claims_of(&hs)).await,
        Err(ValidationError::Signature(SignatureError::Algorithm))
    );
    assert_eq!(failures(&metrics, Reason::Signature), 2);
    assert_eq!(failures(&metrics, Reason::Algorithm), 1);
}

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
async fn kubelet_claims_are_required_once_tokens_are_validated() {
    let source = Source::serving(&[RSA_1_JWK]);
    let (v, metrics) = validator(Mode::Auto, &source);
    let mut claims = claims_json();
    claims["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("pod");
    let token = sign(Algorithm::RS256, RSA_1, &kid(RSA_1_JWK), &claims);
    assert_eq!(
        v.verify(&token, &claims_of(&token)).await,
        Err(ValidationError::Claims(
            crate::token::TokenError::MissingClaim("kubernetes.io.pod")
        ))
    );
    assert_eq!(failures(&metrics, Reason::Claims), 1);
    // Without keys (`auto`), the agent is as before: EKS Auth judges such a token.
    let none = Source::default();
    let (v, _) = validator(Mode::Auto, &none);
    assert_eq!(
        v.verify(&token, &claims_of(&token)).await,
        Ok(Verification::Unchecked)
    );
}

#[test]
fn a_key_set_keeps_the_keys_it_can_use() {
    let mut value: Value = serde_json::from_slice(&set(&[RSA_1_JWK, EC_1_JWK])).unwrap();
    let keys = value["keys"].as_array_mut().unwrap();
    keys.push(json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}));
    keys.push(json!({"kty": "RSA", "kid": "ps", "alg": "PS256", "n": "AQAB", "e": "AQAB"}));
    keys.push(json!({"kty": "weird"}));
    let parsed = KeySet::parse(value.to_string().as_bytes()).unwrap();
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed.skipped, 3);
    assert!(parsed.contains(&kid(RSA_1_JWK)) && !parsed.contains("hmac"));
    assert!(matches!(
        KeySet::parse(b"{\"keys\":[]}"),
        Err(keys::KeySetError::NoUsableKey)
    ));
    assert!(matches!(
        KeySet::parse(b"[]"),
        Err(keys::KeySetError::NotAKeySet(_))
    ));
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
