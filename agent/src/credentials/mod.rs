//! Credentials: what EKS Auth hands out, the [`Retriever`] seam, the EKS Auth client behind it
//! ([`eks_auth`]), the cache that wraps it ([`cache`]) and the admission path that paces the
//! cache's calls to what EKS Auth accepts ([`admission`]).

pub mod admission;
pub mod cache;
pub mod eks_auth;
pub mod upstream_error;

use std::fmt;
use std::future::Future;
use std::time::SystemTime;

use bytes::Bytes;

pub use upstream_error::{ErrorClass, UpstreamError};

/// Temporary AWS credentials for one pod identity association.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub account_id: String,
    pub expiration: SystemTime,
}

/// Never prints the secret key or the session token.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("account_id", &self.account_id)
            .field(
                "expiration",
                &humantime::format_rfc3339_seconds(self.expiration),
            )
            .finish_non_exhaustive()
    }
}

/// What EKS Auth said about the token besides the credentials: who it is and which role it got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Association {
    pub namespace: String,
    pub service_account: String,
    pub role_arn: String,
    pub association_id: String,
    /// `arn:aws:sts::<account>:assumed-role/<role>/<session>`, as CloudTrail names the caller.
    pub assumed_role_arn: String,
}

/// One answer from EKS Auth, with the response body the agent serves already rendered: the
/// cached path sends these bytes as they are. The secret key and the session token are kept only
/// there (once per entry, not twice).
#[derive(Clone)]
pub struct Issued {
    pub credentials: CredentialsId,
    pub association: Association,
    pub body: Bytes,
}

/// Never prints the body, which holds the secret key and the session token.
impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("credentials", &self.credentials)
            .field("association", &self.association)
            .field(
                "body",
                &format_args!("<{} bytes redacted>", self.body.len()),
            )
            .finish()
    }
}

/// What identifies credentials, without their secrets: for the cache's schedule, the audit log
/// and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsId {
    pub access_key_id: String,
    pub account_id: String,
    pub expiration: SystemTime,
}

impl Issued {
    pub fn new(credentials: Credentials, association: Association) -> Issued {
        let body = render_body(&credentials);
        let Credentials {
            access_key_id,
            account_id,
            expiration,
            ..
        } = credentials;
        Issued {
            credentials: CredentialsId {
                access_key_id,
                account_id,
                expiration,
            },
            association,
            body,
        }
    }
}

/// The body every SDK's container provider accepts: `Expiration` in UTC ending in `Z`, no `Code`.
/// Allocated once at its size: it is kept for as long as the credentials are cached.
fn render_body(c: &Credentials) -> Bytes {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct Body<'a> {
        access_key_id: &'a str,
        secret_access_key: &'a str,
        token: &'a str,
        account_id: &'a str,
        expiration: String,
    }
    let body = Body {
        access_key_id: &c.access_key_id,
        secret_access_key: &c.secret_access_key,
        token: &c.session_token,
        account_id: &c.account_id,
        expiration: humantime::format_rfc3339_seconds(c.expiration).to_string(),
    };
    // The fields, their names and quotes, the date: escapes aside, the exact size.
    let size = 96
        + c.access_key_id.len()
        + c.secret_access_key.len()
        + c.session_token.len()
        + c.account_id.len();
    let mut out = Vec::with_capacity(size);
    // Serializing plain strings cannot fail.
    if serde_json::to_writer(&mut out, &body).is_err() {
        out.clear();
    }
    Bytes::from(out.into_boxed_slice())
}

/// Where credentials come from: EKS Auth in production, a stand-in in unit tests.
pub trait Retriever: Send + Sync + 'static {
    /// Exchanges a pod's token for credentials.
    fn fetch(&self, token: &str) -> impl Future<Output = Result<Issued, UpstreamError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn body_is_what_the_sdks_accept() {
        let c = Credentials {
            access_key_id: "ASIA1".into(),
            secret_access_key: "s3cr3t".into(),
            session_token: "t0k".into(),
            account_id: "111122223333".into(),
            expiration: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_629_600),
        };
        let issued = Issued::new(c.clone(), Association::default());
        let v: serde_json::Value = serde_json::from_slice(&issued.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "AccessKeyId": "ASIA1", "SecretAccessKey": "s3cr3t", "Token": "t0k",
                "AccountId": "111122223333", "Expiration": "2026-11-25T18:00:00Z"
            })
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("s3cr3t") && !debug.contains("t0k"),
            "{debug}"
        );
    }

    /// No type that holds a secret prints it through `Debug`: the credentials, what EKS Auth
    /// issued (its body holds the secret key and the session token), the audit event that
    /// carries it, and the token's claims (never the token itself).
    #[test]
    fn debug_never_prints_a_secret() {
        use crate::audit::AuditEvent;
        use crate::credentials::cache::Lookup;
        use crate::token::Claims;
        use base64::Engine as _;

        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY";
        let session = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN";
        let c = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: secret.into(),
            session_token: session.into(),
            account_id: "111122223333".into(),
            expiration: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_629_600),
        };
        let issued = std::sync::Arc::new(Issued::new(c.clone(), Association::default()));
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let signature = "c2lnbmF0dXJlLXRoYXQtbXVzdC1uZXZlci1iZS1wcmludGVk";
        let token = format!(
            "{}.{}.{signature}",
            b64(serde_json::json!({"alg": "RS256"})),
            b64(serde_json::json!({"exp": 4_000_000_000_i64, "aud": "pods.eks.amazonaws.com"}))
        );
        let claims = std::sync::Arc::new(Claims::parse(&token).unwrap());
        let event = AuditEvent {
            issued: Some(issued.clone()),
            claims: Some(claims.clone()),
            lookup: Some(Lookup::Miss),
            ..AuditEvent::new(
                SystemTime::UNIX_EPOCH,
                "169.254.200.1:1234".parse().unwrap(),
                "allowed",
                200,
            )
        };
        for debug in [
            format!("{c:?}"),
            format!("{issued:?}"),
            format!("{event:?}"),
            format!("{claims:?}"),
        ] {
            assert!(
                debug.contains("ASIAEXAMPLE") || debug.contains("Claims"),
                "{debug}"
            );
            for s in [secret, session, signature, token.as_str()] {
                assert!(!debug.contains(s), "{s} in {debug}");
            }
        }
    }
}
