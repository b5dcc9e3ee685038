//! The projected service-account token (a JWT): its claims, read but not verified.
//!
//! EKS Auth verifies the signature. The agent checks what it can without the key — shape,
//! time claims and audience — so that a malformed or stale token is refused at once, and reads
//! the claims that the audit log and token binding need.

use serde::Deserialize;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The audience EKS Auth accepts.
pub const AUDIENCE: &str = "pods.eks.amazonaws.com";

/// Tolerated clock skew for `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: i64 = 30;

/// Why a token was refused before any upstream call.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no token in the Authorization header")]
    Missing,
    #[error("the token is not a JWT")]
    NotJwt,
    #[error("the token's claims are not readable: {0}")]
    BadClaims(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's audience is not the agent's (--token-audience, by default {AUDIENCE})")]
    WrongAudience,
    /// A claim kubelet always puts in a projected token, and EKS Auth needs, is missing.
    #[error("the token has no {0} claim")]
    MissingClaim(&'static str),
}

/// The claims of a projected service-account token that the agent uses, and only those: they are
/// kept with every cached token (others, such as `sub` or the service account's and node's UIDs,
/// are skipped when parsing).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub exp: i64,
    #[serde(default)]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub iat: Option<i64>,
    #[serde(default)]
    pub aud: Audience,
    #[serde(default)]
    pub jti: Option<String>,
    #[serde(default, rename = "kubernetes.io")]
    pub kubernetes: Option<KubernetesClaims>,
}

/// `aud` is a string or a list of strings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::None => false,
            Audience::One(a) => a == aud,
            Audience::Many(list) => list.iter().any(|a| a == aud),
        }
    }
}

/// The `kubernetes.io` claim.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct KubernetesClaims {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub serviceaccount: Option<ServiceAccountClaim>,
    #[serde(default)]
    pub pod: Option<NamedObject>,
    #[serde(default)]
    pub node: Option<Named>,
}

/// A `{name, uid}` reference of which only the name is used.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Named {
    #[serde(default)]
    pub name: Option<String>,
}

/// The service account: its name, and whether the token carries its uid (which EKS Auth needs;
/// the agent does not keep it).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct ServiceAccountClaim {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uid: Option<Present>,
}

/// A claim whose value is not kept, only the fact that it is there (and not `null`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present;

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Present)
    }
}

/// A `{name, uid}` reference.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct NamedObject {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
}

impl Claims {
    /// Reads the claims of `token` (the payload of a three-part JWT) without verifying it.
    pub fn parse(token: &str) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(_header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::NotJwt);
        };
        let json = URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| TokenError::NotJwt)?;
        serde_json::from_slice(&json).map_err(|e| TokenError::BadClaims(e.to_string()))
    }

    /// Checks the time claims at `now` (Unix seconds) and the audience EKS Auth accepts.
    pub fn check(&self, now: i64) -> Result<(), TokenError> {
        self.check_for(now, AUDIENCE)
    }

    /// Checks the time claims at `now` (Unix seconds) and that `audience` is among the token's.
    pub fn check_for(&self, now: i64, audience: &str) -> Result<(), TokenError> {
        // The claims are the client's: `exp` and `nbf` may be anywhere in i64. Past its ends, the
        // bound with the leeway cannot be reached by `now`.
        if self
            .exp
            .checked_add(LEEWAY_SECS)
            .is_some_and(|end| end <= now)
        {
            return Err(TokenError::Expired);
        }
        if self
            .nbf
            .and_then(|nbf| nbf.checked_sub(LEEWAY_SECS))
            .is_some_and(|start| start > now)
        {
            return Err(TokenError::NotYetValid);
        }
        if !self.aud.contains(audience) {
            return Err(TokenError::WrongAudience);
        }
        Ok(())
    }

    /// Checks that the `kubernetes.io` claims kubelet always puts in a projected token, and that
    /// EKS Auth needs, are there: namespace, service account name and uid, pod name and uid.
    pub fn check_kubernetes_claims(&self) -> Result<(), TokenError> {
        let k = self
            .kubernetes
            .as_ref()
            .ok_or(TokenError::MissingClaim("kubernetes.io"))?;
        k.namespace
            .as_ref()
            .ok_or(TokenError::MissingClaim("kubernetes.io.namespace"))?;
        let sa = k
            .serviceaccount
            .as_ref()
            .ok_or(TokenError::MissingClaim("kubernetes.io.serviceaccount"))?;
        sa.name.as_ref().ok_or(TokenError::MissingClaim(
            "kubernetes.io.serviceaccount.name",
        ))?;
        sa.uid
            .as_ref()
            .ok_or(TokenError::MissingClaim("kubernetes.io.serviceaccount.uid"))?;
        let pod = k
            .pod
            .as_ref()
            .ok_or(TokenError::MissingClaim("kubernetes.io.pod"))?;
        pod.name
            .as_ref()
            .ok_or(TokenError::MissingClaim("kubernetes.io.pod.name"))?;
        pod.uid
            .as_ref()
            .ok_or(TokenError::MissingClaim("kubernetes.io.pod.uid"))?;
        Ok(())
    }

    pub fn namespace(&self) -> Option<&str> {
        self.kubernetes.as_ref()?.namespace.as_deref()
    }

    pub fn service_account(&self) -> Option<&str> {
        self.kubernetes
            .as_ref()?
            .serviceaccount
            .as_ref()?
            .name
            .as_deref()
    }

    pub fn pod_name(&self) -> Option<&str> {
        self.kubernetes.as_ref()?.pod.as_ref()?.name.as_deref()
    }

    pub fn pod_uid(&self) -> Option<&str> {
        self.kubernetes.as_ref()?.pod.as_ref()?.uid.as_deref()
    }

    pub fn node_name(&self) -> Option<&str> {
        self.kubernetes.as_ref()?.node.as_ref()?.name.as_deref()
    }
}

/// Test support: an unsigned token with the given claims (the agent never verifies signatures).
#[doc(hidden)]
pub fn unsigned_token(claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.c2lnbmF0dXJl")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(now: i64) -> serde_json::Value {
        json!({
            "aud": ["pods.eks.amazonaws.com"], "exp": now + 86400, "iat": now, "nbf": now,
            "iss": "https://oidc.eks.us-west-2.amazonaws.com/id/X", "jti": "j-1",
            "sub": "system:serviceaccount:shop:cart",
            "kubernetes.io": {
                "namespace": "shop",
                "node": {"name": "ip-10-0-0-1", "uid": "n-1"},
                "pod": {"name": "cart-7d9", "uid": "0b5e3c2a-1111-4222-8333-444455556666"},
                "serviceaccount": {"name": "cart", "uid": "s-1"}
            }
        })
    }

    #[test]
    fn reads_the_claims_the_agent_uses() {
        let c = Claims::parse(&unsigned_token(&claims(1_000_000))).unwrap();
        assert_eq!(c.namespace(), Some("shop"));
        assert_eq!(c.service_account(), Some("cart"));
        assert_eq!(c.pod_name(), Some("cart-7d9"));
        assert_eq!(c.pod_uid(), Some("0b5e3c2a-1111-4222-8333-444455556666"));
        assert_eq!(c.node_name(), Some("ip-10-0-0-1"));
        assert_eq!(c.jti.as_deref(), Some("j-1"));
        assert_eq!(c.check(1_000_000), Ok(()));
    }

    #[test]
    fn refuses_what_is_not_a_jwt() {
        for bad in ["", "abc", "a.b", "a.b.c.d", "a.!!!.c"] {
            assert_eq!(Claims::parse(bad), Err(TokenError::NotJwt), "{bad:?}");
        }
        let not_json = format!("a.{}.c", URL_SAFE_NO_PAD.encode("nope"));
        assert!(matches!(
            Claims::parse(&not_json),
            Err(TokenError::BadClaims(_))
        ));
        let no_exp = unsigned_token(&json!({"aud": AUDIENCE}));
        assert!(matches!(
            Claims::parse(&no_exp),
            Err(TokenError::BadClaims(_))
        ));
    }

    #[test]
    fn time_claims_have_a_small_leeway() {
        let now = 1_000_000;
        let c = Claims::parse(&unsigned_token(&claims(now))).unwrap();
        assert_eq!(c.check(now + 86400 + LEEWAY_SECS - 1), Ok(()));
        assert_eq!(c.check(now + 86400 + LEEWAY_SECS), Err(TokenError::Expired));
        assert_eq!(c.check(now - LEEWAY_SECS), Ok(()));
        assert_eq!(c.check(now - LEEWAY_SECS - 1), Err(TokenError::NotYetValid));
    }

    #[test]
    fn time_claims_at_the_ends_of_the_range_do_not_overflow() {
        // Found by the `token` fuzz target: `exp + leeway` overflowed (a panic in debug builds, a
        // token far in the future refused as expired in release builds).
        let mut v = claims(0);
        v["exp"] = json!(i64::MAX);
        v["nbf"] = json!(i64::MIN);
        let c = Claims::parse(&unsigned_token(&v)).unwrap();
        for now in [i64::MIN, 0, i64::MAX] {
            assert_eq!(c.check(now), Ok(()), "at {now}");
        }
        v["exp"] = json!(i64::MIN);
        v["nbf"] = json!(i64::MAX);
        let c = Claims::parse(&unsigned_token(&v)).unwrap();
        assert_eq!(c.check(0), Err(TokenError::Expired));
        v["exp"] = json!(i64::MAX);
        let c = Claims::parse(&unsigned_token(&v)).unwrap();
        assert_eq!(c.check(0), Err(TokenError::NotYetValid));
        assert_eq!(c.check(i64::MAX), Ok(()), "not before MAX - leeway");
    }

    #[test]
    fn audience_must_be_eks_pod_identity() {
        let mut v = claims(0);
        v["aud"] = json!("sts.amazonaws.com");
        let c = Claims::parse(&unsigned_token(&v)).unwrap();
        assert_eq!(c.check(0), Err(TokenError::WrongAudience));
        v["aud"] = json!(AUDIENCE);
        assert_eq!(Claims::parse(&unsigned_token(&v)).unwrap().check(0), Ok(()));
    }

    #[test]
    fn another_audience_can_be_configured() {
        let mut v = claims(0);
        v["aud"] = json!(["sts.amazonaws.com", "delegate.example"]);
        let c = Claims::parse(&unsigned_token(&v)).unwrap();
        assert_eq!(c.check_for(0, "delegate.example"), Ok(()));
        assert_eq!(c.check(0), Err(TokenError::WrongAudience));
    }

    #[test]
    fn kubelet_claims_are_required() {
        let c = Claims::parse(&unsigned_token(&claims(0))).unwrap();
        assert_eq!(c.check_kubernetes_claims(), Ok(()));
        for (path, missing) in [
            (&["kubernetes.io"][..], "kubernetes.io"),
            (&["kubernetes.io", "namespace"], "kubernetes.io.namespace"),
            (
                &["kubernetes.io", "serviceaccount"],
                "kubernetes.io.serviceaccount",
            ),
            (
                &["kubernetes.io", "serviceaccount", "name"],
                "kubernetes.io.serviceaccount.name",
            ),
            (
                &["kubernetes.io", "serviceaccount", "uid"],
                "kubernetes.io.serviceaccount.uid",
            ),
            (&["kubernetes.io", "pod"], "kubernetes.io.pod"),
            (&["kubernetes.io", "pod", "name"], "kubernetes.io.pod.name"),
            (&["kubernetes.io", "pod", "uid"], "kubernetes.io.pod.uid"),
        ] {
            let mut v = claims(0);
            let (last, parents) = path.split_last().unwrap();
            let mut at = &mut v;
            for p in parents {
                at = &mut at[*p];
            }
            at.as_object_mut().unwrap().remove(*last);
            let c = Claims::parse(&unsigned_token(&v)).unwrap();
            assert_eq!(
                c.check_kubernetes_claims(),
                Err(TokenError::MissingClaim(missing))
            );
            // A null is as missing as an absent claim.
            let mut v = claims(0);
            let mut at = &mut v;
            for p in parents {
                at = &mut at[*p];
            }
            at[*last] = serde_json::Value::Null;
            let c = Claims::parse(&unsigned_token(&v)).unwrap();
            assert_eq!(
                c.check_kubernetes_claims(),
                Err(TokenError::MissingClaim(missing)),
                "{path:?} null"
            );
        }
    }
}
