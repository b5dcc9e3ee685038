//! The cluster's service-account signing keys, for tests: the key pairs in `tests/fixtures/jwks`
//! (made for these tests only; never trust them anywhere else). A Kubernetes API stand-in
//! publishes their public halves ([`ClusterKey::jwk`]) at `/openid/v1/jwks`, and the EKS Auth
//! stand-in signs and verifies tokens with them, as a real cluster and EKS Auth share its key.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::Serialize;
use serde_json::Value;

/// One signing key of the cluster.
pub struct ClusterKey {
    /// The key id the API server gives it (40 lowercase hex digits, as on EKS).
    pub kid: String,
    pub algorithm: Algorithm,
    /// The public key as a JWK, as `/openid/v1/jwks` lists it.
    pub jwk: Value,
    pub(crate) decoding: DecodingKey,
    encoding: EncodingKey,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl ClusterKey {
    /// The fixture `name`: `rsa-1` and `rsa-2` (RS256), `ec-1` (ES256).
    pub fn fixture(name: &str) -> Result<Arc<ClusterKey>> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/jwks");
        let pem = std::fs::read(dir.join(format!("{name}.pem")))
            .with_context(|| format!("reading the key {name}"))?;
        let jwk: Value = serde_json::from_slice(
            &std::fs::read(dir.join(format!("{name}.jwk.json")))
                .with_context(|| format!("reading the JWK of {name}"))?,
        )?;
        let kid = jwk["kid"].as_str().context("the JWK's kid")?.to_owned();
        let (algorithm, encoding) = match jwk["alg"].as_str() {
            Some("RS256") => (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem)?),
            Some("ES256") => (Algorithm::ES256, EncodingKey::from_ec_pem(&pem)?),
            other => bail!("unexpected alg {other:?} in the JWK of {name}"),
        };
        let decoding = DecodingKey::from_jwk(&serde_json::from_value(jwk.clone())?)?;
        Ok(Arc::new(ClusterKey {
            kid,
            algorithm,
            jwk,
            decoding,
            encoding,
        }))
    }

    /// Signs `claims` with this key, naming key `kid` in the header.
    pub fn sign(&self, kid: &str, claims: &impl Serialize) -> Result<String> {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding).context("signing a token")
    }
}
