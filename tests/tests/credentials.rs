//! The agent end to end: real SDKs in pods fetch credentials through the agent, which exchanges the pods'
//! tokens with the fake EKS Auth. Needs the agent binary (`cargo build -p eks-pod-identity-agent`).

use e2e::agent::{AgentArgs, AgentProcess, start_fake_eks_auth_in};
use e2e::cgroup::CgroupDriver;
use e2e::node::{CREDENTIALS_URI_V4, CREDENTIALS_URI_V6, PodSpec, SimNode};

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
