//! One audit record, native or OCSF, as the receiver it names.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

use super::Receiver;

/// The receiver a record names and when, if it handed out `access_key_id`. Reads both formats:
/// native records (`ts`) and OCSF events (`class_uid`, `time` in ms), so that files written before
/// and after a change of `--audit-format` are searched alike. `Err`: neither.
pub(super) fn receiver(
    record: &Value,
    access_key_id: &str,
) -> Result<Option<(String, Receiver)>, &'static str> {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    if record["class_uid"].is_u64() {
        let Some(ms) = record["time"].as_u64() else {
            return Err("an OCSF event without `time`");
        };
        if record["session"]["credential_uid"].as_str() != Some(access_key_id) {
            return Ok(None);
        }
        let process = &record["actor"]["process"];
        let container = &process["container"];
        let tag = |name: &str| {
            container["tags"]
                .as_array()
                .and_then(|tags| tags.iter().find(|t| t["name"] == name))
                .and_then(|t| text(&t["value"]))
        };
        let ts = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms));
        return Ok(Some((
            ts.to_string(),
            Receiver {
                namespace: tag("k8s.namespace.name"),
                pod_name: tag("k8s.pod.name"),
                pod_uid: text(&container["pod_uuid"]),
                container_id: text(&container["uid"]),
                container: text(&container["name"]),
                pid: process["pid"].as_u64(),
                comm: text(&process["name"]),
                cgroup_path: text(&record["unmapped"]["cgroup_path"]),
                ..Receiver::default()
            },
        )));
    }
    let Some(ts) = text(&record["ts"]) else {
        return Err("no `ts`");
    };
    if record["credentials"]["access_key_id"].as_str() != Some(access_key_id) {
        return Ok(None);
    }
    let caller = &record["caller"];
    // The pod view's names (verified) when the record has them, else the token's claims.
    let (pod, token) = (&record["pod"], &record["token"]);
    Ok(Some((
        ts,
        Receiver {
            namespace: text(&pod["namespace"]).or_else(|| text(&token["namespace"])),
            pod_name: text(&pod["name"]).or_else(|| text(&token["pod_name"])),
            pod_uid: text(&caller["pod_uid"]),
            container_id: text(&caller["container_id"]),
            container: text(&pod["container"]),
            pid: caller["pid"].as_u64(),
            comm: text(&caller["comm"]),
            cgroup_path: text(&caller["cgroup_path"]),
            ..Receiver::default()
        },
    )))
}
