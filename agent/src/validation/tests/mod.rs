//! Local validation with real keys (tests/fixtures/jwks: two RSA keys and a P-256 key, for
//! tests only) against a key source the tests steer, on tokio's paused clock. This file holds
//! the keys, tokens, the steered key source and the validator the parts share: [`signatures`]
//! (what verifies and what is refused), [`refresh`] (when keys are fetched again, and without
//! them).

mod refresh;
mod signatures;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

const RSA_1: &str = include_str!("../../../../tests/fixtures/jwks/rsa-1.pem");
const RSA_2: &str = include_str!("../../../../tests/fixtures/jwks/rsa-2.pem");
const EC_1: &str = include_str!("../../../../tests/fixtures/jwks/ec-1.pem");
const RSA_1_JWK: &str = include_str!("../../../../tests/fixtures/jwks/rsa-1.jwk.json");
const RSA_2_JWK: &str = include_str!("../../../../tests/fixtures/jwks/rsa-2.jwk.json");
const EC_1_JWK: &str = include_str!("../../../../tests/fixtures/jwks/ec-1.jwk.json");

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
