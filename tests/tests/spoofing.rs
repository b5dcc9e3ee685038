//! Pod identity that cannot be forged: a kubelet-shaped cgroup path made where kubelet does not put
//! pods names no pod. A node user in its delegated cgroup subtree, and a pod below its own
//! container cgroup, each build `…/kubepods/burstable/pod<victim uid>/x`, move into it and present
//! the victim's real token under `--token-binding enforce`: 403, and an audit record naming the
//! cgroup they really are in.
//!
//! Needs root, cgroup v2, eBPF, `setpriv` and `nsenter` (util-linux), and the agent binary.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, wait_audit_records};
use e2e::cgroup::{delegate, system_python};
use e2e::clients::Family;
use e2e::fake_eks_auth::decode_unverified;
use e2e::node::{PodSpec, SimNode};
use serde_json::Value;

const AUDIT_WAIT: Duration = Duration::from_secs(10);
/// The node user owning the delegated subtree (systemd's `user@1000.service`).
const USER: u32 = 1000;

/// Run by the caller itself: makes `leaf` (and its parents), moves itself into it, and asks for
/// credentials with the token in `token_file`. Prints what happened as JSON.
const SPOOF: &str = r"
import http.client, json, os, sys
leaf, token_file = sys.argv[1], sys.argv[2]
os.makedirs(leaf, exist_ok=True)
with open(os.path.join(leaf, 'cgroup.procs'), 'w') as f:
    f.write(str(os.getpid()))
cgroup = [l[3:] for l in open('/proc/self/cgroup').read().splitlines() if l.startswith('0::')][0]
token = open(token_file).read()
conn = http.client.HTTPConnection('169.254.170.23', 80, timeout=5)
conn.request('GET', '/v1/credentials', headers={'Host': '169.254.170.23', 'Authorization': token})
r = conn.getresponse()
print(json.dumps({'pid': os.getpid(), 'uid': os.getuid(), 'cgroup': cgroup, 'status': r.status,
                  'body': r.read().decode('utf-8', 'replace')}))
";

/// Runs [`SPOOF`] as `uid` in the network namespace `netns`: root first moves the shell into
/// `start` (where a delegated user's session would be), then drops to `uid`; the caller then makes
/// `leaf` below it and moves itself there.
fn spoof(netns: &str, start: &Path, uid: u32, leaf: &Path, token_file: &Path) -> Value {
    // `nsenter --net`, not `ip netns exec`: the latter remounts /sys and hides the cgroup2 mount.
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            r#"echo $$ > "$0/cgroup.procs" && exec nsenter --net=/run/netns/"$1" -- setpriv --reuid "$2" --regid "$2" --clear-groups -- "$3" -c "$4" "$5" "$6""#,
        )
        .arg(start)
        .arg(netns)
        .arg(uid.to_string())
        .arg(system_python())
        .arg(SPOOF)
        .arg(leaf)
        .arg(token_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the spoofing caller failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `user.slice/user-1000.slice/user@1000.service` under the node's cgroup root, delegated to the
/// user as systemd does it.
fn delegate_user_subtree(node: &SimNode) -> std::path::PathBuf {
    let dir = node
        .cgroup_root()
        .join(format!("user.slice/user-{USER}.slice/user@{USER}.service"));
    delegate(&dir, USER).unwrap();
    dir
}

#[test]
fn a_kubelet_shaped_cgroup_outside_kubelets_hierarchy_is_no_pod() {
    if !e2e::privileged("a_kubelet_shaped_cgroup_outside_kubelets_hierarchy_is_no_pod") {
        return;
    }
    let (node, fake, [victim, attacker]) =
        node_with_web_pods("e2e-spoofing", ["victim-0", "attacker-0"]).unwrap();
    let victim_token = victim.refresh_token(&fake).unwrap();
    let victim_jti = decode_unverified(&victim_token).unwrap().jti;
    // A stolen copy, readable by the node user.
    let stolen = node.dir().join("stolen-token");
    std::fs::write(&stolen, &victim_token).unwrap();
    std::fs::set_permissions(&stolen, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A network namespace with the agent's routes for the node user's process: a non-pod caller's.
    let host = node.add_non_pod_caller("user-session").unwrap();
    let delegated = delegate_user_subtree(&node);

    let audit = node.dir().join("audit.log");
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default()
            .audit_log(&audit)
            .args(["--token-binding", "enforce"]),
    )
    .unwrap();

    // The victim itself is served.
    let own = victim
        .python_requests(Family::V4, &victim.token_path(), 1, false)
        .unwrap();
    assert_eq!(own.exchanges[0].status, Some(200), "{own:?}");

    // 1. A node user, not root, in its delegated subtree.
    let shaped = format!("app.slice/kubepods/burstable/pod{}/x", victim.uid);
    let leaf = delegated.join(&shaped);
    let user = spoof(host.netns().name(), &delegated, USER, &leaf, &stolen);
    assert_eq!(user["uid"], USER, "{user}");
    let user_cgroup = format!(
        "/{}",
        leaf.strip_prefix(e2e::cgroup::cgroup2_mount().unwrap())
            .unwrap()
            .display()
    );
    assert_eq!(
        user["cgroup"],
        user_cgroup.as_str(),
        "it is in the path it made"
    );
    assert_eq!(user["status"], 403, "{user}");
    assert!(
        user["body"]
            .as_str()
            .is_some_and(|b| b.contains("token binding")),
        "{user}"
    );

    // 2. A process of another pod, in kubelet-shaped cgroups below its own container cgroup.
    let nested = attacker.cgroup.join(&shaped);
    let from_pod = spoof(
        attacker.netns().name(),
        &attacker.cgroup,
        0,
        &nested,
        &stolen,
    );
    assert_eq!(from_pod["status"], 403, "{from_pod}");

    assert_eq!(
        fake.calls_for_jti(&victim_jti),
        1,
        "EKS Auth was asked for the victim's token only by the victim"
    );
    let records = wait_audit_records(&audit, 3, AUDIT_WAIT).unwrap();
    let by_pid = |pid: &Value| {
        records
            .iter()
            .find(|r| r["caller"]["pid"] == *pid)
            .unwrap_or_else(|| panic!("no record for pid {pid}: {records:#?}"))
    };
    let r = by_pid(&user["pid"]);
    assert_eq!(r["http_status"], 403, "{r}");
    assert_eq!(r["outcome"], "denied", "{r}");
    assert_eq!(r["binding"], "unattributed", "{r}");
    assert_eq!(r["caller"]["cgroup_path"], user_cgroup.as_str(), "{r}");
    assert_eq!(r["caller"]["pod_uid"], Value::Null, "{r}");
    assert_eq!(r["token"]["pod_uid"], victim.uid.as_str(), "{r}");

    let r = by_pid(&from_pod["pid"]);
    assert_eq!(r["http_status"], 403, "{r}");
    assert_eq!(r["binding"], "mismatch", "{r}");
    assert_eq!(
        r["caller"]["pod_uid"],
        attacker.uid.as_str(),
        "a nested cgroup is its container's: {r}"
    );
    assert_eq!(
        r["caller"]["container_id"],
        attacker.container_id.as_str(),
        "{r}"
    );
    let attacker_cgroup = attacker.cgroup_v2_path().unwrap();
    assert_eq!(
        r["caller"]["cgroup_path"],
        format!("{attacker_cgroup}/{shaped}").as_str(),
        "{r}"
    );
    assert_eq!(
        agent
            .metric("pod_identity_binding_total{result=\"match\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn a_kubelet_cgroup_root_is_recognised_only_when_named() {
    if !e2e::privileged("a_kubelet_cgroup_root_is_recognised_only_when_named") {
        return;
    }
    // A pod where a kubelet run with `--cgroup-root /kubelet` (kind, some distributions) puts it.
    let (node, fake, [plain]) = node_with_web_pods("e2e-kubelet-root", ["plain-0"]).unwrap();
    let pod = node
        .add_pod(PodSpec::new("kind-0", "shop", "web-sa"))
        .unwrap();
    let token = pod.refresh_token(&fake).unwrap();
    plain.refresh_token(&fake).unwrap();
    let uid_ = pod.uid.replace('-', "_");
    let kind = node.cgroup_root().join(format!(
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{uid_}.slice/cri-containerd-{}.scope",
        pod.container_id
    ));
    let token_file = node.dir().join("kind-token");
    std::fs::write(&token_file, &token).unwrap();

    for (flag, status) in [(None, 403), (Some("/kubelet"), 200)] {
        let audit = node.dir().join(format!("audit-{}.log", flag.is_some()));
        let mut args = AgentArgs::default()
            .audit_log(&audit)
            .args(["--token-binding", "enforce"]);
        if let Some(flag) = flag {
            args = args.args(["--kubelet-cgroup-root", flag]);
        }
        let agent = AgentProcess::start(&node, &fake, args).unwrap();
        let got = spoof(
            pod.netns().name(),
            node.cgroup_root(),
            0,
            &kind,
            &token_file,
        );
        assert_eq!(
            got["status"], status,
            "--kubelet-cgroup-root {flag:?}: {got}"
        );
        let records = wait_audit_records(&audit, 1, AUDIT_WAIT).unwrap();
        let expected_pod = if status == 200 {
            Value::from(pod.uid.as_str())
        } else {
            Value::Null
        };
        assert_eq!(
            records[0]["caller"]["pod_uid"], expected_pod,
            "{}",
            records[0]
        );
        // The default hierarchy stays recognised.
        let plain_run = plain
            .python_requests(Family::V4, &plain.token_path(), 1, false)
            .unwrap();
        assert_eq!(plain_run.exchanges[0].status, Some(200), "{plain_run:?}");
        assert!(agent.stop().unwrap().success());
    }
}
