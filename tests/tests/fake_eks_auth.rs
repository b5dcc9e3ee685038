//! The fake EKS Auth against the real `aws-sdk-eksauth` client: if the SDK parses its answers into the
//! right types and typed errors, the fake speaks the real wire format.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use aws_sdk_eksauth::Client;
use aws_sdk_eksauth::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_eksauth::operation::assume_role_for_pod_identity::AssumeRoleForPodIdentityError as E;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use e2e::clients::{RawRequest, raw_http};
use e2e::fake_eks_auth::{ApiError, FakeEksAuth, Fault, FaultTimes, TokenSpec, decode_unverified};

const CLUSTER: &str = "e2e-cluster";

fn fake() -> FakeEksAuth {
    FakeEksAuth::start(TcpListener::bind("127.0.0.1:0").unwrap(), CLUSTER).unwrap()
}

fn client(fake: &FakeEksAuth) -> Client {
    let config = aws_sdk_eksauth::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(fake.endpoint())
        .region(Region::new("us-west-2"))
        .credentials_provider(Credentials::new(
            "AKIAE2ETEST",
            "secret",
            None,
            None,
            "test",
        ))
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(2))
                .build(),
        )
        .build();
    Client::from_conf(config)
}

fn pod_token(fake: &FakeEksAuth, spec: TokenSpec) -> String {
    fake.issue_token(
        &spec
            .pod("web-0", "9c1a3a0e-3f3b-4a51-9d0e-1f2a3b4c5d6e")
            .node("node-1", "n-uid"),
    )
    .unwrap()
}

async fn call(
    client: &Client,
    cluster: &str,
    token: &str,
) -> Result<
    aws_sdk_eksauth::operation::assume_role_for_pod_identity::AssumeRoleForPodIdentityOutput,
    E,
> {
    client
        .assume_role_for_pod_identity()
        .cluster_name(cluster)
        .token(token)
        .send()
        .await
        .map_err(aws_sdk_eksauth::error::SdkError::into_service_error)
}

#[tokio::test]
async fn success_parses_every_member() {
    let fake = fake();
    let association = fake.associate("shop", "web-sa", "web-role");
    let token = pod_token(&fake, TokenSpec::new("shop", "web-sa"));
    let client = client(&fake);

    let out = call(&client, CLUSTER, &token).await.expect("success");
    let subject = out.subject().unwrap();
    assert_eq!(
        (subject.namespace(), subject.service_account()),
        ("shop", "web-sa")
    );
    assert_eq!(out.audience(), "pods.eks.amazonaws.com");
    let pia = out.pod_identity_association().unwrap();
    assert_eq!(pia.association_arn(), association.association_arn);
    assert_eq!(pia.association_id(), association.association_id);
    let user = out.assumed_role_user().unwrap();
    assert!(
        user.arn()
            .starts_with("arn:aws:sts::111122223333:assumed-role/web-role/eks-e2e-cluster-web-0-")
    );
    assert!(user.assume_role_id().contains(':'));
    let creds = out.credentials().unwrap();
    let issued = fake.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(creds.access_key_id(), issued[0].access_key_id);
    assert!(creds.access_key_id().starts_with("ASIA"));
    assert_eq!(creds.secret_access_key(), issued[0].secret_access_key);
    assert_eq!(creds.session_token(), issued[0].session_token);
    assert_eq!(creds.expiration().secs(), issued[0].expiration);
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    assert!(
        (creds.expiration().secs() - now - 6 * 3600).abs() < 5,
        "default lifetime is 6 h"
    );

    // A second call gets a fresh key; observation counts both.
    let again = call(&client, CLUSTER, &token).await.unwrap();
    assert_ne!(
        again.credentials().unwrap().access_key_id(),
        creds.access_key_id()
    );
    assert_eq!(fake.calls(), 2);
    let jti = decode_unverified(&token).unwrap().jti;
    assert_eq!(fake.calls_for_jti(&jti), 2);
    assert_eq!(fake.calls_for_token(&token), 2);
    let req = fake.last_request().unwrap();
    assert_eq!(req.method, "POST");
    assert_eq!(
        req.path,
        "/clusters/e2e-cluster/assume-role-for-pod-identity"
    );
    assert!(
        req.header("authorization")
            .unwrap()
            .contains("/us-west-2/eks-auth/aws4_request")
    );
    assert_eq!(req.token.as_deref(), Some(token.as_str()));

    fake.set_credential_lifetime(Duration::from_secs(900));
    let short = call(&client, CLUSTER, &token).await.unwrap();
    assert!((short.credentials().unwrap().expiration().secs() - now - 900).abs() < 5);
}

#[tokio::test]
async fn tokens_carry_the_projected_service_account_claims() {
    let fake = fake();
    let token = pod_token(
        &fake,
        TokenSpec::new("shop", "web-sa").lifetime(Duration::from_secs(3600)),
    );
    let claims = decode_unverified(&token).unwrap();
    assert_eq!(claims.sub, "system:serviceaccount:shop:web-sa");
    assert_eq!(claims.aud, vec!["pods.eks.amazonaws.com".to_owned()]);
    assert_eq!(claims.exp - claims.iat, 3600);
    assert_eq!(claims.nbf, claims.iat);
    assert!(!claims.jti.is_empty() && claims.iss.starts_with("https://"));
    assert_eq!(claims.kubernetes.namespace, "shop");
    assert_eq!(claims.kubernetes.serviceaccount.name, "web-sa");
    assert_eq!(claims.kubernetes.pod.as_ref().unwrap().name, "web-0");
    assert_eq!(claims.kubernetes.node.as_ref().unwrap().name, "node-1");
    let other = fake
        .issue_token(
            &TokenSpec::new("shop", "web-sa")
                .pod("web-0", "x")
                .pod_uid("other-uid"),
        )
        .unwrap();
    assert_eq!(
        decode_unverified(&other)
            .unwrap()
            .kubernetes
            .pod
            .unwrap()
            .uid,
        "other-uid"
    );
}

#[tokio::test]
async fn the_service_s_own_errors_map_to_typed_sdk_errors() {
    let fake = fake();
    fake.associate("shop", "web-sa", "web-role");
    let client = client(&fake);
    let good = pod_token(&fake, TokenSpec::new("shop", "web-sa"));

    let forged = pod_token(&self::fake(), TokenSpec::new("shop", "web-sa"));
    assert!(matches!(
        call(&client, CLUSTER, &forged).await,
        Err(E::InvalidTokenException(_))
    ));
    let expired = pod_token(&fake, TokenSpec::new("shop", "web-sa").expired());
    assert!(matches!(
        call(&client, CLUSTER, &expired).await,
        Err(E::ExpiredTokenException(_))
    ));
    let early = pod_token(&fake, TokenSpec::new("shop", "web-sa").not_yet_valid());
    assert!(matches!(
        call(&client, CLUSTER, &early).await,
        Err(E::InvalidTokenException(_))
    ));
    let wrong_aud = pod_token(
        &fake,
        TokenSpec::new("shop", "web-sa").audience("sts.amazonaws.com"),
    );
    assert!(matches!(
        call(&client, CLUSTER, &wrong_aud).await,
        Err(E::InvalidTokenException(_))
    ));
    assert!(matches!(
        call(&client, CLUSTER, "not-a-jwt").await,
        Err(E::InvalidTokenException(_))
    ));
    let unassociated = pod_token(&fake, TokenSpec::new("shop", "other-sa"));
    assert!(matches!(
        call(&client, CLUSTER, &unassociated).await,
        Err(E::ResourceNotFoundException(_))
    ));
    assert!(matches!(
        call(&client, "no-such-cluster", &good).await,
        Err(E::ResourceNotFoundException(_))
    ));
    assert!(call(&client, CLUSTER, &good).await.is_ok());

    fake.disassociate("shop", "web-sa");
    assert!(matches!(
        call(&client, CLUSTER, &good).await,
        Err(E::ResourceNotFoundException(_))
    ));
}

#[tokio::test]
async fn injected_errors_map_to_typed_sdk_errors() {
    let fake = fake();
    fake.associate("shop", "web-sa", "web-role");
    let client = client(&fake);
    let token = pod_token(&fake, TokenSpec::new("shop", "web-sa"));

    type IsVariant = fn(&E) -> bool;
    let cases: [(ApiError, IsVariant); 9] = [
        (ApiError::AccessDenied, |e| {
            matches!(e, E::AccessDeniedException(_))
        }),
        (ApiError::ExpiredToken, |e| {
            matches!(e, E::ExpiredTokenException(_))
        }),
        (ApiError::InvalidParameter, |e| {
            matches!(e, E::InvalidParameterException(_))
        }),
        (ApiError::InvalidRequest, |e| {
            matches!(e, E::InvalidRequestException(_))
        }),
        (ApiError::InvalidToken, |e| {
            matches!(e, E::InvalidTokenException(_))
        }),
        (ApiError::ResourceNotFound, |e| {
            matches!(e, E::ResourceNotFoundException(_))
        }),
        (ApiError::Throttling, |e| {
            matches!(e, E::ThrottlingException(_))
        }),
        (ApiError::InternalServer, |e| {
            matches!(e, E::InternalServerException(_))
        }),
        (ApiError::ServiceUnavailable, |e| {
            matches!(e, E::ServiceUnavailableException(_))
        }),
    ];
    for (error, is_variant) in cases {
        fake.set_fault(Fault::Error(error), FaultTimes::Next(1));
        let err = call(&client, CLUSTER, &token)
            .await
            .expect_err("injected fault");
        assert!(is_variant(&err), "{error:?} became {err:?}");
        assert!(
            call(&client, CLUSTER, &token).await.is_ok(),
            "Next(1) lasts one call"
        );
    }

    fake.set_fault(Fault::Error(ApiError::Throttling), FaultTimes::Next(2));
    assert!(call(&client, CLUSTER, &token).await.is_err());
    assert!(call(&client, CLUSTER, &token).await.is_err());
    assert!(call(&client, CLUSTER, &token).await.is_ok());

    fake.set_fault(
        Fault::Error(ApiError::ServiceUnavailable),
        FaultTimes::Always,
    );
    for _ in 0..3 {
        assert!(matches!(
            call(&client, CLUSTER, &token).await,
            Err(E::ServiceUnavailableException(_))
        ));
    }
    fake.clear_fault();
    assert!(call(&client, CLUSTER, &token).await.is_ok());
}

#[tokio::test]
async fn hang_garbage_and_delay() {
    let fake = fake();
    fake.associate("shop", "web-sa", "web-role");
    let client = client(&fake);
    let token = pod_token(&fake, TokenSpec::new("shop", "web-sa"));

    fake.set_fault(Fault::Garbage, FaultTimes::Next(1));
    let err = client
        .assume_role_for_pod_identity()
        .cluster_name(CLUSTER)
        .token(&token)
        .send()
        .await;
    assert!(
        err.is_err(),
        "a 200 with a non-JSON body is an error for the SDK"
    );

    fake.set_fault(Fault::Hang, FaultTimes::Next(1));
    let started = Instant::now();
    let err = client
        .assume_role_for_pod_identity()
        .cluster_name(CLUSTER)
        .token(&token)
        .send()
        .await;
    assert!(
        matches!(err, Err(aws_sdk_eksauth::error::SdkError::TimeoutError(_))),
        "{err:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));

    fake.set_delay(Duration::from_millis(500));
    let started = Instant::now();
    assert!(call(&client, CLUSTER, &token).await.is_ok());
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(fake.calls(), 3);
}

#[test]
fn requests_without_an_eks_auth_signature_are_refused() {
    let fake = fake();
    fake.associate("shop", "web-sa", "web-role");
    let token = pod_token(&fake, TokenSpec::new("shop", "web-sa"));
    let body = serde_json::json!({ "token": token }).to_string();
    let post = |auth: Option<&str>| {
        let mut req = RawRequest::get("/clusters/e2e-cluster/assume-role-for-pod-identity")
            .method("POST")
            .host("eks-auth.us-west-2.api.aws")
            .header("Content-Type", "application/json");
        if let Some(auth) = auth {
            req = req.authorization(auth);
        }
        raw_http(
            fake.addr(),
            &req.body(body.as_bytes()).to_bytes(),
            Duration::from_secs(5),
        )
        .unwrap()
    };
    let missing = post(None);
    assert_eq!(missing.status, 403);
    let wrong_service = post(Some(
        "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-west-2/sts/aws4_request, SignedHeaders=host, Signature=ab",
    ));
    assert_eq!(wrong_service.status, 403);
    let ok = post(Some(
        "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-west-2/eks-auth/aws4_request, SignedHeaders=host, Signature=ab",
    ));
    assert_eq!(ok.status, 200, "{}", ok.body_text());
    let json = ok.json().unwrap();
    assert!(
        json["credentials"]["expiration"].is_i64(),
        "expiration is epoch seconds as a JSON number"
    );

    fake.set_fault(Fault::Error(ApiError::Throttling), FaultTimes::Next(1));
    let throttled = post(Some(
        "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-west-2/eks-auth/aws4_request, SignedHeaders=host, Signature=ab",
    ));
    assert_eq!(throttled.status, 429);
    assert_eq!(
        throttled.header("x-amzn-errortype"),
        Some("ThrottlingException")
    );
    assert_eq!(throttled.json().unwrap()["__type"], "ThrottlingException");
}

#[tokio::test]
async fn the_rate_limit_throttles_past_its_bucket_as_the_real_service_does() {
    let fake = fake();
    fake.associate("shop", "web-sa", "web-role");
    let token = pod_token(&fake, TokenSpec::new("shop", "web-sa"));
    let client = client(&fake);
    // A bucket of 5, refilled at 2/s: 5 calls at once pass, the next ones are throttled.
    fake.set_rate_limit(Some((2.0, 5.0)));
    let mut throttled = 0;
    for _ in 0..8 {
        match call(&client, CLUSTER, &token).await {
            Ok(_) => {}
            Err(E::ThrottlingException(_)) => throttled += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(throttled, 3);
    assert_eq!(fake.throttled(), 3);
    assert_eq!(fake.calls(), 8);
    // It refills.
    std::thread::sleep(Duration::from_millis(600));
    assert!(call(&client, CLUSTER, &token).await.is_ok());
    fake.set_rate_limit(None);
    for _ in 0..10 {
        assert!(call(&client, CLUSTER, &token).await.is_ok());
    }
}
