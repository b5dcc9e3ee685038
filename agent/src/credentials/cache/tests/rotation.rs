//! A pod's rotated tokens: the older token's renewals stopped, adoption vouched for by the kernel
//! or by a signature.

use super::*;

/// The start of the rotation tests: a cache (no renewal jitter) holding the credentials of pod
/// `p1`'s service account `cart` for token `old`, issued ten minutes before `now`.
async fn pod_with_an_old_token() -> (Arc<Upstream>, CredentialCache<Arc<Upstream>>, i64, Served) {
    let clock = Clock::tokio(SystemTime::now());
    let up = Upstream::new(clock, Duration::from_secs(3600));
    let mut cfg = config(10);
    cfg.renewal_jitter = Duration::ZERO;
    let cache = cache(&up, cfg, None);
    let now = clock.unix_now();
    let old = get(&cache, "old", || pod_token("p1", "cart", now - 600))
        .await
        .unwrap();
    (up, cache, now, old)
}

#[tokio::test(start_paused = true)]
async fn a_newer_verified_token_of_the_pod_stops_the_older_ones_renewals_not_their_service() {
    let (up, cache, now, old) = pod_with_an_old_token().await;
    let new = get(&cache, "new", || pod_token("p1", "cart", now))
        .await
        .unwrap();
    // Another pod, and another service account of the same pod, are not affected.
    get(&cache, "other-pod", || pod_token("p2", "cart", now - 600))
        .await
        .unwrap();
    get(&cache, "other-sa", || pod_token("p1", "admin", now - 600))
        .await
        .unwrap();
    assert!(old.entry.as_ref().unwrap().is_superseded());
    assert!(!new.entry.as_ref().unwrap().is_superseded());
    // A token of the pod older than the newest, fetched later, is superseded at once.
    let older = get(&cache, "older", || pod_token("p1", "cart", now - 1200))
        .await
        .unwrap();
    assert!(older.entry.as_ref().unwrap().is_superseded());
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(up.calls_for("old"), 1, "the older token was renewed");
    assert_eq!(up.calls_for("older"), 1, "the oldest token was renewed");
    assert_eq!(up.calls_for("new"), 2);
    assert_eq!(up.calls_for("other-pod"), 2);
    assert_eq!(up.calls_for("other-sa"), 2);
    // Still served while its credentials last.
    assert_eq!(key_id(&cache, "old").await.1, Lookup::Hit);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_token_the_kernel_vouches_for_is_adopted_unverified_and_verified_when_it_renews()
{
    let (up, cache, now, old) = pod_with_an_old_token().await;
    let served = cache
        .adopt_rotated("new", pod_token("p1", "cart", now), Proof::empty())
        .await
        .unwrap();
    assert_eq!(up.calls(), 1, "no call for the rotated token");
    assert_eq!(
        served.issued.credentials.access_key_id,
        old.issued.credentials.access_key_id
    );
    let alias = served.entry.unwrap();
    assert!(!alias.is_verified());
    let old = old.entry.unwrap();
    assert!(
        !old.is_superseded(),
        "an unverified token supersedes nothing"
    );
    assert_eq!(key_id(&cache, "new").await, ("ASIA1".into(), Lookup::Hit));
    assert_eq!(up.calls(), 1);
    // When due (the 30 min retention), the new token renews with EKS Auth: now verified, it
    // supersedes the old token's entry, which renewed once too.
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(up.calls_for("new"), 1);
    assert!(alias.is_verified());
    assert_eq!(alias.proof(), Proof::EKS_AUTH);
    assert!(old.is_superseded());
    assert_ne!(key_id(&cache, "new").await.0, "ASIA1");
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(
        up.calls_for("old"),
        2,
        "no renewal of the old token once superseded"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rotated_token_verified_by_signature_is_adopted_with_no_call_and_renewed_with_itself() {
    let (up, cache, now, old) = pod_with_an_old_token().await;
    // Nothing cached for another pod or another service account of the pod.
    for (token, claims) in [
        ("x", pod_token("p2", "cart", now)),
        ("y", pod_token("p1", "admin", now)),
    ] {
        assert!(
            cache
                .adopt_rotated(token, claims, Proof::SIGNATURE)
                .await
                .is_none()
        );
    }
    let served = cache
        .adopt_rotated("new", pod_token("p1", "cart", now), Proof::SIGNATURE)
        .await
        .unwrap();
    assert_eq!(up.calls(), 1, "no call for the rotated token");
    assert_eq!(served.lookup, Lookup::Hit);
    assert_eq!(
        served.issued.credentials.access_key_id,
        old.issued.credentials.access_key_id
    );
    let adopted = served.entry.unwrap();
    assert_eq!(adopted.proof(), Proof::SIGNATURE);
    assert!(adopted.is_verified());
    assert!(old.entry.as_ref().unwrap().is_superseded());
    assert_eq!(key_id(&cache, "new").await, ("ASIA1".into(), Lookup::Hit));
    // When due (the 30 min retention), the new token renews, not the old one.
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!((up.calls_for("old"), up.calls_for("new")), (1, 1));
    assert_ne!(key_id(&cache, "new").await.0, "ASIA1");
    assert_eq!(adopted.proof(), Proof::SIGNATURE | Proof::EKS_AUTH);
}
