//! The agent end to end: real SDKs in pods fetch credentials through the agent, which exchanges the pods'
//! tokens with the fake EKS Auth. Needs the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::net::SocketAddr;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, start_fake_eks_auth_in};
use e2e::cgroup::CgroupDriver;
use e2e::clients::RawRequest;
use e2e::node::{AGENT_V4, AGENT_V6, CREDENTIALS_URI_V4, CREDENTIALS_URI_V6, PodSpec, SimNode};

#[test]
fn pods_fetch_credentials_through_the_agent_with_real_sdks() {
    if !e2e::privileged("pods_fetch_credentials_through_the_agent_with_real_sdks") {
        return;
    }
    let node = SimNode::new().unwrap();
    let fake = start_fake_eks_auth_in(node.netns(), "e2e-cluster").unwrap();
    fake.associate("shop", "web-sa", "web-role");
    fake.associate("jobs", "batch-sa", "batch-role");
    let web = node
        .add_pod(PodSpec::new("web-0", "shop", "web-sa"))
        .unwrap();
    let batch = node
        .add_pod(PodSpec::new("batch-0", "jobs", "batch-sa").driver(CgroupDriver::Cgroupfs))
        .unwrap();
    web.refresh_token(&fake).unwrap();
    batch.refresh_token(&fake).unwrap();

    let agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();
    assert_eq!(agent.probe("/healthz").unwrap().status, 200);

    for uri in [CREDENTIALS_URI_V4, CREDENTIALS_URI_V6] {
        let creds = web.fetch_with_botocore(uri).unwrap().unwrap_or_else(|e| {
            panic!(
                "botocore via {uri}: {e}\n{}",
                agent.logs().unwrap_or_default()
            )
        });
        assert!(creds.access_key_id.starts_with("ASIA"));
        assert_eq!(creds.account_id.as_deref(), Some("111122223333"));
        let creds = batch.fetch_with_rust_sdk(uri).unwrap().unwrap_or_else(|e| {
            panic!(
                "rust sdk via {uri}: {e}\n{}",
                agent.logs().unwrap_or_default()
            )
        });
        assert!(creds.access_key_id.starts_with("ASIA"));
        assert!(creds.expiry.as_deref().is_some_and(|e| e.ends_with('Z')));
    }
    let issued = fake.issued();
    assert!(issued.iter().any(|c| c.service_account == "web-sa"));
    assert!(issued.iter().any(|c| c.service_account == "batch-sa"));

    let metrics = agent.metrics().unwrap();
    assert!(metrics.contains("pod_identity_http_response"), "{metrics}");

    let status = agent.stop().unwrap();
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
}

/// `YYYY-MM-DDTHH:MM:SSZ` for epoch seconds.
fn rfc3339(epoch: i64) -> String {
    aws_smithy_types::DateTime::from_secs(epoch)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap()
}

#[test]
fn sdks_get_exactly_the_credentials_the_fake_issued_over_v4_and_v6() {
    if !e2e::privileged("sdks_get_exactly_the_credentials_the_fake_issued_over_v4_and_v6") {
        return;
    }
    let (node, fake, [pod]) = node_with_web_pods("e2e-exact", ["web-0"]).unwrap();
    // Without binding, nothing vouches for a pod's new token but EKS Auth: each fresh token below
    // is its own upstream call (with it, the kernel would vouch and the cache would answer).
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args(["--token-binding", "off"]),
    )
    .unwrap();

    type Fetch = fn(&e2e::node::Pod, &str) -> anyhow::Result<e2e::clients::FetchOutcome>;
    let sdks: [(&str, Fetch); 2] = [
        ("botocore", |p, u| p.fetch_with_botocore(u)),
        ("rust-sdk", |p, u| p.fetch_with_rust_sdk(u)),
    ];
    for (sdk, fetch) in sdks {
        for uri in [CREDENTIALS_URI_V4, CREDENTIALS_URI_V6] {
            // A fresh token each time, so each fetch is answered by its own upstream call.
            let token = pod.refresh_token(&fake).unwrap();
            let creds = fetch(&pod, uri).unwrap().unwrap_or_else(|e| {
                panic!("{sdk} via {uri}: {e}\n{}", agent.logs().unwrap_or_default())
            });
            assert_eq!(
                fake.calls_for_token(&token),
                1,
                "{sdk} via {uri}: one upstream call for the token"
            );
            let issued = fake
                .issued()
                .into_iter()
                .find(|c| c.access_key_id == creds.access_key_id)
                .unwrap_or_else(|| {
                    panic!("{sdk} via {uri}: {creds:?} is not a key the fake issued")
                });
            let jti = e2e::fake_eks_auth::decode_unverified(&token).unwrap().jti;
            assert_eq!(
                issued.jti, jti,
                "{sdk} via {uri}: credentials of another token"
            );
            assert_eq!(
                creds.secret_access_key, issued.secret_access_key,
                "{sdk} via {uri}"
            );
            assert_eq!(creds.session_token, issued.session_token, "{sdk} via {uri}");
            assert_eq!(
                creds.account_id.as_deref(),
                Some(e2e::fake_eks_auth::ACCOUNT_ID),
                "{sdk} via {uri}: AccountId from the assumed-role ARN"
            );
            assert_eq!(
                creds.expiry.as_deref(),
                Some(rfc3339(issued.expiration).as_str()),
                "{sdk} via {uri}: expiry"
            );
        }
    }
}

#[test]
fn the_success_response_is_json_with_a_z_expiration_and_no_code() {
    if !e2e::privileged("the_success_response_is_json_with_a_z_expiration_and_no_code") {
        return;
    }
    let (node, fake, [pod]) = node_with_web_pods("e2e-shape", ["web-0"]).unwrap();
    let _agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();

    for (addr, host) in [
        (SocketAddr::from((AGENT_V4, 80)), "169.254.170.23"),
        (SocketAddr::from((AGENT_V6, 80)), "[fd00:ec2::23]"),
    ] {
        let token = pod.refresh_token(&fake).unwrap();
        let request = RawRequest::get("/v1/credentials")
            .host(host)
            .authorization(&token)
            .header("Accept", "application/json")
            .to_bytes();
        let r = pod
            .raw_http(addr, &request, Duration::from_secs(5))
            .unwrap();
        assert_eq!(r.status, 200, "{host}: {}", r.body_text());
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{host}: {:?}",
            r.headers
        );
        let body = r.json().unwrap();
        let object = body.as_object().expect("a JSON object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "AccessKeyId",
                "AccountId",
                "Expiration",
                "SecretAccessKey",
                "Token"
            ],
            "{host}: exactly the five members, no Code: {body}"
        );
        let issued = fake.issued().last().cloned().unwrap();
        assert_eq!(body["AccessKeyId"], issued.access_key_id.as_str());
        assert_eq!(body["SecretAccessKey"], issued.secret_access_key.as_str());
        assert_eq!(body["Token"], issued.session_token.as_str());
        assert_eq!(body["AccountId"], e2e::fake_eks_auth::ACCOUNT_ID);
        let expiration = body["Expiration"].as_str().unwrap();
        assert!(expiration.ends_with('Z'), "{host}: {expiration}");
        assert_eq!(expiration, rfc3339(issued.expiration), "{host}");
    }
}
