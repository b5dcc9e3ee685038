//! The cgroup path parser: `KubeletLayout::new` and `KubeletLayout::parse`.
//!
//! Input: the attach point (relative to the cgroup2 mount), a newline, kubelet's `--cgroup-root`
//! (empty: none), a newline, the cgroup path; then, optionally, a newline and a suffix.
//!
//! Checked, for the layout the input names and for the default one: nothing panics; a pod's UID
//! and a container's id are what kubelet and the runtimes write (hex and dashes; hex), and the UID
//! is in the path; the `QoS` class is named in the path; cgroups nested below a container's
//! belong to that container whatever their names; and below the pod's own cgroup, the pod stays
//! the same.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pod_identity_agent::cgroup::{KubeletLayout, PodCgroup, Qos};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.splitn(4, '\n');
    let (Some(attach), Some(kubelet_root), Some(path)) = (lines.next(), lines.next(), lines.next())
    else {
        return;
    };
    let suffix = lines.next().unwrap_or("x");
    let kubelet_root = (!kubelet_root.is_empty()).then(|| Path::new(kubelet_root));
    let layouts = [
        KubeletLayout::new(attach, kubelet_root),
        KubeletLayout::new("/", None),
    ];
    for layout in &layouts {
        let _ = layout.pod_parent_dirs(Path::new("/sys/fs/cgroup"));
        let Some(pod) = layout.parse(path) else {
            continue;
        };
        check_pod(path, &pod);
        let nested = layout.parse(&format!("{path}/{suffix}"));
        if pod.container_id.is_some() {
            assert_eq!(nested.as_ref(), Some(&pod), "{path:?} then {suffix:?}");
        } else if let Some(nested) = &nested {
            assert_eq!(
                (&nested.pod_uid, nested.qos),
                (&pod.pod_uid, pod.qos),
                "{path:?} then {suffix:?}"
            );
        }
    }
});

fn check_pod(path: &str, pod: &PodCgroup) {
    let uid = &*pod.pod_uid;
    assert!(
        !uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
        "pod UID {uid:?} from {path:?}"
    );
    // systemd's slices write the UID with `_` for `-`.
    assert!(
        path.replace('_', "-").contains(uid),
        "pod UID {uid:?} is not in {path:?}"
    );
    if let Some(id) = &pod.container_id {
        assert!(
            !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()),
            "container id {id:?} from {path:?}"
        );
        assert!(path.contains(id.as_str()), "{id:?} is not in {path:?}");
    }
    let qos = match pod.qos {
        Qos::Burstable => Some("burstable"),
        Qos::BestEffort => Some("besteffort"),
        Qos::Guaranteed => None,
    };
    if let Some(qos) = qos {
        assert!(path.contains(qos), "{qos} is not in {path:?}");
    }
}
