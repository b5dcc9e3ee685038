//! The startup taint end to end: the agent in a simulated node removes its taint from its own node
//! through a stand-in Kubernetes API only once `/readyz` is 200, keeps the other taints, retries a
//! conflict, serves credentials while the API is down and removes the taint once it is back; with
//! both Kubernetes features off it makes no API call. And, without root, the stand-in's JSON read
//! by k8s-openapi's types and the agent's own client.
//!
//! Privileged tests need root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::clients::{Family, RawRequest, http_get_in, raw_http};
use e2e::fake_eks_auth::FakeEksAuth;
use e2e::fake_kube_api::{self, FakeKubeApi, KubeFault, Op};
use e2e::node::{Pod, PodSpec, SimNode};
use k8s_openapi::api::core::v1::{Event, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use serde_json::{Value, json};

const KEY: &str = "eks-pod-identity-agent.amazonaws.com/agent-not-ready";
const PROBE_PORT: u16 = 2703;

/// The agent's arguments with a kubeconfig for `api` and this node's name in its environment.
fn kube_args(node: &SimNode, api: &FakeKubeApi) -> AgentArgs {
    AgentArgs {
        probe_port: PROBE_PORT,
        ..fake_kube_api::agent_args(node, api)
    }
}

fn keys(api: &FakeKubeApi, node: &SimNode) -> Vec<(String, String)> {
    api.taints(node.name())
}

fn carries_key(api: &FakeKubeApi, node: &SimNode) -> bool {
    keys(api, node).iter().any(|(k, _)| k == KEY)
}

fn fetch_ok(pod: &Pod, fake: &FakeEksAuth) -> u16 {
    pod.refresh_token(fake).unwrap();
    let r = pod
        .python_requests(Family::V4, &pod.token_path(), 1, false)
        .unwrap();
    r.exchanges[0].status.unwrap_or(0)
}

#[test]
fn the_taint_goes_only_once_ready_and_the_other_taints_stay() {
    if !e2e::privileged("the_taint_goes_only_once_ready_and_the_other_taints_stay") {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-taint", ["web"]).unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_node(
        node.name(),
        &[
            ("node.kubernetes.io/not-ready", "NoSchedule"),
            (KEY, "NoExecute"),
            ("ebs.csi.aws.com/agent-not-ready", "NoExecute"),
            (KEY, "NoSchedule"),
        ],
    );
    // At each API request, what the agent's /readyz says at that moment.
    let seen: Arc<Mutex<Vec<(Op, u16)>>> = Arc::default();
    {
        let (seen, node) = (seen.clone(), node.clone());
        api.on_request(move |req| {
            let probe = SocketAddr::from((Ipv4Addr::LOCALHOST, PROBE_PORT));
            let status = http_get_in(node.netns(), probe, "/readyz", Duration::from_secs(1))
                .map_or(0, |r| r.status);
            seen.lock().unwrap().push((req.op, status));
        });
    }
    let agent = AgentProcess::start(
        &node,
        &fake,
        kube_args(&node, &api).args(["--remove-startup-taint", "true"]),
    )
    .unwrap();
    assert!(
        e2e::wait_for(Duration::from_secs(10), || !carries_key(&api, &node)),
        "the taint is still there; log:\n{}",
        agent.logs().unwrap()
    );
    assert_eq!(
        keys(&api, &node),
        [
            ("node.kubernetes.io/not-ready".into(), "NoSchedule".into()),
            ("ebs.csi.aws.com/agent-not-ready".into(), "NoExecute".into()),
        ],
        "every effect of the key goes, the other taints stay in order"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|(_, readyz)| *readyz == 200),
        "an API call before /readyz was 200: {seen:?}"
    );

    let requests = api.requests();
    let ops: Vec<Op> = requests.iter().map(|r| r.op).collect();
    assert_eq!(ops, [Op::GetNode, Op::PatchNode], "{requests:?}");
    let patch = &requests[1];
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert!(
        patch
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer e2e-"))
    );
    assert_eq!(patch.status, 200);
    let body = patch.json();
    assert!(
        body.pointer("/metadata/resourceVersion")
            .is_some_and(Value::is_string),
        "a resourceVersion precondition: {body}"
    );
    assert_eq!(
        agent
            .metric(&format!(
                "pod_identity_startup_taint_removed{{key=\"{KEY}\"}}"
            ))
            .unwrap(),
        1.0
    );
    // Serving all along.
    assert_eq!(fetch_ok(&web, &fake), 200);
    // The node the agent patched, as a real client reads it.
    let node_object: Node = serde_json::from_value(api.node(node.name()).unwrap()).unwrap();
    assert_eq!(node_object.spec.unwrap().taints.unwrap().len(), 2);
}

#[test]
fn a_conflict_is_retried_and_keeps_the_concurrent_change() {
    if !e2e::privileged("a_conflict_is_retried_and_keeps_the_concurrent_change") {
        return;
    }
    let (node, fake, [_web]) = node_with_web_pods("e2e-taint-conflict", ["web"]).unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_node(node.name(), &[(KEY, "NoExecute")]);
    api.concurrent_writes(1);
    let agent = AgentProcess::start(
        &node,
        &fake,
        kube_args(&node, &api).args(["--remove-startup-taint"]),
    )
    .unwrap();
    // The fake records a call once it has answered it: the patch shows in the node a moment
    // before it shows among the requests.
    assert!(
        e2e::wait_for(Duration::from_secs(10), || !carries_key(&api, &node)
            && api.requests().len() >= 4),
        "log:\n{}",
        agent.logs().unwrap()
    );
    let answered: Vec<(Op, u16)> = api.requests().iter().map(|r| (r.op, r.status)).collect();
    assert_eq!(
        answered,
        [
            (Op::GetNode, 200),
            (Op::PatchNode, 409),
            (Op::GetNode, 200),
            (Op::PatchNode, 200)
        ]
    );
    assert_eq!(
        keys(&api, &node),
        [(
            "other.example.com/added-meanwhile".into(),
            "NoSchedule".into()
        )]
    );
    assert_eq!(
        agent
            .metric("pod_identity_kubernetes_api_errors_total{operation=\"patch_node\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn credentials_are_served_while_the_api_is_down_and_the_taint_goes_once_it_is_back() {
    if !e2e::privileged(
        "credentials_are_served_while_the_api_is_down_and_the_taint_goes_once_it_is_back",
    ) {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-taint-down", ["web"]).unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_node(node.name(), &[(KEY, "NoExecute")]);
    api.set_fault(None, KubeFault::Drop, None);
    let agent = AgentProcess::start(
        &node,
        &fake,
        kube_args(&node, &api).args(["--remove-startup-taint=true"]),
    )
    .unwrap();
    // Ready, and serving, although the API is unreachable.
    assert_eq!(fetch_ok(&web, &fake), 200);
    assert!(
        e2e::wait_for(Duration::from_secs(5), || {
            agent
                .metric("pod_identity_kubernetes_api_errors_total{operation=\"get_node\"}")
                .unwrap()
                >= 2.0
        }),
        "the agent retries: {:?}",
        api.requests().len()
    );
    assert!(carries_key(&api, &node));
    assert_eq!(
        agent
            .metric(&format!(
                "pod_identity_startup_taint_removed{{key=\"{KEY}\"}}"
            ))
            .unwrap(),
        0.0
    );
    assert_eq!(fetch_ok(&web, &fake), 200);

    api.clear_fault();
    assert!(
        e2e::wait_for(Duration::from_secs(30), || !carries_key(&api, &node)),
        "the taint stayed after the API came back; log:\n{}",
        agent.logs().unwrap()
    );
    // The log line follows the API's answer by a moment.
    assert!(
        e2e::wait_for(Duration::from_secs(5), || agent
            .logs()
            .unwrap()
            .contains("removed the startup taint")),
        "no log of the removal:\n{}",
        agent.logs().unwrap()
    );
}

#[test]
fn with_both_features_off_no_api_call_is_made() {
    if !e2e::privileged("with_both_features_off_no_api_call_is_made") {
        return;
    }
    let (node, fake, [a, b]) = node_with_web_pods("e2e-kube-off", ["web-a", "web-b"]).unwrap();
    let orphan = node
        .add_pod(PodSpec::new("orphan", "shop", "orphan-sa"))
        .unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_node(node.name(), &[(KEY, "NoExecute")]);
    // The kubeconfig is there, the switches are not.
    let agent = AgentProcess::start(&node, &fake, kube_args(&node, &api)).unwrap();
    assert_eq!(fetch_ok(&a, &fake), 200);
    // What would make Events: no association, a replayed token.
    orphan.refresh_token(&fake).unwrap();
    let r = orphan
        .python_requests(Family::V4, &orphan.token_path(), 3, false)
        .unwrap();
    assert!(r.exchanges.iter().all(|e| e.status == Some(404)), "{r:?}");
    b.python_requests(Family::V4, &a.token_path(), 1, false)
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(api.requests().is_empty(), "{:?}", api.requests());
    assert!(carries_key(&api, &node));
    let metrics = agent.metrics().unwrap();
    assert!(
        !metrics.contains("pod_identity_startup_taint_removed{")
            && !metrics.contains("pod_identity_kubernetes_api_errors_total{")
            && !metrics.contains("pod_identity_pod_events_total{"),
        "no series of the features: {metrics}"
    );
}

/// A request to the stand-in from this process (no root needed).
fn call(
    api: &FakeKubeApi,
    method: &str,
    path: &str,
    body: Option<(&str, &Value)>,
    token: &str,
) -> (u16, Value) {
    let mut req = RawRequest::get(path)
        .method(method)
        .host(&api.addr().to_string());
    if !token.is_empty() {
        req = req.header("Authorization", &format!("Bearer {token}"));
    }
    if let Some((content_type, body)) = body {
        req = req
            .header("Content-Type", content_type)
            .body(body.to_string().as_bytes());
    }
    let r = raw_http(api.addr(), &req.to_bytes(), Duration::from_secs(5)).unwrap();
    (r.status, r.json().unwrap_or(Value::Null))
}

#[test]
fn the_stand_in_speaks_what_k8s_openapi_and_the_agents_client_read() {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let token = "e2e-json-check";
    let api = FakeKubeApi::start(listener, token).unwrap();
    api.add_node("n1", &[(KEY, "NoExecute"), ("a/b", "NoSchedule")]);

    let (code, body) = call(&api, "GET", "/api/v1/nodes/n1", None, token);
    assert_eq!(code, 200);
    let node: Node = serde_json::from_value(body).unwrap();
    let rv = node.metadata.resource_version.clone().unwrap();
    assert_eq!(
        node.spec.as_ref().unwrap().taints.as_ref().unwrap().len(),
        2
    );
    assert!(node.status.unwrap().node_info.is_some());

    let (code, body) = call(&api, "GET", "/api/v1/nodes/n1", None, "wrong");
    assert_eq!(code, 401);
    let status: Status = serde_json::from_value(body).unwrap();
    assert_eq!(status.reason.as_deref(), Some("Unauthorized"));
    assert_eq!(call(&api, "GET", "/api/v1/nodes/n1", None, "").0, 401);
    let (code, body) = call(&api, "GET", "/api/v1/nodes/n2", None, token);
    assert_eq!(code, 404);
    assert_eq!(
        serde_json::from_value::<Status>(body).unwrap().code,
        Some(404)
    );

    let merge = "application/merge-patch+json";
    let stale = json!({"metadata": {"resourceVersion": "0"}, "spec": {"taints": []}});
    let (code, body) = call(
        &api,
        "PATCH",
        "/api/v1/nodes/n1",
        Some((merge, &stale)),
        token,
    );
    assert_eq!(code, 409);
    assert_eq!(
        serde_json::from_value::<Status>(body)
            .unwrap()
            .reason
            .as_deref(),
        Some("Conflict")
    );
    let patch = json!({"metadata": {"resourceVersion": rv}, "spec": {"taints": [{"key": "a/b", "effect": "NoSchedule"}]}});
    let (code, body) = call(
        &api,
        "PATCH",
        "/api/v1/nodes/n1",
        Some((merge, &patch)),
        token,
    );
    assert_eq!(code, 200);
    let patched: Node = serde_json::from_value(body).unwrap();
    assert_ne!(
        patched.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
    assert_eq!(patched.spec.unwrap().taints.unwrap().len(), 1);
    let json_patch = json!([{"op": "remove", "path": "/spec/taints/0"}]);
    assert_eq!(
        call(
            &api,
            "PATCH",
            "/api/v1/nodes/n1",
            Some(("application/json-patch+json", &json_patch)),
            token
        )
        .0,
        415
    );

    // An Event as k8s-openapi writes it.
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": "web.1", "namespace": "shop"},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": "web", "namespace": "shop", "uid": "u"},
        "reason": "R", "message": "m", "type": "Warning", "count": 1,
    }))
    .unwrap();
    let mut sent = serde_json::to_value(&event).unwrap();
    sent["apiVersion"] = json!("v1");
    sent["kind"] = json!("Event");
    let (code, body) = call(
        &api,
        "POST",
        "/api/v1/namespaces/shop/events",
        Some(("application/json", &sent)),
        token,
    );
    assert_eq!(code, 201);
    let created: Event = serde_json::from_value(body).unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(
        call(
            &api,
            "POST",
            "/api/v1/namespaces/shop/events",
            Some(("application/json", &sent)),
            token
        )
        .0,
        409
    );
    assert_eq!(
        call(
            &api,
            "POST",
            "/api/v1/namespaces/other/events",
            Some(("application/json", &sent)),
            token
        )
        .0,
        400
    );
    let smp = "application/strategic-merge-patch+json";
    let bump = json!({"count": 2, "lastTimestamp": "2026-11-25T12:00:00Z"});
    let (code, body) = call(
        &api,
        "PATCH",
        "/api/v1/namespaces/shop/events/web.1",
        Some((smp, &bump)),
        token,
    );
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_value::<Event>(body).unwrap().count,
        Some(2)
    );
    assert_eq!(
        call(
            &api,
            "PATCH",
            "/api/v1/namespaces/shop/events/gone",
            Some((smp, &bump)),
            token
        )
        .0,
        404
    );

    // The agent's own client and removal against it: what it sends, the stand-in accepts.
    let kubeconfig = std::env::temp_dir().join(format!("kubeconfig-{}", std::process::id()));
    api.write_kubeconfig(&kubeconfig).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        api.add_node("n3", &[("x/y", "NoSchedule"), (KEY, "NoExecute")]);
        api.concurrent_writes(1);
        let first = pod_identity_agent::kubernetes::taint::attempt(&client, "n3", KEY).await;
        assert!(
            matches!(
                first,
                Err(pod_identity_agent::kubernetes::taint::AttemptError::Conflict { .. })
            ),
            "{first:?}"
        );
        let second = pod_identity_agent::kubernetes::taint::attempt(&client, "n3", KEY).await;
        assert!(
            matches!(
                second,
                Ok(pod_identity_agent::kubernetes::taint::Outcome::Removed)
            ),
            "{second:?}"
        );
    });
    let _ = std::fs::remove_file(&kubeconfig);
    assert_eq!(
        api.taints("n3"),
        [
            ("x/y".into(), "NoSchedule".into()),
            (
                "other.example.com/added-meanwhile".into(),
                "NoSchedule".into()
            )
        ]
    );
    // Every Event the stand-in stored reads as a k8s-openapi Event.
    for e in api.events() {
        let _: Event = serde_json::from_value(e).unwrap();
    }
}

#[test]
fn the_charts_flags_switch_the_features_on() {
    use clap::Parser as _;
    let golden = e2e::workspace_root()
        .join("deploy/charts/eks-pod-identity-agent/tests/golden/kubernetes-api.yaml");
    let text = std::fs::read_to_string(golden).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    let daemonset = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .unwrap();
    let spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(spec["automountServiceAccountToken"].as_bool(), Some(true));
    let container = &spec["containers"][0];
    let argv: Vec<String> = ["command", "args"]
        .iter()
        .flat_map(|k| container[*k].as_vec().cloned().unwrap_or_default())
        .map(|y| y.as_str().unwrap().to_owned())
        .collect();
    let cli = pod_identity_agent::cli::Cli::try_parse_from(&argv).unwrap();
    let pod_identity_agent::cli::Command::Server(args) = cli.command else {
        panic!("{argv:?}")
    };
    let config = args.into_config();
    assert_eq!(config.kubernetes.startup_taint.as_deref(), Some(KEY));
    assert!(config.kubernetes.pod_events);
    assert!(
        spec["tolerations"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|t| t["key"].as_str() == Some(KEY) && t["operator"].as_str() == Some("Exists")),
        "the DaemonSet tolerates its startup taint"
    );
    // Least privilege: nodes get/patch, events create/patch and (the pod view, on by default)
    // pods get/list/watch, nothing else.
    let role = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("ClusterRole"))
        .unwrap();
    let rules: Vec<(String, Vec<String>)> = role["rules"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|r| {
            let strings = |y: &yaml_rust2::Yaml| -> Vec<String> {
                y.as_vec()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect()
            };
            assert_eq!(strings(&r["apiGroups"]), [""]);
            (strings(&r["resources"]).join(","), strings(&r["verbs"]))
        })
        .collect();
    assert_eq!(
        rules,
        [
            (
                "nodes".to_owned(),
                vec!["get".to_owned(), "patch".to_owned()]
            ),
            (
                "events".to_owned(),
                vec!["create".to_owned(), "patch".to_owned()]
            ),
            (
                "pods".to_owned(),
                vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()]
            ),
        ]
    );
}

/// The cost of the Kubernetes features, for the record (not a check): start-to-ready time, resident
/// memory after ready and after 2000 requests, and the latency of cached answers, for the modes in
/// `MEASURE_MODES` (`off,taint,events,both`; the default `off` also runs a binary without them, set
/// with `EKS_POD_IDENTITY_AGENT_BIN`), `MEASURE_RUNS` starts each (default 7). Prints medians.
///
/// `CI=true cargo test -p e2e --test startup_taint -- --ignored --nocapture measure`
#[test]
#[ignore = "a measurement, run by hand"]
fn measure_kubernetes_features_cost() {
    if !e2e::privileged("measure_kubernetes_features_cost") {
        return;
    }
    let modes = std::env::var("MEASURE_MODES").unwrap_or_else(|_| "off".into());
    let runs: usize = std::env::var("MEASURE_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for mode in modes.split(',') {
        let flags: &[&str] = match mode {
            "off" => &[],
            "taint" => &["--remove-startup-taint"],
            "events" => &["--pod-events"],
            _ => &["--remove-startup-taint", "--pod-events"],
        };
        let (mut ready_ms, mut rss_ready, mut rss_loaded, mut p50_us) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let (node, fake, [web]) = node_with_web_pods("e2e-measure", ["web"]).unwrap();
            let api = fake_kube_api::start_in(node.netns()).unwrap();
            api.add_node(node.name(), &[(KEY, "NoExecute")]);
            let args = kube_args(&node, &api)
                .args(flags.iter().copied())
                // 2000 requests in a row: past the node-wide default of 1000/s.
                .args(["--global-request-rate", "0"]);
            let (agent, ready) = AgentProcess::start_timed(&node, &fake, args).unwrap();
            ready_ms.push(ready.as_secs_f64() * 1e3);
            let pid = agent.pid().unwrap();
            let kind = std::env::var("MEASURE_RSS").unwrap_or_else(|_| "VmRSS".into());
            let rss = || -> f64 {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{kind}:")))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                    .unwrap()
                    / 1024.0
            };
            std::thread::sleep(Duration::from_millis(500));
            rss_ready.push(rss());
            let token = web.refresh_token(&fake).unwrap();
            let request = RawRequest::get("/v1/credentials")
                .host("169.254.170.23")
                .authorization(&token)
                .to_bytes();
            let addr = SocketAddr::from((e2e::node::AGENT_V4, 80));
            let mut latencies = web
                .netns()
                .run(|| {
                    (0..2000)
                        .map(|_| {
                            let t = std::time::Instant::now();
                            let r = raw_http(addr, &request, Duration::from_secs(2)).unwrap();
                            assert_eq!(r.status, 200);
                            t.elapsed().as_secs_f64() * 1e6
                        })
                        .collect::<Vec<f64>>()
                })
                .unwrap();
            latencies.sort_by(f64::total_cmp);
            p50_us.push(latencies[latencies.len() / 2]);
            rss_loaded.push(rss());
            drop(agent);
        }
        println!(
            "MEASURE mode={mode} runs={runs} start_to_ready_ms={:.1} rss_ready_mib={:.1} rss_after_2000_requests_mib={:.1} cached_p50_us={:.0} (all medians; ready {:?})",
            median(ready_ms.clone()),
            median(rss_ready),
            median(rss_loaded),
            median(p50_us),
            ready_ms
                .iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>(),
        );
    }
}
