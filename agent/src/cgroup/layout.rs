//! Where kubelet puts pods on this node, and the pod and container a cgroup path names: both
//! cgroup drivers, the default hierarchy and kubelet's `--cgroup-root`. Pure string work on paths;
//! calls nothing but the shared types in [`super`].

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{PodCgroup, Qos};

/// Where kubelet puts pods on this node: its `kubepods` directories, for both cgroup drivers.
///
/// - systemd driver: `<top>/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<runtime>-<id>.scope`,
///   Guaranteed pods as `<top>/kubepods.slice/kubepods-pod<uid_>.slice/...` (UID with `_` for `-`);
/// - cgroupfs driver: `<top>/kubepods/<qos>/pod<uid>/<id>`, Guaranteed pods as `<top>/kubepods/pod<uid>/<id>`;
///
/// where `<top>` is the attach point, or kubelet's `--cgroup-root` under it (`/custom`: systemd
/// `custom.slice/custom-kubepods.slice`, cgroupfs `custom/kubepods`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletLayout {
    dirs: Vec<KubepodsDir>,
}

/// One `kubepods` directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KubepodsDir {
    /// Relative to the cgroup2 mount, with a leading slash (`/kubepods.slice`, `/custom/kubepods`).
    path: String,
    /// systemd driver: the name every slice below starts with (`kubepods`, `custom-kubepods`);
    /// `None` for cgroupfs.
    systemd_prefix: Option<String>,
}

impl KubeletLayout {
    /// The layout under `attach_root` (the attach point, relative to the cgroup2 mount: `/` for
    /// the mount root), with kubelet's `--cgroup-root` relative to it when kubelet uses one:
    /// `/custom` (as kubelet takes it, for either driver) or `/custom.slice` (systemd's form).
    #[must_use]
    pub fn new(attach_root: &str, kubelet_cgroup_root: Option<&Path>) -> Self {
        let top = attach_root.trim_end_matches('/');
        let mut dirs = vec![
            KubepodsDir {
                path: format!("{top}/kubepods.slice"),
                systemd_prefix: Some("kubepods".into()),
            },
            KubepodsDir {
                path: format!("{top}/kubepods"),
                systemd_prefix: None,
            },
        ];
        let names: Vec<String> = kubelet_cgroup_root
            .into_iter()
            .flat_map(Path::components)
            .filter_map(|c| match c {
                std::path::Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        if names.iter().all(|n| n.ends_with(".slice")) {
            // systemd's own form, e.g. `/kubelet.slice`: the kubepods slice is `<last>-kubepods.slice`.
            if let Some(last) = names.last().and_then(|n| n.strip_suffix(".slice")) {
                dirs.push(KubepodsDir {
                    path: format!("{top}/{}/{last}-kubepods.slice", names.join("/")),
                    systemd_prefix: Some(format!("{last}-kubepods")),
                });
            }
        } else {
            // Kubelet's form, e.g. `/custom`: a slice per level, each named after all the levels
            // above it (systemd escapes `-` in a level's name as `_`), as kubelet converts it.
            let mut slices = Vec::new();
            let mut joined = String::new();
            for name in &names {
                if !joined.is_empty() {
                    joined.push('-');
                }
                joined.push_str(&name.replace('-', "_"));
                slices.push(format!("{joined}.slice"));
            }
            dirs.push(KubepodsDir {
                path: format!("{top}/{}/{joined}-kubepods.slice", slices.join("/")),
                systemd_prefix: Some(format!("{joined}-kubepods")),
            });
            dirs.push(KubepodsDir {
                path: format!("{top}/{}/kubepods", names.join("/")),
                systemd_prefix: None,
            });
        }
        KubeletLayout { dirs }
    }

    /// The pod and container of a cgroup path (relative to the cgroup2 mount), if it lies in one
    /// of kubelet's `kubepods` hierarchies.
    #[must_use]
    pub fn parse(&self, path: &str) -> Option<PodCgroup> {
        self.dirs.iter().find_map(|dir| {
            let rest = path.strip_prefix(dir.path.as_str())?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
            match &dir.systemd_prefix {
                Some(prefix) => parse_systemd(prefix, &parts),
                None => parse_cgroupfs(&parts),
            }
        })
    }

    /// The directories whose children are pods, absolute under `mount_root`, deepest first: the
    /// burstable and besteffort `QoS` directories of each `kubepods` hierarchy, then the
    /// `kubepods` directories themselves (whose children are Guaranteed pods, and the two `QoS`
    /// directories, which the kernel matches first). Whether each exists is not checked.
    #[must_use]
    pub fn pod_parent_dirs(&self, mount_root: &Path) -> Vec<PathBuf> {
        let qos_dirs = self.dirs.iter().flat_map(|dir| {
            ["burstable", "besteffort"].map(|qos| match &dir.systemd_prefix {
                Some(prefix) => format!("{}/{prefix}-{qos}.slice", dir.path),
                None => format!("{}/{qos}", dir.path),
            })
        });
        let kubepods = self.dirs.iter().map(|dir| dir.path.clone());
        qos_dirs
            .chain(kubepods)
            .map(|rel| mount_root.join(rel.trim_start_matches('/')))
            .collect()
    }
}

/// [`KubeletLayout::pod_parent_dirs`]: what the kernel side charges per pod.
#[must_use]
pub fn pod_parent_dirs(layout: &KubeletLayout, mount_root: &Path) -> Vec<PathBuf> {
    layout.pod_parent_dirs(mount_root)
}

/// `parts` follow `<prefix>.slice`; every slice below repeats its parent's name as a prefix.
fn parse_systemd(prefix: &str, parts: &[&str]) -> Option<PodCgroup> {
    let slice = |name: &str| -> Option<String> {
        Some(
            name.strip_prefix(prefix)?
                .strip_prefix('-')?
                .strip_suffix(".slice")?
                .to_owned(),
        )
    };
    let first = slice(parts.first()?)?;
    let (qos, pod, container) = match first.strip_prefix("pod") {
        Some(uid) => (Qos::Guaranteed, uid.to_owned(), parts.get(1)),
        None => {
            let qos = qos_named(&first)?;
            let pod = slice(parts.get(1)?)?;
            let uid = pod.strip_prefix(&first)?.strip_prefix("-pod")?.to_owned();
            (qos, uid, parts.get(2))
        }
    };
    let pod_uid = pod_uid(&pod.replace('_', "-"))?;
    let container_id = container
        .and_then(|c| c.strip_suffix(".scope"))
        .and_then(container_id);
    Some(PodCgroup {
        pod_uid,
        container_id,
        qos,
    })
}

/// `parts` follow `kubepods`.
fn parse_cgroupfs(parts: &[&str]) -> Option<PodCgroup> {
    let first = parts.first()?;
    let (qos, pod, container) = match first.strip_prefix("pod") {
        Some(uid) => (Qos::Guaranteed, uid, parts.get(1)),
        None => (
            qos_named(first)?,
            parts.get(1)?.strip_prefix("pod")?,
            parts.get(2),
        ),
    };
    Some(PodCgroup {
        pod_uid: pod_uid(pod)?,
        container_id: container.and_then(|c| container_id(c)),
        qos,
    })
}

fn qos_named(name: &str) -> Option<Qos> {
    match name {
        "burstable" => Some(Qos::Burstable),
        "besteffort" => Some(Qos::BestEffort),
        _ => None,
    }
}

/// A pod UID as kubelet writes it: a UUID, or a 32-hex hash for static pods.
fn pod_uid(uid: &str) -> Option<Arc<str>> {
    let ok = !uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then(|| Arc::from(uid))
}

/// `<runtime>-<id>` (systemd scope name without `.scope`, or cgroupfs with CRI-O) or a bare id.
fn container_id(name: &str) -> Option<String> {
    // CRI-O's monitor process lives beside the container, in no container.
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let id = ["cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|runtime| name.strip_prefix(runtime))
        .unwrap_or(name);
    let ok = !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit());
    ok.then(|| id.to_owned())
}
