//! Binding results, per-pod limits and the open-connection cap, without the kernel.

use super::*;
use crate::cgroup::{CgroupInfo, PodCgroup, Qos};
use crate::ebpf;
use crate::token::{KubernetesClaims, Named, NamedObject};

const POD: &str = "0b5e3c2a-1111-4222-8333-444455556666";

fn claims(pod_uid: Option<&str>, node: Option<&str>) -> Claims {
    Claims {
        exp: i64::MAX,
        kubernetes: Some(KubernetesClaims {
            namespace: Some("shop".into()),
            pod: pod_uid.map(|uid| NamedObject {
                name: Some("cart".into()),
                uid: Some(uid.into()),
            }),
            node: node.map(|n| Named {
                name: Some(n.into()),
            }),
            ..KubernetesClaims::default()
        }),
        ..Claims::default()
    }
}

fn caller(pod_uid: Option<&str>, recorded: bool) -> Caller {
    Caller {
        peer: "169.254.200.1:40000".parse().unwrap(),
        process: recorded.then(|| ebpf::Caller {
            cgroup_id: 7,
            pid: 100,
            tid: 100,
            uid: 0,
            comm: "python3".into(),
            netns_cookie: 1,
        }),
        cgroup: Some(Arc::new(CgroupInfo {
            id: 7,
            path: "/kubepods.slice/x".into(),
            pod: pod_uid.map(|uid| PodCgroup {
                pod_uid: Arc::from(uid),
                container_id: None,
                qos: Qos::Burstable,
            }),
        })),
    }
}

fn counter() -> IntCounter {
    IntCounter::new("refused", "refused").unwrap()
}

fn policy(binding: TokenBinding, node: Option<&str>) -> Attribution {
    let policy = Policy {
        binding,
        node_name: node.map(str::to_owned),
        ..Policy::off()
    };
    Attribution::new(None, None, policy, counter())
}

fn limited(per_second: u32, burst: u32, max_connections: u32) -> Attribution {
    let policy = Policy {
        binding: TokenBinding::Audit,
        pod_request: RateLimit { per_second, burst },
        pod_max_connections: max_connections,
        ..Policy::off()
    };
    Attribution::new(None, None, policy, counter())
}

#[test]
fn binding_results() {
    let a = policy(TokenBinding::Enforce, Some("node-a"));
    assert_eq!(
        a.bind(&claims(Some(POD), Some("node-a")), &caller(Some(POD), true)),
        Binding::Match
    );
    assert_eq!(
        a.bind(&claims(Some(POD), None), &caller(Some(POD), true)),
        Binding::Match
    );
    let other = a.bind(&claims(Some("other-pod"), None), &caller(Some(POD), true));
    assert!(
        matches!(&other, Binding::Mismatch(r) if r.contains("other-pod")),
        "{other:?}"
    );
    assert!(a.refusal(&other).is_some_and(|r| r.contains("other-pod")));
    let node = a.bind(&claims(Some(POD), Some("node-b")), &caller(Some(POD), true));
    assert!(
        matches!(&node, Binding::Mismatch(r) if r.contains("node-b")),
        "{node:?}"
    );
    assert!(matches!(
        a.bind(&claims(None, None), &caller(Some(POD), true)),
        Binding::Mismatch(_)
    ));
    let outside = a.bind(&claims(Some(POD), None), &caller(None, true));
    assert!(matches!(outside, Binding::Unattributed(_)));
    assert!(a.refusal(&outside).is_some());
    assert!(matches!(
        a.bind(&claims(Some(POD), None), &caller(Some(POD), false)),
        Binding::Unattributed(_)
    ));
    assert_eq!(a.refusal(&Binding::Match), None);
}

#[test]
fn audit_mode_records_but_never_refuses() {
    let a = policy(TokenBinding::Audit, None);
    let b = a.bind(&claims(Some("other"), None), &caller(Some(POD), true));
    assert_eq!(b.as_str(), "mismatch");
    assert_eq!(a.refusal(&b), None);
    let off = policy(TokenBinding::Off, None);
    assert_eq!(
        off.bind(&claims(Some("other"), None), &caller(Some(POD), true)),
        Binding::Off
    );
}

#[test]
fn pod_rate_is_per_pod_as_the_kernel_placed_it() {
    let a = limited(1, 2, 0);
    let me = caller(Some(POD), true);
    assert!(a.check_pod_rate(&me).is_ok());
    assert!(a.check_pod_rate(&me).is_ok());
    let wait = a.check_pod_rate(&me).unwrap_err();
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    let neighbour = caller(Some("another-pod"), true);
    assert!(a.check_pod_rate(&neighbour).is_ok());
    a.prune();
    assert!(a.check_pod_rate(&me).is_err(), "pruning keeps busy pods");
}

#[test]
fn callers_in_no_pod_share_one_allowance() {
    let a = limited(1, 2, 0);
    // Whatever pods their tokens name, and whether or not the kernel recorded them.
    let host = caller(None, true);
    let unrecorded = Caller::unattributed("169.254.200.9:1".parse().unwrap());
    assert_eq!(host.pod_key(), PodKey::Unplaced);
    assert!(a.check_pod_rate(&host).is_ok());
    assert!(a.check_pod_rate(&unrecorded).is_ok());
    assert!(a.check_pod_rate(&host).is_err());
    assert!(a.check_pod_rate(&unrecorded).is_err());
    assert!(a.check_pod_rate(&caller(Some(POD), true)).is_ok());
}

#[tokio::test]
async fn a_pod_holds_at_most_its_maximum_of_open_connections() {
    let a = limited(0, 0, 2);
    let slot = |pod: Option<&str>| {
        let key = caller(pod, true).pod_key();
        a.open
            .as_ref()
            .and_then(|open| OpenConnections::take(open, key))
    };
    let first = slot(Some(POD)).expect("first");
    let second = slot(Some(POD)).expect("second");
    assert!(slot(Some(POD)).is_none(), "a third is refused");
    assert!(
        slot(Some("another-pod")).is_some(),
        "another pod has its own"
    );
    let host = slot(None).expect("unplaced callers have one shared cap");
    drop(first);
    assert!(
        slot(Some(POD)).is_some(),
        "a closed connection frees its slot"
    );
    drop((second, host));
    let open = a.open.as_ref().unwrap().by_pod.lock().unwrap().len();
    assert_eq!(open, 0, "pods without connections are forgotten");

    // Through `admit`, with no kernel: every caller is unplaced, and the refusal is counted.
    let peer = "169.254.200.1:1".parse().unwrap();
    let local = "169.254.170.23:80".parse().unwrap();
    let kept = [
        a.attribute(peer, local).await,
        a.attribute(peer, local).await,
    ];
    assert!(kept.iter().all(Option::is_some));
    assert!(a.attribute(peer, local).await.is_none());
    assert_eq!(a.connections_refused.get(), 1);
}
