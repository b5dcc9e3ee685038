//! Self-test of the simulated node, without the agent: pods reach a server on the node's agent addresses
//! over IPv4 and IPv6, and their processes run in kubelet-shaped cgroups.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use e2e::cgroup::{CgroupDriver, QosClass};
use e2e::node::{AGENT_V4, AGENT_V6, PodSpec, SimNode};

const ECHO_PORT: u16 = 7777;

/// Stands in for `eks-pod-identity-agent initialize`, which this test does not run.
fn fake_initialize(node: &SimNode) {
    let ns = node.netns();
    ns.ip(&["link", "add", "pod-id-link0", "type", "ifb"])
        .expect("ifb link");
    ns.ip(&["addr", "add", "169.254.170.23/32", "dev", "pod-id-link0"])
        .expect("v4 address");
    ns.ip(&[
        "addr",
        "add",
        "fd00:ec2::23/128",
        "dev",
        "pod-id-link0",
        "nodad",
    ])
    .expect("v6 address");
    ns.ip(&["link", "set", "pod-id-link0", "up"])
        .expect("link up");
}

/// A line-echo server on `addr` inside the node, stopped when the returned guard drops.
struct EchoServer(Arc<AtomicBool>);

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn echo_server(node: &SimNode, addr: SocketAddr) -> EchoServer {
    let listener = node
        .netns()
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .expect("bind inside the node");
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    stream.set_nonblocking(false).unwrap();
                    let mut buf = [0u8; 1024];
                    let n = stream.read(&mut buf).unwrap_or(0);
                    let reply = format!("{peer} {}", String::from_utf8_lossy(&buf[..n]));
                    let _ = stream.write_all(reply.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    EchoServer(stop)
}

const ECHO_CLIENT: &str = r"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.create_connection((host, port), timeout=5)
s.sendall(b'ping')
print(s.recv(1024).decode())
";

#[test]
fn pods_reach_the_node_over_v4_and_v6_from_their_cgroups() {
    if !e2e::privileged("pods_reach_the_node_over_v4_and_v6_from_their_cgroups") {
        return;
    }
    let node = SimNode::new().unwrap();
    fake_initialize(&node);
    let _v4 = echo_server(&node, SocketAddr::from((AGENT_V4, ECHO_PORT)));
    let _v6 = echo_server(&node, SocketAddr::from((AGENT_V6, ECHO_PORT)));

    let a = node.add_pod(PodSpec::new("web", "shop", "web-sa")).unwrap();
    let b = node
        .add_pod(
            PodSpec::new("batch", "jobs", "batch-sa")
                .driver(CgroupDriver::Cgroupfs)
                .qos(QosClass::Guaranteed),
        )
        .unwrap();

    // Kubelet shapes.
    let root = node.cgroup_root();
    let a_uid = a.uid.replace('-', "_");
    assert_eq!(
        a.cgroup,
        root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{a_uid}.slice/cri-containerd-{}.scope",
            a.container_id
        ))
    );
    assert_eq!(
        b.cgroup,
        root.join(format!("kubepods/pod{}/{}", b.uid, b.container_id))
    );
    assert_eq!(a.container_id.len(), 64);
    assert!(a.cgroup.is_dir() && b.cgroup.is_dir());
    assert_eq!(uuid_version(&a.uid), Some('4'));

    for pod in [&a, &b] {
        for host in [AGENT_V4.to_string(), AGENT_V6.to_string()] {
            let out = pod
                .run(
                    "python3",
                    &["-c", ECHO_CLIENT, &host, &ECHO_PORT.to_string()],
                    &[],
                )
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{} -> {host}: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr)
            );
            // The server saw the pod's own address as the source.
            let expected = if host.contains(':') {
                format!("[{}]", pod.ipv6)
            } else {
                pod.ipv4.to_string()
            };
            assert!(
                stdout.starts_with(&expected),
                "{} -> {host}: echo {stdout:?}, expected {expected}",
                pod.name
            );
            assert!(stdout.trim_end().ends_with("ping"));
        }

        // The child's cgroup is the pod's container cgroup.
        let out = pod.run("cat", &["/proc/self/cgroup"], &[]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v2 = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line");
        assert_eq!(v2, pod.cgroup_v2_path().unwrap());

        // The setns-thread trick: the test process connects from inside the pod's namespace.
        let reply = pod
            .netns()
            .run(|| -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(
                    &SocketAddr::from((AGENT_V6, ECHO_PORT)),
                    Duration::from_secs(5),
                )?;
                s.write_all(b"hi")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })
            .unwrap()
            .unwrap();
        assert_eq!(reply, format!("[{}]:{} hi", pod.ipv6, reply_port(&reply)));
    }

    // AWS_* of the test process never leaks into a pod.
    let out = a
        .run("sh", &["-c", "env | grep ^AWS_ || true"], &[])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");

    // A caller that is not a pod.
    let other = node.add_non_pod_caller("foo").unwrap();
    assert_eq!(other.cgroup, root.join("system.slice/foo.service"));
    let out = other
        .run(
            "python3",
            &[
                "-c",
                ECHO_CLIENT,
                &AGENT_V4.to_string(),
                &ECHO_PORT.to_string(),
            ],
            &[],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Everything goes away.
    let (a_ns, a_cgroup) = (a.netns().path(), a.pod_cgroup.clone());
    drop(a);
    assert!(!a_ns.exists(), "pod netns left behind");
    assert!(!a_cgroup.exists(), "pod cgroup left behind");
    let (node_ns, root) = (node.netns().path(), root.to_path_buf());
    drop((b, other, _v4, _v6));
    drop(node);
    assert!(!node_ns.exists(), "node netns left behind");
    assert!(!Path::new(&root).exists(), "test cgroup root left behind");
}

#[test]
fn a_pod_s_long_running_process_is_killed_on_drop() {
    if !e2e::privileged("a_pod_s_long_running_process_is_killed_on_drop") {
        return;
    }
    let node = SimNode::new().unwrap();
    let pod = node
        .add_pod(PodSpec::new("sleeper", "default", "default"))
        .unwrap();
    let mut child = pod.command("sleep").arg("600").spawn().unwrap();
    // Wait for the child to have joined the cgroup.
    let procs = pod.cgroup.join("cgroup.procs");
    assert!(
        e2e::wait_for(Duration::from_secs(2), || {
            !std::fs::read_to_string(&procs).unwrap().trim().is_empty()
        }),
        "the pod's process never joined {}",
        procs.display()
    );
    let cgroup = pod.pod_cgroup.clone();
    drop(pod);
    assert!(!cgroup.exists());
    let status = child.wait().unwrap();
    assert!(!status.success(), "the pod's process was killed");
}

fn uuid_version(uid: &str) -> Option<char> {
    uid.split('-').nth(2)?.chars().next()
}

fn reply_port(reply: &str) -> &str {
    reply
        .split_once("]:")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("")
}

/// A stand-in for the agent's credentials endpoint: checks the raw token in `Authorization` and answers
/// with the container-credentials JSON every SDK accepts.
fn stub_credentials_server(node: &SimNode, addr: SocketAddr, token: String) -> EchoServer {
    let listener = node
        .netns()
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .expect("bind inside the node");
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let authorized = head.lines().any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.eq_ignore_ascii_case("authorization") && v.trim() == token
                })
            });
            let (status, body) = if authorized {
                (
                    "200 OK",
                    r#"{"AccessKeyId":"ASIASTUB","SecretAccessKey":"s","Token":"t","AccountId":"111122223333","Expiration":"2099-01-01T00:00:00Z"}"#,
                )
            } else {
                ("401 Unauthorized", "bad token")
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    EchoServer(stop)
}

#[test]
fn sdk_clients_fetch_as_a_pod_over_v4_and_v6() {
    if !e2e::privileged("sdk_clients_fetch_as_a_pod_over_v4_and_v6") {
        return;
    }
    let node = SimNode::new().unwrap();
    fake_initialize(&node);
    let pod = node.add_pod(PodSpec::new("web", "shop", "web-sa")).unwrap();
    let token = "header.payload.signature";
    pod.write_token(token).unwrap();
    assert_eq!(
        std::fs::read(pod.token_path()).unwrap(),
        token.as_bytes(),
        "no trailing newline"
    );
    let _v4 = stub_credentials_server(&node, SocketAddr::from((AGENT_V4, 80)), token.to_owned());
    let _v6 = stub_credentials_server(&node, SocketAddr::from((AGENT_V6, 80)), token.to_owned());

    for uri in [e2e::node::CREDENTIALS_URI_V4, e2e::node::CREDENTIALS_URI_V6] {
        let creds = pod
            .fetch_with_botocore(uri)
            .unwrap()
            .unwrap_or_else(|e| panic!("botocore {uri}: {e}"));
        assert_eq!(creds.access_key_id, "ASIASTUB");
        assert_eq!(creds.account_id.as_deref(), Some("111122223333"));
        assert_eq!(creds.expiry.as_deref(), Some("2099-01-01T00:00:00Z"));
        let creds = pod
            .fetch_with_rust_sdk(uri)
            .unwrap()
            .unwrap_or_else(|e| panic!("rust sdk {uri}: {e}"));
        assert_eq!(creds.access_key_id, "ASIASTUB");
        assert_eq!(creds.session_token, "t");
        assert_eq!(creds.account_id.as_deref(), Some("111122223333"));
        assert_eq!(creds.expiry.as_deref(), Some("2099-01-01T00:00:00Z"));
    }

    // A wrong token fails both clients, and the failure text comes back.
    pod.write_token("wrong").unwrap();
    for (sdk, outcome) in [
        (
            "rust sdk",
            pod.fetch_with_rust_sdk(e2e::node::CREDENTIALS_URI_V4),
        ),
        (
            "botocore",
            pod.fetch_with_botocore(e2e::node::CREDENTIALS_URI_V4),
        ),
    ] {
        let err = match outcome.unwrap() {
            Ok(creds) => panic!("{sdk} with a wrong token got {creds:?}"),
            Err(err) => err,
        };
        assert!(!err.stderr.is_empty(), "{sdk}: {err}");
    }

    // Raw HTTP from the pod's namespace (test process) and as the pod (child process).
    let request = e2e::clients::RawRequest::get("/v1/credentials")
        .host("169.254.170.23")
        .authorization(token)
        .to_bytes();
    let addr = SocketAddr::from((AGENT_V4, 80));
    let r = pod
        .raw_http(addr, &request, Duration::from_secs(5))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json().unwrap()["AccessKeyId"], "ASIASTUB");
    let r = pod
        .raw_http_as_pod(
            SocketAddr::from((AGENT_V6, 80)),
            &request,
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
}
