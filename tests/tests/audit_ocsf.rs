//! The audit log in OCSF (`--audit-format ocsf`) end to end: the real kernel attribution, the pod
//! view fed by the Kubernetes API stand-in, an allowed request and one refused under `enforce`
//! (another pod's token). Every line validates against the OCSF 1.5.0 schema that
//! ocsf-json-schema generates (tests/fixtures/ocsf_validate.py), and carries the caller's process,
//! container, pod, namespace, service account, the role, the access key id, the status and the
//! node; the process's `uid` is Tetragon's `exec_id` of the live caller, computed from its
//! /proc/<pid>/stat here. `audit who` reads the file. Also through stdout (`--audit-log -`).
//!
//! Needs root, cgroup v2, eBPF, python3 with ocsf-json-schema and jsonschema (`cargo xtask setup`),
//! and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use base64::Engine as _;
use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, read_audit_log};
use e2e::fake_kube_api::{self, FakeKubeApi, served_with_sidecar as served};
use e2e::node::{Pod, SimNode};
use serde_json::{Value, json};

/// One credential request from `pod` with the token in `token_file`; the process stays alive
/// (so that the agent, and this test, can read its /proc/<pid>/stat) until its stdin closes.
/// Prints `{"pid", "status", "body"}`.
const PY_ONE_REQUEST: &str = r"
import http.client, json, os, sys
conn = http.client.HTTPConnection('169.254.170.23', 80, timeout=5)
conn.request('GET', '/v1/credentials', headers={'Host': '169.254.170.23', 'Authorization': open(sys.argv[1]).read()})
r = conn.getresponse()
print(json.dumps({'pid': os.getpid(), 'status': r.status, 'body': r.read().decode()}), flush=True)
sys.stdin.read()
";

struct Caller {
    child: Child,
    pid: u32,
    status: u16,
    body: String,
}

fn request(pod: &Pod, token_file: &Path) -> Caller {
    let mut child = pod
        .command("python3")
        .args(["-c", PY_ONE_REQUEST])
        .arg(token_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let out: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("client said {line:?}: {e}"));
    Caller {
        child,
        pid: u32::try_from(out["pid"].as_u64().unwrap()).unwrap(),
        status: u16::try_from(out["status"].as_u64().unwrap()).unwrap(),
        body: out["body"].as_str().unwrap().to_owned(),
    }
}

impl Caller {
    /// Tetragon's `ktime` of this process as it reads it from /proc: `starttime` × 10⁷ ns.
    fn start_ns(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let (_, rest) = stat.rsplit_once(')').unwrap();
        let ticks: u64 = rest.split_whitespace().nth(19).unwrap().parse().unwrap();
        ticks * 10_000_000
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

/// Validates every line of `path` with the OCSF schema validator.
fn validate(path: &Path) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/ocsf_validate.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(path)
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    report
}

fn ocsf_args(node: &SimNode, api: &FakeKubeApi) -> AgentArgs {
    fake_kube_api::agent_args_with_view(node, api).args([
        "--audit-format",
        "ocsf",
        "--token-binding",
        "enforce",
    ])
}

fn wait_synced(agent: &AgentProcess) {
    fake_kube_api::wait_view_synced(agent, 1.0);
}

#[test]
fn ocsf_records_validate_and_name_the_caller_role_key_and_node() {
    if !e2e::privileged("ocsf_records_validate_and_name_the_caller_role_key_and_node") {
        return;
    }
    let (node, fake, [web, other]) = node_with_web_pods("e2e-ocsf", ["web-0", "web-1"]).unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_pod(served(&node, &web));
    api.add_pod(served(&node, &other));
    web.refresh_token(&fake).unwrap();
    let audit = node.dir().join("audit.log");
    let agent =
        AgentProcess::start(&node, &fake, ocsf_args(&node, &api).audit_log(&audit)).unwrap();
    wait_synced(&agent);

    let allowed = request(&web, &web.token_path());
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    let served: Value = serde_json::from_str(&allowed.body).unwrap();
    let key = served["AccessKeyId"].as_str().unwrap().to_owned();
    // web-1 presents web-0's token: refused under enforce.
    let refused = request(&other, &web.token_path());
    assert_eq!(refused.status, 403, "{}", refused.body);
    let mut records = Vec::new();
    assert!(
        e2e::wait_for(Duration::from_secs(10), || {
            records = read_audit_log(&audit).unwrap();
            records.len() >= 2
        }),
        "{records:?}"
    );
    let report = validate(&audit);
    assert!(report.contains("2 events valid, 0 invalid"), "{report}");

    let ok = &records[0];
    assert_eq!(ok["class_uid"], 3002, "{ok}");
    assert_eq!(ok["metadata"]["version"], "1.5.0");
    assert_eq!(ok["status_id"], 1);
    assert_eq!(ok["status_code"], "200");
    let process = &ok["actor"]["process"];
    assert_eq!(process["pid"], allowed.pid, "{ok}");
    assert_eq!(process["name"], "python3");
    let container = &process["container"];
    assert_eq!(container["uid"], web.container_id.as_str());
    assert_eq!(container["name"], "app");
    assert_eq!(container["pod_uuid"], web.uid.as_str());
    assert_eq!(
        container["tags"],
        json!([{"name": "k8s.namespace.name", "value": "shop"},
               {"name": "k8s.pod.name", "value": "web-0"}])
    );
    assert_eq!(
        ok["actor"]["user"]["uid"],
        "system:serviceaccount:shop:web-sa"
    );
    assert!(
        ok["user"]["uid"]
            .as_str()
            .is_some_and(|r| r.starts_with("arn:aws:iam::") && r.ends_with(":role/web-role")),
        "{ok}"
    );
    assert_eq!(ok["user"]["credential_uid"], key.as_str());
    assert_eq!(ok["session"]["credential_uid"], key.as_str());
    assert_eq!(ok["device"]["hostname"], node.name());
    assert_eq!(
        ok["metadata"]["tags"],
        json!([{"name": "k8s.cluster.name", "value": fake.cluster()}])
    );
    // Tetragon's exec_id of the live caller: base64("<node>:<ktime>:<pid>").
    let exec_id = format!("{}:{}:{}", node.name(), allowed.start_ns(), allowed.pid);
    assert_eq!(
        process["uid"],
        base64::engine::general_purpose::STANDARD.encode(exec_id),
        "{ok}"
    );

    let no = &records[1];
    assert_eq!(no["status_id"], 2, "{no}");
    assert_eq!(no["status_code"], "403");
    assert_eq!(no["actor"]["process"]["pid"], refused.pid);
    assert_eq!(
        no["actor"]["process"]["container"]["pod_uuid"],
        other.uid.as_str()
    );
    assert_eq!(
        no["actor"]["process"]["container"]["tags"][1]["value"],
        "web-1"
    );
    // No credentials for it: the token's claimed subject is the user.
    assert_eq!(no["user"]["uid"], "system:serviceaccount:shop:web-sa");
    assert!(no.get("session").is_none(), "{no}");
    let allowed_pid = allowed.pid;
    allowed.finish();
    refused.finish();

    // Never a secret key or a session token.
    let text = std::fs::read_to_string(&audit).unwrap();
    for issued in fake.issued() {
        assert!(!text.contains(&issued.secret_access_key));
        assert!(!text.contains(&issued.session_token));
    }

    // `audit who` reads the OCSF file and names the container.
    let found = e2e::agent::audit_who(&audit, &key).unwrap().remove(0);
    assert_eq!(found["container"], "app", "{found}");
    assert_eq!(found["pod_name"], "web-0");
    assert_eq!(found["pid"], allowed_pid);
}

#[test]
fn ocsf_records_go_to_stdout_with_audit_log_dash() {
    if !e2e::privileged("ocsf_records_go_to_stdout_with_audit_log_dash") {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-ocsf-out", ["web-0"]).unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_pod(served(&node, &web));
    web.refresh_token(&fake).unwrap();
    let agent = AgentProcess::start(&node, &fake, ocsf_args(&node, &api).audit_log("-")).unwrap();
    wait_synced(&agent);
    let caller = request(&web, &web.token_path());
    assert_eq!(caller.status, 200);
    caller.finish();
    // stdout and the agent's log share the captured output: the OCSF events are its lines with
    // a class_uid.
    let mut events = Vec::new();
    assert!(e2e::wait_for(Duration::from_secs(10), || {
        events = agent
            .logs()
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["class_uid"] == 3002)
            .collect();
        !events.is_empty()
    }));
    let file = node.dir().join("stdout-events.jsonl");
    let mut f = std::fs::File::create(&file).unwrap();
    for e in &events {
        writeln!(f, "{e}").unwrap();
    }
    drop(f);
    validate(&file);
    assert_eq!(events[0]["actor"]["process"]["container"]["name"], "app");
    drop(agent);
}
