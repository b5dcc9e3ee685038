//! The node-wide limit, and a pod over its own limit sparing the node's allowance.

use super::*;

#[tokio::test]
async fn the_node_wide_limit_answers_429() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(
        &up,
        Attribution::off(),
        RateLimit {
            per_second: 1,
            burst: 2,
        },
    );
    let t = token(POD, "cart", "j1");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(fetch(&e, &t, &anonymous()).await.0);
    }
    assert_eq!(statuses, [200, 200, 429]);
}

#[tokio::test]
async fn a_pod_over_its_limit_does_not_spend_the_node_wide_allowance() {
    let up = Arc::new(Upstream::default());
    let per_pod = RateLimit {
        per_second: 1,
        burst: 2,
    };
    let node_wide = RateLimit {
        per_second: 1,
        burst: 4,
    };
    let e = endpoint(&up, policy(TokenBinding::Audit, per_pod), node_wide);
    let flooder = token(POD, "cart", "j1");
    let mut statuses = Vec::new();
    for _ in 0..50 {
        statuses.push(fetch(&e, &flooder, &Caller::in_test_pod(POD)).await.0);
    }
    assert_eq!(statuses[..3], [200, 200, 429]);
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2);
    // The node-wide bucket lost only the flooder's two: its neighbour is served, twice.
    let neighbour = "11111111-2222-4333-8444-555555555555";
    let t = token(neighbour, "cart", "j2");
    for _ in 0..2 {
        assert_eq!(fetch(&e, &t, &Caller::in_test_pod(neighbour)).await.0, 200);
    }
    // And the per-pod key is the kernel's pod: a token naming the neighbour changes nothing.
    assert_eq!(fetch(&e, &t, &Caller::in_test_pod(POD)).await.0, 429);
}
