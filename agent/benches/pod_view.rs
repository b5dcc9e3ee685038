//! What the pod view costs each request (issue 18): finding the caller's pod by the UID the
//! kernel saw, placing its container under the pod's list of containers, and comparing the
//! token's claims with the pod, in a view of 110 pods (EKS's default max pods) and of 440 (the
//! view's bound, 4 × max pods), as `cargo xtask bench` reports in BENCHMARKS.md.

// A benchmark: a fixture that cannot be built is a broken checkout, and it says so.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use pod_identity_agent::attribution::Caller;
use pod_identity_agent::attribution::scope::Scope;
use pod_identity_agent::cgroup::{CgroupInfo, PodCgroup, Qos};
use pod_identity_agent::kubernetes::pod_view::{
    AllowedContainers, Container, PodInfo, PodView, ViewedPod,
};
use pod_identity_agent::token::{Claims, unsigned_token};
use serde_json::json;

fn uid(i: usize) -> String {
    format!("0b5e3c2a-1111-4222-8333-{i:012}")
}

fn container_id(pod: usize, c: usize) -> String {
    format!("{pod:032x}{c:032x}")
}

/// `n` pods of three containers each, listing `app` as the one allowed.
fn view(n: usize) -> PodView {
    let pods = (0..n)
        .map(|i| {
            let pod = PodInfo {
                namespace: "shop".into(),
                name: format!("cart-{i}").into(),
                service_account: "cart".into(),
                annotations: Vec::new(),
                containers: ["app", "istio-proxy", "log-shipper"]
                    .iter()
                    .enumerate()
                    .map(|(c, name)| Container {
                        id: container_id(i, c),
                        name: Arc::from(*name),
                    })
                    .collect(),
                allowed_containers: Some(AllowedContainers::parse("app")),
            };
            (Arc::from(uid(i)), Arc::new(pod))
        })
        .collect::<HashMap<_, _>>();
    PodView::with_pods(pods)
}

/// The app container of pod `i`, as the kernel and cgroup resolver hand it to a request.
fn caller(i: usize) -> Caller {
    let peer: SocketAddr = "169.254.200.1:40000".parse().unwrap();
    let mut caller = Caller::unattributed(peer);
    caller.cgroup = Some(Arc::new(CgroupInfo {
        id: 9,
        path: "/kubepods.slice/x".into(),
        pod: Some(PodCgroup {
            pod_uid: Arc::from(uid(i)),
            container_id: Some(container_id(i, 0)),
            qos: Qos::Burstable,
        }),
    }));
    caller
}

fn claims(i: usize) -> Claims {
    Claims::parse(&unsigned_token(&json!({
        "aud": ["pods.eks.amazonaws.com"], "exp": 4_000_000_000_i64, "iat": 1_765_000_000,
        "sub": "system:serviceaccount:shop:cart",
        "kubernetes.io": {"namespace": "shop", "pod": {"name": format!("cart-{i}"), "uid": uid(i)},
                          "serviceaccount": {"name": "cart", "uid": "s"}}
    })))
    .unwrap()
}

/// What a request does with the view: the lookup, the container's place, the comparison.
fn per_request(view: &PodView, caller: &Caller, claims: &Claims) -> bool {
    let uid = caller.pod_uid().unwrap();
    let pod = view.get(uid).unwrap();
    let scope = Scope::of(Some(&pod), caller);
    let viewed = ViewedPod::new(pod, uid, Some(claims));
    scope == Scope::Unscoped || viewed.token_matches == Some(false)
}

fn pod_view(c: &mut Criterion) {
    let mut group = c.benchmark_group("pod view");
    for pods in [110, 440] {
        let view = view(pods);
        let (caller, claims) = (caller(pods / 2), claims(pods / 2));
        group.bench_function(format!("lookup, scope and comparison, {pods} pods"), |b| {
            b.iter(|| per_request(&view, std::hint::black_box(&caller), &claims));
        });
    }
    group.finish();
}

criterion_group!(benches, pod_view);
criterion_main!(benches);
