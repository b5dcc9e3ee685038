//! The cgroup module's tests, by part: [`layout`] (kubelet's hierarchies parsed, for both drivers
//! and `--cgroup-root`) and [`resolver`] (over a temporary tree, the real cgroup2 mount and a
//! gated fake tree). This file holds the pod and container they share.

mod layout;
mod resolver;

use std::sync::Arc;

use super::{KubeletLayout, PodCgroup, Qos};

const UID: &str = "6f8e4c2a-1b3d-4e5f-9a7b-0c1d2e3f4a5b";
const UID_: &str = "6f8e4c2a_1b3d_4e5f_9a7b_0c1d2e3f4a5b";
const OTHER: &str = "11111111-2222-4333-8444-555555555555";
const CID: &str = "3f2b8c1d9e0a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";

fn pod(qos: Qos, container: Option<&str>) -> Option<PodCgroup> {
    Some(PodCgroup {
        pod_uid: Arc::from(UID),
        container_id: container.map(str::to_owned),
        qos,
    })
}

/// Kubelet's hierarchy at the top of the cgroup2 mount, as on a production node.
fn parse(path: &str) -> Option<PodCgroup> {
    KubeletLayout::new("/", None).parse(path)
}
