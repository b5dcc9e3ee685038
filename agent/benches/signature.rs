//! What local validation costs a new token (issue 17): reading its claims, as the agent always
//! did, against reading them and checking its signature with the cluster's key (RS256 with the
//! 2048-bit fixture key, as EKS signs; ES256 with a P-256 key), as `cargo xtask bench` reports in
//! BENCHMARKS.md. Cached tokens are never checked again, so the cached path does not change.

// A benchmark: a fixture that cannot be read or signed is a broken checkout, and it says so.
#![allow(clippy::unwrap_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pod_identity_agent::token::Claims;
use pod_identity_agent::validation::{KeySet, TokenHeader};
use serde_json::{Value, json};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/jwks");

fn fixture(name: &str) -> (String, Value) {
    let read = |file: String| std::fs::read_to_string(format!("{FIXTURES}/{file}")).unwrap();
    let jwk = serde_json::from_str(&read(format!("{name}.jwk.json"))).unwrap();
    (read(format!("{name}.pem")), jwk)
}

/// A projected token as kubelet writes it, signed with the fixture `name`; and the key set that
/// publishes the fixture's public half.
fn token_and_keys(name: &str, alg: Algorithm) -> (String, KeySet) {
    let (pem, jwk) = fixture(name);
    let mut header = Header::new(alg);
    header.kid = jwk["kid"].as_str().map(str::to_owned);
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    };
    let claims = json!({
        "aud": ["pods.eks.amazonaws.com"], "exp": 4_000_000_000_i64, "iat": 1_765_000_000, "nbf": 1_765_000_000,
        "iss": "https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE", "sub": "system:serviceaccount:shop:cart",
        "jti": "0b5e3c2a-1111-4222-8333-444455556666",
        "kubernetes.io": {
            "namespace": "shop",
            "node": {"name": "ip-10-0-1-23.eu-west-1.compute.internal", "uid": "0b5e3c2a-2222-4222-8333-444455556666"},
            "pod": {"name": "cart-7d9f-1", "uid": "0b5e3c2a-3333-4222-8333-444455556666"},
            "serviceaccount": {"name": "cart", "uid": "0b5e3c2a-4444-4222-8333-444455556666"}
        }
    });
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let set = json!({ "keys": [jwk] }).to_string();
    (token, KeySet::parse(set.as_bytes()).unwrap())
}

/// What the request path does with a new token: read and check its claims, then (validation on)
/// its header and signature.
fn check(token: &str, keys: Option<&KeySet>) {
    let claims = Claims::parse(token).unwrap();
    claims.check(1_765_000_100).unwrap();
    if let Some(keys) = keys {
        claims.check_kubernetes_claims().unwrap();
        let header = TokenHeader::parse(token).unwrap();
        keys.verify(token, &header).unwrap().unwrap();
    }
}

fn new_token(c: &mut Criterion) {
    let mut group = c.benchmark_group("new token");
    let (rsa, rsa_keys) = token_and_keys("rsa-1", Algorithm::RS256);
    let (ec, ec_keys) = token_and_keys("ec-1", Algorithm::ES256);
    group.bench_function("claims only (validation off)", |b| {
        b.iter(|| check(std::hint::black_box(&rsa), None));
    });
    group.bench_function("claims and RS256 signature", |b| {
        b.iter(|| check(std::hint::black_box(&rsa), Some(&rsa_keys)));
    });
    group.bench_function("claims and ES256 signature", |b| {
        b.iter(|| check(std::hint::black_box(&ec), Some(&ec_keys)));
    });
    group.finish();
}

criterion_group!(benches, new_token);
criterion_main!(benches);
