//! A simulated Kubernetes node: a node network namespace, pods joined to it by veth pairs, and pod cgroups
//! in the shapes kubelet creates.
//!
//! Addressing (all inside our own namespaces):
//! - pod `N`: `169.254.200.N/32` and `fd00:ec2:100::N/128` on its `eth0`;
//! - pod routes: `169.254.170.23/32 dev eth0`, `fd00:ec2::23/128 via fe80::1 dev eth0` (IPv6 neighbour
//!   discovery only answers for addresses of the receiving interface, so the node's veth end carries
//!   `fe80::1/64` as the gateway);
//! - node routes: `169.254.200.N/32` and `fd00:ec2:100::N/128` via `vethN`.
//!
//! The node's `pod-id-link0` and its `169.254.170.23` / `fd00:ec2::23` are *not* created here: the agent's
//! own `initialize` subcommand does that (see [`crate::agent`]).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::cgroup::{self, CgroupDriver, QosClass, TestCgroupRoot};
use crate::fake_eks_auth::{FakeEksAuth, TokenSpec};
use crate::netns::{NetNs, unique_name, veth_pair};

/// The IPv4 address pods use to reach the agent.
pub const AGENT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The IPv6 address pods use to reach the agent.
pub const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// The agent's credentials URI over IPv4.
pub const CREDENTIALS_URI_V4: &str = "http://169.254.170.23/v1/credentials";
/// The agent's credentials URI over IPv6.
pub const CREDENTIALS_URI_V6: &str = "http://[fd00:ec2::23]/v1/credentials";

/// Shared state of a node; pods hold it so the node outlives its pods.
#[derive(Debug)]
struct NodeInner {
    name: String,
    uid: String,
    netns: NetNs,
    cgroup_root: TestCgroupRoot,
    dir: PathBuf,
    next_index: AtomicU32,
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A simulated node: its network namespace (loopback up), a test cgroup root and a scratch directory.
///
/// Cheap to clone; everything is removed when the last clone and the last [`Pod`] are dropped.
#[derive(Debug, Clone)]
pub struct SimNode {
    inner: Arc<NodeInner>,
}

impl SimNode {
    /// Creates a node. Cleans up what crashed earlier runs left behind first.
    pub fn new() -> Result<Self> {
        crate::netns::cleanup_leftovers();
        let netns = NetNs::create()?;
        // The node forwards nothing, but it must not run DAD on the gateway address it gives each pod.
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        let cgroup_root = TestCgroupRoot::create()?;
        let dir = std::env::temp_dir().join(unique_name());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = format!("node-{}", netns.name());
        Ok(Self {
            inner: Arc::new(NodeInner {
                name,
                uid: uuid::Uuid::new_v4().to_string(),
                netns,
                cgroup_root,
                dir,
                next_index: AtomicU32::new(1),
            }),
        })
    }

    /// The node's Kubernetes name (used in token claims and `--node-name`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node's Kubernetes uid (used in token claims).
    #[must_use]
    pub fn uid(&self) -> &str {
        &self.inner.uid
    }

    /// The node's network namespace.
    #[must_use]
    pub fn netns(&self) -> &NetNs {
        &self.inner.netns
    }

    /// The node's test cgroup root (absolute path): pass it to the agent as `--cgroup-root`.
    #[must_use]
    pub fn cgroup_root(&self) -> &Path {
        self.inner.cgroup_root.path()
    }

    /// A scratch directory for this node's files (tokens, logs), removed with the node.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Adds a pod: its own network namespace joined to the node by a veth pair, and a kubelet-shaped cgroup.
    pub fn add_pod(&self, spec: PodSpec) -> Result<Pod> {
        let uid = spec
            .uid
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let container_id = random_container_id();
        let (pod_rel, container_rel) =
            cgroup::kubelet_paths(spec.driver, spec.qos, &uid, &container_id);
        self.attach(spec, uid, container_id, pod_rel, container_rel)
    }

    /// Adds a caller that is not a pod: a process in a pod-like network namespace but in a non-kubelet
    /// cgroup, `system.slice/<unit>.service` under the test root.
    pub fn add_non_pod_caller(&self, unit: &str) -> Result<Pod> {
        let rel = PathBuf::from(format!("system.slice/{unit}.service"));
        let spec = PodSpec::new(unit, "none", "none");
        let uid = uuid::Uuid::new_v4().to_string();
        self.attach(spec, uid, String::new(), rel.clone(), rel)
    }

    fn attach(
        &self,
        spec: PodSpec,
        uid: String,
        container_id: String,
        pod_rel: PathBuf,
        rel: PathBuf,
    ) -> Result<Pod> {
        let index = self.inner.next_index.fetch_add(1, Ordering::Relaxed);
        if index > 254 {
            bail!("a SimNode holds at most 254 pods");
        }
        let octet = u8::try_from(index).context("pod index")?;
        let ipv4 = Ipv4Addr::new(169, 254, 200, octet);
        let ipv6 = Ipv6Addr::new(0xfd00, 0xec2, 0x100, 0, 0, 0, 0, u16::from(octet));

        let netns = NetNs::create()?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        let node = &self.inner.netns;
        let node_if = format!("veth{index}");
        veth_pair(node, &node_if, &netns, "eth0")?;

        let (v4, v6) = (ipv4.to_string(), ipv6.to_string());
        netns.ip(&["addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&[
            "route",
            "add",
            "169.254.170.23/32",
            "dev",
            "eth0",
            "src",
            &v4,
        ])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "fd00:ec2::23/128",
            "via",
            "fe80::1",
            "dev",
            "eth0",
            "src",
            &v6,
        ])?;

        node.ip(&["addr", "add", "fe80::1/64", "dev", &node_if, "nodad"])?;
        node.ip(&["link", "set", &node_if, "up"])?;
        node.ip(&["route", "add", &format!("{v4}/32"), "dev", &node_if])?;
        node.ip(&["-6", "route", "add", &format!("{v6}/128"), "dev", &node_if])?;

        let root = self.cgroup_root();
        let cgroup = root.join(&rel);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let dir = self.inner.dir.join(format!("pod{index}-{}", spec.name));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

        Ok(Pod {
            name: spec.name,
            namespace: spec.namespace,
            service_account: spec.service_account,
            service_account_uid: uuid::Uuid::new_v4().to_string(),
            uid,
            container_id,
            driver: spec.driver,
            qos: spec.qos,
            index,
            ipv4,
            ipv6,
            pod_cgroup: root.join(pod_rel),
            cgroup,
            dir,
            netns,
            node: self.clone(),
        })
    }
}

/// What a test asks for when adding a pod.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Cgroup driver whose path shape to use.
    pub driver: CgroupDriver,
    /// QoS class (middle of the cgroup path).
    pub qos: QosClass,
    /// A fixed pod uid; a fresh uuid v4 when `None`.
    pub uid: Option<String>,
}

impl PodSpec {
    /// A burstable pod under the systemd driver.
    #[must_use]
    pub fn new(name: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            driver: CgroupDriver::Systemd,
            qos: QosClass::Burstable,
            uid: None,
        }
    }

    /// Uses the given cgroup driver.
    #[must_use]
    pub fn driver(mut self, driver: CgroupDriver) -> Self {
        self.driver = driver;
        self
    }

    /// Uses the given QoS class.
    #[must_use]
    pub fn qos(mut self, qos: QosClass) -> Self {
        self.qos = qos;
        self
    }
}

/// A pod (or a non-pod caller) on a [`SimNode`]. Dropping it kills its processes and removes its
/// cgroup, network namespace and files.
#[derive(Debug)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Service account uid (token claim).
    pub service_account_uid: String,
    /// Pod uid (uuid v4).
    pub uid: String,
    /// Container id (64 hex digits; empty for a non-pod caller).
    pub container_id: String,
    /// Cgroup driver of the path shape.
    pub driver: CgroupDriver,
    /// QoS class of the path shape.
    pub qos: QosClass,
    /// Index on the node (1..=254): the last byte of its addresses, the `N` of the node's `vethN`.
    pub index: u32,
    /// The pod's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// The pod's IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Absolute path of the pod-level cgroup directory.
    pub pod_cgroup: PathBuf,
    /// Absolute path of the container cgroup, where the pod's processes run.
    pub cgroup: PathBuf,
    dir: PathBuf,
    // Declared after `cgroup` so the cgroup is emptied (processes killed) before the namespace goes.
    netns: NetNs,
    node: SimNode,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = cgroup::remove_tree(&self.pod_cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pod {
    /// The pod's network namespace.
    #[must_use]
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// The node this pod runs on.
    #[must_use]
    pub fn node(&self) -> &SimNode {
        &self.node
    }

    /// The container cgroup as `/proc/<pid>/cgroup` shows it for the pod's processes.
    pub fn cgroup_v2_path(&self) -> Result<String> {
        let mount = cgroup::cgroup2_mount()?;
        let rel = self
            .cgroup
            .strip_prefix(&mount)
            .context("pod cgroup outside the cgroup2 mount")?;
        Ok(format!("/{}", rel.display()))
    }

    /// Where the pod's projected token lives (the `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`).
    #[must_use]
    pub fn token_path(&self) -> PathBuf {
        self.dir.join("eks-pod-identity-token")
    }

    /// Writes the token file exactly as kubelet does: the token's bytes, no trailing newline.
    pub fn write_token(&self, token: &str) -> Result<()> {
        // Write then rename, as kubelet's atomic writer does, so a concurrent reader never sees half a token.
        let tmp = self.dir.join(".token.tmp");
        std::fs::write(&tmp, token.as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.token_path()).context("renaming the token file into place")
    }

    /// A token spec with this pod's claims: namespace, service account, pod, and node.
    #[must_use]
    pub fn token_spec(&self) -> TokenSpec {
        let mut spec = TokenSpec::new(&self.namespace, &self.service_account)
            .pod(&self.name, &self.uid)
            .node(self.node.name(), self.node.uid());
        spec.service_account_uid
            .clone_from(&self.service_account_uid);
        spec
    }

    /// Mints a fresh valid token for this pod from `issuer` and writes it to the token file; returns it.
    pub fn refresh_token(&self, issuer: &FakeEksAuth) -> Result<String> {
        let token = issuer.issue_token(&self.token_spec())?;
        self.write_token(&token)?;
        Ok(token)
    }

    /// Runs the pod's later commands in another container of it: the container cgroup
    /// `container_id` names (made when new) beside the first, as the kubelet makes a sidecar's.
    /// An empty id runs them in the pod's own cgroup, in no container.
    pub fn enter_container(&mut self, container_id: &str) -> Result<()> {
        self.cgroup = if container_id.is_empty() {
            self.pod_cgroup.clone()
        } else {
            let (_, rel) = cgroup::kubelet_paths(self.driver, self.qos, &self.uid, container_id);
            let cgroup = self.node.cgroup_root().join(rel);
            std::fs::create_dir_all(&cgroup)
                .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
            cgroup
        };
        self.container_id = container_id.to_owned();
        Ok(())
    }

    /// Runs the pod's later commands in a cgroup `name` nested below the current one, as a
    /// process that can write its own cgroupfs can make (the container id stays the current one).
    pub fn enter_nested_cgroup(&mut self, name: &str) -> Result<()> {
        let cgroup = self.cgroup.join(name);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        self.cgroup = cgroup;
        Ok(())
    }

    /// The pod's scratch directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A command that runs `program` as this pod: it joins the container cgroup, then `ip netns exec`s into
    /// the pod's namespace (the pid survives the exec). Every `AWS_*` variable of the test process is removed.
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            // $0 is the cgroup, $1 the namespace, the rest the program and its arguments.
            .arg(r#"echo $$ > "$0/cgroup.procs" && ns="$1" && shift && exec ip netns exec "$ns" "$@""#)
            .arg(self.cgroup.as_os_str());
        cmd.arg(self.netns.name()).arg(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(key);
            }
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `program args` as this pod with extra environment variables, and waits for it.
    pub fn run(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let mut cmd = self.command(program);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output()
            .with_context(|| format!("running {program} as pod {}", self.name))
    }
}

fn random_container_id() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        use std::fmt::Write as _;
        let _ = write!(s, "{b:02x}");
        s
    })
}
