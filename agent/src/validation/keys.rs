//! The cluster's signing keys: a JSON Web Key Set (`/openid/v1/jwks`) parsed into verification
//! keys by key id, and the signature check of one token against them.
//!
//! Only what the API server can issue is accepted: RS256 (RSA keys) and ES256 (P-256 keys). A key
//! the set declares for another algorithm, or cannot be read, is skipped (and counted), never a
//! reason to drop the whole set.

use std::collections::HashMap;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Why a key set could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    #[error("the key set is not JSON with a `keys` list")]
    NotAKeySet(#[source] serde_json::Error),
    #[error("the key set has no RS256 or ES256 key")]
    NoUsableKey,
}

/// Why a token's signature was not accepted by the key its `kid` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the token's header is not readable")]
    Header,
    #[error("the token names no key (`kid`)")]
    NoKeyId,
    #[error("the token's algorithm is not its key's")]
    Algorithm,
    #[error("the token's signature does not verify with the cluster's key")]
    Signature,
}

/// One verification key and the algorithm it verifies.
struct Key {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The keys of one key set, by key id.
pub struct KeySet {
    keys: HashMap<String, Key>,
    /// Keys of the set that were skipped (another algorithm, unreadable).
    pub skipped: usize,
}

/// A token's header, read without verifying anything.
pub struct TokenHeader {
    pub kid: String,
    algorithm: Algorithm,
}

impl TokenHeader {
    /// Reads the header of `token`.
    pub fn parse(token: &str) -> Result<TokenHeader, SignatureError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| SignatureError::Header)?;
        let kid = header.kid.ok_or(SignatureError::NoKeyId)?;
        Ok(TokenHeader {
            kid,
            algorithm: header.alg,
        })
    }
}

/// The `{"keys": [...]}` wrapper, each key kept as JSON so that one unreadable key (an algorithm
/// this crate does not know) does not make the others unreadable.
#[derive(serde::Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// Parses a JSON Web Key Set.
    pub fn parse(json: &[u8]) -> Result<KeySet, KeySetError> {
        let raw: RawSet = serde_json::from_slice(json).map_err(KeySetError::NotAKeySet)?;
        let total = raw.keys.len();
        let mut keys = HashMap::with_capacity(total);
        for value in raw.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            let (Some(kid), Some(algorithm)) = (jwk.common.key_id.clone(), algorithm(&jwk)) else {
                continue;
            };
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            // The first of two keys with one id wins, as in the API server's own verifier.
            keys.entry(kid).or_insert(Key { algorithm, key });
        }
        if keys.is_empty() {
            return Err(KeySetError::NoUsableKey);
        }
        let skipped = total - keys.len();
        Ok(KeySet { keys, skipped })
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key (never true of a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the set has the key `kid`.
    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Checks `token`'s signature with the key its header names. `None`: no such key here.
    /// Only the signature: times, audience and claims are the caller's to check.
    pub fn verify(&self, token: &str, header: &TokenHeader) -> Option<Result<(), SignatureError>> {
        let key = self.keys.get(&header.kid)?;
        if key.algorithm != header.algorithm {
            return Some(Err(SignatureError::Algorithm));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        Some(
            jsonwebtoken::decode::<serde::de::IgnoredAny>(token, &key.key, &validation)
                .map(drop)
                .map_err(|_| SignatureError::Signature),
        )
    }
}

/// The algorithm a key verifies: as declared, else what its type implies. `None`: not one the
/// API server issues.
fn algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(implied),
        Some(KeyAlgorithm::RS256) if implied == Algorithm::RS256 => Some(implied),
        Some(KeyAlgorithm::ES256) if implied == Algorithm::ES256 => Some(implied),
        Some(_) => None,
    }
}
