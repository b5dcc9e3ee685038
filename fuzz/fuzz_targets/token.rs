//! The token parser and its claims checks.
//!
//! The input is read twice: as a whole token (what `Authorization` carries), and as the JSON of a
//! token's payload (so that mutations reach the claims, not only the base64 around them). For
//! every token that reads, `check` is compared with the rule written out in 128-bit arithmetic,
//! at "now" values taken from the input and at the extremes.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use pod_identity_agent::token::{AUDIENCE, Audience, Claims, LEEWAY_SECS, TokenError};

fuzz_target!(|data: &[u8]| {
    let nows = nows(data);
    if let Ok(token) = std::str::from_utf8(data) {
        check_token(token, &nows);
    }
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"k","typ":"JWT"}"#);
    let token = format!("{header}.{}.c2ln", URL_SAFE_NO_PAD.encode(data));
    check_token(&token, &nows);
});

/// Reads `token`; for claims that read, checks them at every `now` against the rule.
fn check_token(token: &str, nows: &[i64]) -> Option<Claims> {
    let claims = match Claims::parse(token) {
        Ok(claims) => claims,
        Err(TokenError::NotJwt | TokenError::BadClaims(_)) => return None,
        Err(e) => panic!("parse refused {token:?} for a reason of `check`: {e}"),
    };
    // Three parts, exactly.
    assert_eq!(token.split('.').count(), 3, "{token:?}");
    for &now in nows {
        assert_eq!(
            claims.check(now),
            expected(&claims, now),
            "{claims:?} at {now}"
        );
    }
    // The accessors read what the claims hold.
    let k = claims.kubernetes.as_ref();
    assert_eq!(claims.namespace(), k.and_then(|k| k.namespace.as_deref()));
    assert_eq!(
        claims.pod_uid(),
        k.and_then(|k| k.pod.as_ref())
            .and_then(|p| p.uid.as_deref())
    );
    Some(claims)
}

/// The rule of `Claims::check`, in arithmetic that cannot overflow.
fn expected(c: &Claims, now: i64) -> Result<(), TokenError> {
    let (now, leeway) = (i128::from(now), i128::from(LEEWAY_SECS));
    if i128::from(c.exp) + leeway <= now {
        return Err(TokenError::Expired);
    }
    if c.nbf.is_some_and(|nbf| i128::from(nbf) - leeway > now) {
        return Err(TokenError::NotYetValid);
    }
    let audience = match &c.aud {
        Audience::None => false,
        Audience::One(a) => a == AUDIENCE,
        Audience::Many(list) => list.iter().any(|a| a == AUDIENCE),
    };
    if !audience {
        return Err(TokenError::WrongAudience);
    }
    Ok(())
}

/// The extremes, the fixed "now", and one taken from the input's last eight bytes.
fn nows(data: &[u8]) -> Vec<i64> {
    let mut nows = vec![i64::MIN, -1, 0, fuzz_support::NOW, i64::MAX];
    if let Some(tail) = data.last_chunk::<8>() {
        nows.push(i64::from_le_bytes(*tail));
    }
    nows
}
