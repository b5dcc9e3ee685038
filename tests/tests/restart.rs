//! Zero-gap restarts: under `--token-binding enforce`, a pod asking for credentials in a loop while
//! the agent is stopped and started again, several times, never gets a 403. The agent binds, then
//! attaches its programs, then listens: while no agent listens the pod's connections are refused
//! (SDKs retry that), and every connection the agent accepts has its kernel record.
//!
//! Needs root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::process::Stdio;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use serde_json::Value;

const RESTARTS: usize = 4;

/// Asks for credentials in a loop (a new connection each time) until `stop_file` exists; counts
/// statuses and socket errors by kind.
const ASK_IN_A_LOOP: &str = r"
import http.client, json, os, sys, time
token_file, stop_file = sys.argv[1], sys.argv[2]
statuses, errors = {}, {}
while not os.path.exists(stop_file):
    try:
        token = open(token_file).read()
        conn = http.client.HTTPConnection('169.254.170.23', 80, timeout=3)
        conn.request('GET', '/v1/credentials',
                     headers={'Host': '169.254.170.23', 'Authorization': token, 'Connection': 'close'})
        r = conn.getresponse()
        body = r.read()
        conn.close()
        key = str(r.status)
        statuses[key] = statuses.get(key, 0) + 1
        if r.status != 200:
            errors['body ' + key] = body.decode('utf-8', 'replace')[:200]
    except (OSError, http.client.HTTPException) as e:
        kind = type(e).__name__
        errors[kind] = errors.get(kind, 0) + 1
        time.sleep(0.005)
print(json.dumps({'statuses': statuses, 'errors': errors}))
";

#[test]
fn restarts_under_enforce_refuse_no_request_with_403() {
    if !e2e::privileged("restarts_under_enforce_refuse_no_request_with_403") {
        return;
    }
    let (node, fake, [pod]) = node_with_web_pods("e2e-restart", ["steady-0"]).unwrap();
    pod.refresh_token(&fake).unwrap();
    // The loop asks faster than the node-wide limit allows; that limit is not what is tested here.
    let args =
        AgentArgs::default().args(["--token-binding", "enforce", "--global-request-rate", "0"]);
    let mut agent = AgentProcess::start(&node, &fake, args.clone()).unwrap();

    let stop_file = pod.dir().join("stop");
    let asker = pod
        .command("python3")
        .args(["-c", ASK_IN_A_LOOP])
        .arg(pod.token_path())
        .arg(&stop_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..RESTARTS {
        std::thread::sleep(Duration::from_millis(800));
        assert!(agent.stop().unwrap().success());
        std::thread::sleep(Duration::from_millis(100));
        agent = AgentProcess::start(&node, &fake, args.clone()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(800));
    std::fs::write(&stop_file, b"").unwrap();
    let out = asker.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{RESTARTS} restarts under enforce, one pod asking in a loop: {report}");

    let statuses = report["statuses"].as_object().unwrap();
    assert!(
        !statuses.contains_key("403"),
        "a restart refused a legitimate request with 403: {report}"
    );
    assert!(
        statuses.keys().all(|s| s == "200"),
        "only 200s or connection errors: {report}"
    );
    let served = statuses.get("200").and_then(Value::as_u64).unwrap_or(0);
    assert!(
        served >= 50,
        "the pod was served before, between and after restarts: {report}"
    );
    // The last agent serves (and attributes) as the first did.
    assert_eq!(
        agent
            .metric("pod_identity_binding_total{result=\"unattributed\"}")
            .unwrap(),
        0.0
    );
    assert!(
        agent
            .metric("pod_identity_binding_total{result=\"match\"}")
            .unwrap()
            >= 1.0
    );
}
