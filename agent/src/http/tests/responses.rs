//! What a request gets: credentials, refusals with their status, upstream errors as they came,
//! and tokens failing local checks stopped before the cache.

use super::*;

#[tokio::test]
async fn serves_credentials_then_hits_the_cache() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    let t = token(POD, "cart", "j1");
    let (status, body) = fetch(&e, &t, &anonymous()).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["AccessKeyId"], "ASIA1");
    assert!(v["Expiration"].as_str().unwrap().ends_with('Z'));
    let (status, _) = send(
        &e,
        request("GET", CREDENTIALS_PATH, "[fd00:ec2::23]:80", Some(&t)),
        &anonymous(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(up.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_requests_get_their_status() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    let t = token(POD, "cart", "j1");
    let c = anonymous();
    assert_eq!(
        send(
            &e,
            request("GET", "/v1/other", "169.254.170.23", Some(&t)),
            &c
        )
        .await
        .0,
        404
    );
    assert_eq!(
        send(
            &e,
            request("POST", CREDENTIALS_PATH, "169.254.170.23", Some(&t)),
            &c
        )
        .await
        .0,
        405
    );
    assert_eq!(
        send(
            &e,
            request("GET", CREDENTIALS_PATH, "example.com", Some(&t)),
            &c
        )
        .await
        .0,
        403
    );
    assert_eq!(
        send(
            &e,
            request("GET", CREDENTIALS_PATH, "169.254.170.2", Some(&t)),
            &c
        )
        .await
        .0,
        403
    );
    let (status, body) = send(
        &e,
        request("GET", CREDENTIALS_PATH, "169.254.170.23", None),
        &c,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (400, "no token in the Authorization header")
    );
    assert_eq!(fetch(&e, "garbage", &c).await.0, 400);
    let expired = unsigned_token(&json!({"aud": "pods.eks.amazonaws.com", "exp": 1000}));
    let (status, body) = fetch(&e, &expired, &c).await;
    assert_eq!((status, body.as_str()), (400, "the token has expired"));
    assert_eq!(
        up.calls.load(Ordering::SeqCst),
        0,
        "no bad request reached upstream"
    );
}

#[tokio::test]
async fn upstream_errors_keep_their_status_and_code() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    for (status, code) in [
        (400, "InvalidTokenException"),
        (404, "ResourceNotFoundException"),
    ] {
        up.script
            .lock()
            .unwrap()
            .push_back(UpstreamError::new(status, code, "said upstream"));
        let t = token(POD, "cart", code);
        let got = fetch(&e, &t, &anonymous()).await;
        assert_eq!(got, (status, format!("({code}): said upstream")));
    }
    // A throttled call is the agent's to retry, at its pace: the pod is served.
    let calls = up.calls.load(Ordering::SeqCst);
    up.script.lock().unwrap().push_back(UpstreamError::new(
        429,
        "ThrottlingException",
        "said upstream",
    ));
    let t = token(POD, "cart", "throttled");
    assert_eq!(fetch(&e, &t, &anonymous()).await.0, 200);
    assert_eq!(up.calls.load(Ordering::SeqCst), calls + 2);
}

#[test]
fn host_header_forms() {
    for (host, ip) in [
        ("169.254.170.23", Some("169.254.170.23")),
        ("169.254.170.23:80", Some("169.254.170.23")),
        ("[fd00:ec2::23]", Some("fd00:ec2::23")),
        ("[fd00:ec2::23]:80", Some("fd00:ec2::23")),
        ("fd00:ec2::23", Some("fd00:ec2::23")),
        ("[fd00:ec2::23]x", None),
        ("169.254.170.23:http", None),
        ("localhost", None),
        ("", None),
    ] {
        assert_eq!(host_ip(host), ip.map(|i| i.parse().unwrap()), "{host:?}");
    }
}

/// A token that fails the checks the agent can make (shape, claims, time, audience) is refused
/// before the cache: no EKS Auth call, no place in the admission queue — a flood of such tokens
/// costs the neighbours nothing.
#[tokio::test]
async fn a_token_failing_local_checks_never_reaches_the_queue_or_eks_auth() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    let now = Clock::System.unix_now();
    let claims = |exp: i64, nbf: i64, aud: &str| {
        unsigned_token(&json!({"aud": [aud], "exp": exp, "iat": nbf, "nbf": nbf, "jti": "j"}))
    };
    let aud = "pods.eks.amazonaws.com";
    for bad in [
        "not-a-jwt".to_owned(),
        "a.b.c".to_owned(),
        claims(now - 3600, now - 7200, aud),
        claims(now + 7200, now + 3600, aud),
        claims(now + 3600, now, "sts.amazonaws.com"),
    ] {
        let (status, body) = fetch(&e, &bad, &Caller::in_test_pod(POD)).await;
        assert!((400..500).contains(&status), "{bad}: {status} {body}");
    }
    assert_eq!(up.calls.load(Ordering::SeqCst), 0);
    let state = |s: &str| e.metrics.cache_state.with_label_values(&[s]).get();
    assert_eq!((state("miss"), state("coalesced")), (0, 0));
    assert_eq!(e.metrics.upstream_deferred.get(), 0);
}
