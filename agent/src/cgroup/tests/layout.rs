//! Kubelet's layouts: pods and containers read from paths, and the directories whose children are
//! pods.

use std::path::{Path, PathBuf};

use super::{CID, OTHER, UID, UID_, parse, pod};
use crate::cgroup::{KubeletLayout, Qos, pod_parent_dirs};

#[test]
fn systemd_driver_containers() {
    let burstable = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
    );
    assert_eq!(parse(&burstable), pod(Qos::Burstable, Some(CID)));
    let besteffort = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"
    );
    assert_eq!(parse(&besteffort), pod(Qos::BestEffort, Some(CID)));
    let guaranteed = format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope");
    assert_eq!(parse(&guaranteed), pod(Qos::Guaranteed, Some(CID)));
}

#[test]
fn systemd_driver_pod_level_and_conmon_have_no_container() {
    let pod_level =
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
    assert_eq!(parse(&pod_level), pod(Qos::Burstable, None));
    let conmon = format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope");
    assert_eq!(parse(&conmon), pod(Qos::Guaranteed, None));
}

#[test]
fn cgroupfs_driver() {
    let burstable = format!("/kubepods/burstable/pod{UID}/{CID}");
    assert_eq!(parse(&burstable), pod(Qos::Burstable, Some(CID)));
    let besteffort = format!("/kubepods/besteffort/pod{UID}/{CID}");
    assert_eq!(parse(&besteffort), pod(Qos::BestEffort, Some(CID)));
    let guaranteed = format!("/kubepods/pod{UID}/{CID}");
    assert_eq!(parse(&guaranteed), pod(Qos::Guaranteed, Some(CID)));
    let crio = format!("/kubepods/pod{UID}/crio-{CID}");
    assert_eq!(parse(&crio), pod(Qos::Guaranteed, Some(CID)));
    let pod_level = format!("/kubepods/besteffort/pod{UID}");
    assert_eq!(parse(&pod_level), pod(Qos::BestEffort, None));
}

#[test]
fn static_pod_uids_are_hashes() {
    let path = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b3a7e1f4c2d9e8a6b5c4d3e2f1a0b9c.slice";
    let parsed = parse(path).map(|p| p.pod_uid);
    assert_eq!(parsed.as_deref(), Some("0b3a7e1f4c2d9e8a6b5c4d3e2f1a0b9c"));
}

#[test]
fn pods_are_only_at_the_top_of_the_attach_point() {
    let layout = KubeletLayout::new("/e2e-1-2", None);
    let systemd = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
    );
    let cgroupfs = format!("/kubepods/burstable/pod{UID}/{CID}");
    assert_eq!(
        layout.parse(&format!("/e2e-1-2{systemd}")),
        pod(Qos::BestEffort, Some(CID))
    );
    assert_eq!(
        layout.parse(&format!("/e2e-1-2{cgroupfs}")),
        pod(Qos::Burstable, Some(CID))
    );
    for path in [
        // Outside the attach point, or one level too deep, or a look-alike name.
        systemd.clone(),
        cgroupfs.clone(),
        format!("/e2e-1-2/pod-a{systemd}"),
        format!("/e2e-1-2/system.slice{cgroupfs}"),
        format!("/e2e-1-2x{cgroupfs}"),
        format!("/e2e-1-2/kubepodsx/burstable/pod{UID}/{CID}"),
        format!("/e2e-1-2/kubepods.slicex/kubepods-pod{UID_}.slice"),
    ] {
        assert_eq!(layout.parse(&path), None, "{path}");
    }
}

#[test]
fn kubelet_shaped_paths_in_a_delegated_user_subtree_are_no_pod() {
    let user = "/user.slice/user-1000.slice/user@1000.service/app.slice";
    for path in [
        format!("{user}/kubepods/burstable/pod{UID}/x"),
        format!("{user}/kubepods/pod{UID}/{CID}"),
        format!(
            "{user}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ),
        format!("{user}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice"),
    ] {
        assert_eq!(parse(&path), None, "{path}");
        let custom = KubeletLayout::new("/", Some(Path::new("/kubelet")));
        assert_eq!(custom.parse(&path), None, "{path}");
    }
}

#[test]
fn nested_cgroups_belong_to_their_container_whatever_their_names() {
    // Cgroups a container makes below its own, even kubelet-shaped ones naming another pod.
    for path in [
        format!("/kubepods/burstable/pod{UID}/{CID}/worker/deeper"),
        format!("/kubepods/burstable/pod{UID}/{CID}/kubepods/burstable/pod{OTHER}/x"),
        format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope/kubepods.slice/kubepods-pod{}.slice",
            OTHER.replace('-', "_")
        ),
        format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope/init"
        ),
    ] {
        assert_eq!(parse(&path), pod(Qos::Burstable, Some(CID)), "{path}");
    }
}

#[test]
fn a_kubelet_cgroup_root_adds_its_hierarchy() {
    let kind = format!(
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
    );
    let cgroupfs = format!("/kubelet/kubepods/pod{UID}/{CID}");
    assert_eq!(parse(&kind), None, "not without the flag");
    assert_eq!(parse(&cgroupfs), None, "not without the flag");
    for flag in ["/kubelet", "kubelet", "/kubelet/", "/kubelet.slice"] {
        let layout = KubeletLayout::new("/", Some(Path::new(flag)));
        assert_eq!(
            layout.parse(&kind),
            pod(Qos::Burstable, Some(CID)),
            "{flag}"
        );
        // The default hierarchy stays recognised.
        assert_eq!(
            layout.parse(&format!("/kubepods/pod{UID}/{CID}")),
            pod(Qos::Guaranteed, Some(CID))
        );
    }
    let layout = KubeletLayout::new("/", Some(Path::new("/kubelet")));
    assert_eq!(layout.parse(&cgroupfs), pod(Qos::Guaranteed, Some(CID)));
    // Two levels, with a dash systemd escapes.
    let layout = KubeletLayout::new("/", Some(Path::new("/a/b-c")));
    let nested =
        format!("/a.slice/a-b_c.slice/a-b_c-kubepods.slice/a-b_c-kubepods-pod{UID_}.slice");
    assert_eq!(layout.parse(&nested), pod(Qos::Guaranteed, None));
    assert_eq!(
        layout.parse(&format!("/a/b-c/kubepods/besteffort/pod{UID}")),
        pod(Qos::BestEffort, None)
    );
}

#[test]
fn non_pod_paths() {
    for path in [
        "/",
        "/system.slice/containerd.service",
        "/system.slice/kubelet.service",
        "/user.slice/user-1000.slice/session-3.scope",
        "/init.scope",
        "/kubepods.slice",
        "/kubepods.slice/kubepods-burstable.slice",
        "/kubepods/burstable",
        "/kubepods",
        "/kubepods.slice/kubepods-guaranteed.slice/kubepods-guaranteed-podabc.slice",
        "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod1234.slice",
    ] {
        assert_eq!(parse(path), None, "{path}");
    }
}

#[test]
fn pod_parents_deepest_first() {
    let layout = KubeletLayout::new("/e2e-1", None);
    let dirs = layout.pod_parent_dirs(Path::new("/sys/fs/cgroup"));
    let expected: Vec<PathBuf> = [
        "/sys/fs/cgroup/e2e-1/kubepods.slice/kubepods-burstable.slice",
        "/sys/fs/cgroup/e2e-1/kubepods.slice/kubepods-besteffort.slice",
        "/sys/fs/cgroup/e2e-1/kubepods/burstable",
        "/sys/fs/cgroup/e2e-1/kubepods/besteffort",
        "/sys/fs/cgroup/e2e-1/kubepods.slice",
        "/sys/fs/cgroup/e2e-1/kubepods",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(dirs, expected);
    let custom = KubeletLayout::new("/", Some(Path::new("/custom")));
    let dirs = pod_parent_dirs(&custom, Path::new("/sys/fs/cgroup"));
    assert_eq!(dirs.len(), 12);
    assert!(dirs.contains(&PathBuf::from(
        "/sys/fs/cgroup/custom.slice/custom-kubepods.slice/custom-kubepods-burstable.slice"
    )));
    assert_eq!(
        dirs.last(),
        Some(&PathBuf::from("/sys/fs/cgroup/custom/kubepods"))
    );
}
