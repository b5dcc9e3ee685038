//! EKS Auth's timeouts (issue 15, item 4): the original agent's budgets by default, so that a
//! region where EKS Auth answers in 600–900 ms is served, and flags to change them.

use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::node::CREDENTIALS_URI_V4;

/// What EKS Auth takes to answer: slower than the agent's old 400 ms attempt timeout, within the
/// original's 1 s.
const SLOW: Duration = Duration::from_millis(700);

#[test]
fn a_slow_eks_auth_still_serves_a_cold_request_with_the_default_timeouts() {
    if !e2e::privileged("a_slow_eks_auth_still_serves_a_cold_request_with_the_default_timeouts") {
        return;
    }
    let (node, fake, [web, batch]) =
        node_with_web_pods("e2e-slow-auth", ["web-0", "batch-0"]).unwrap();
    web.refresh_token(&fake).unwrap();
    batch.refresh_token(&fake).unwrap();
    fake.set_delay(SLOW);
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();

    // Cold: nothing cached, every answer from EKS Auth takes 700 ms.
    let creds = web
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("botocore: {e}\n{}", agent.logs().unwrap_or_default()));
    assert!(creds.access_key_id.starts_with("ASIA"));
    let creds = batch
        .fetch_with_rust_sdk(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("rust sdk: {e}\n{}", agent.logs().unwrap_or_default()));
    assert!(creds.access_key_id.starts_with("ASIA"));
    // One call per token: no attempt timed out and was tried again.
    assert_eq!(fake.calls(), 2, "{}", agent.logs().unwrap_or_default());
    assert_eq!(
        agent
            .metric(r#"pod_identity_http_response{code="200"}"#)
            .unwrap(),
        2.0
    );
    assert!(agent.stop().unwrap().success());
}

#[test]
fn the_eks_auth_timeouts_are_flags() {
    if !e2e::privileged("the_eks_auth_timeouts_are_flags") {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-auth-flags", ["web-0"]).unwrap();
    let token = web.refresh_token(&fake).unwrap();
    fake.set_delay(SLOW);
    // The old budgets, given as flags: every attempt times out before EKS Auth answers.
    let args = AgentArgs::default().args([
        "--eks-auth-connect-timeout",
        "300ms",
        "--eks-auth-attempt-timeout",
        "400ms",
        "--eks-auth-call-timeout",
        "900ms",
    ]);
    let agent = AgentProcess::start(&node, &fake, args).unwrap();
    let request = e2e::clients::RawRequest::get("/v1/credentials")
        .host("169.254.170.23")
        .authorization(&token)
        .to_bytes();
    let r = web
        .raw_http(
            std::net::SocketAddr::from((e2e::node::AGENT_V4, 80)),
            &request,
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(r.status, 504, "{}", r.body_text());
    assert!(
        fake.calls() >= 2,
        "the timed-out attempt is tried again within the call: {} calls",
        fake.calls()
    );
    assert!(agent.stop().unwrap().success());
}
