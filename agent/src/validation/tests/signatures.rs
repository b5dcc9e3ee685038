//! What verifies (RS256 and ES256 with the cluster's keys) and what is refused: a forged
//! signature, missing kubelet claims; the key set keeps the keys it can use.

use super::*;

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
