//! Audit record serialisation (`audit::to_line` and `audit::ocsf::to_line`, what the writer thread
//! writes in each `--audit-format`).
//!
//! Every string field of a record is arbitrary (the ones typed `&'static str` take each of their
//! values). Checked: the line is one JSON object, valid UTF-8, with no raw newline, carriage
//! return or other character JSON must escape but its final newline; `v` comes first; and it parses back
//! to exactly the record's values, with absent optional fields left out as the schema says.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pod_identity_agent::audit::{
    AuditRecord, CallerRecord, PodRecord, SCHEMA_VERSION, ServedCredentials, TokenRecord, ocsf,
    to_line,
};
use pod_identity_agent::proof::Proof;
use serde_json::{Map, Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(record) = record(&mut Unstructured::new(data)) else {
        return;
    };
    let mut line = Vec::new();
    to_line(&record, &mut line).expect("a record serialises");
    let text = std::str::from_utf8(&line).expect("the line is UTF-8");
    let (json, rest) = text.split_at(text.len() - 1);
    assert_eq!(rest, "\n", "{text:?}");
    // What JSON must escape (RFC 8259): U+0000 to U+001F, newlines among them.
    assert!(
        !json.chars().any(|c| c < ' '),
        "a raw control character in {json:?}"
    );
    assert!(
        json.starts_with(&format!("{{\"v\":{SCHEMA_VERSION},")),
        "{json:?}"
    );
    let parsed: Value = serde_json::from_str(json).expect("the line parses");
    assert_eq!(parsed, expected(&record), "{json}");

    // The same record as an OCSF event: one line of JSON, the class and version it declares, the
    // access key id where OCSF keeps it.
    let mut line = Vec::new();
    ocsf::to_line(&record, &mut line).expect("an event serialises");
    let text = std::str::from_utf8(&line).expect("the event is UTF-8");
    let (json, rest) = text.split_at(text.len() - 1);
    assert_eq!(rest, "\n", "{text:?}");
    assert!(!json.chars().any(|c| c < ' '), "a raw control character in {json:?}");
    let event: Value = serde_json::from_str(json).expect("the event parses");
    assert_eq!(event["class_uid"], 3002, "{json}");
    assert_eq!(event["metadata"]["version"], ocsf::VERSION, "{json}");
    assert_eq!(
        event["device"]["hostname"].as_str(),
        record.node.as_deref(),
        "{json}"
    );
    assert_eq!(
        event["metadata"]["tags"][0]["value"].as_str(),
        record.cluster.as_deref(),
        "{json}"
    );
    assert_eq!(
        event["session"]["credential_uid"].as_str(),
        record.credentials.as_ref().map(|c| c.access_key_id.as_str()),
        "{json}"
    );
});

/// The record as the schema (docs/audit-log.md) lays it out, built without serde.
fn expected(r: &AuditRecord) -> Value {
    let mut m = Map::new();
    m.insert("v".into(), json!(SCHEMA_VERSION));
    m.insert("ts".into(), json!(r.ts));
    m.insert("outcome".into(), json!(r.outcome));
    m.insert("http_status".into(), json!(r.http_status));
    if let Some(reason) = &r.reason {
        m.insert("reason".into(), json!(reason));
    }
    if let Some(cache) = r.cache {
        m.insert("cache".into(), json!(cache));
    }
    m.insert("latency_us".into(), json!(r.latency_us));
    if let Some(cluster) = &r.cluster {
        m.insert("cluster".into(), json!(cluster));
    }
    if let Some(node) = &r.node {
        m.insert("node".into(), json!(node));
    }
    let c = &r.caller;
    let mut caller = json!({
        "peer": c.peer, "cgroup_id": c.cgroup_id, "cgroup_path": c.cgroup_path,
        "pod_uid": c.pod_uid, "container_id": c.container_id, "pid": c.pid, "comm": c.comm,
    });
    if let Some(start) = c.start_ns {
        caller["start_ns"] = json!(start);
    }
    if let Some(exec_id) = &c.exec_id {
        caller["exec_id"] = json!(exec_id);
    }
    m.insert("caller".into(), caller);
    if let Some(p) = &r.pod {
        let mut pod = Map::new();
        pod.insert("namespace".into(), json!(p.namespace));
        pod.insert("name".into(), json!(p.name));
        pod.insert("service_account".into(), json!(p.service_account));
        pod.insert("container".into(), json!(p.container));
        if let Some(matches) = p.token_matches {
            pod.insert("token_matches".into(), json!(matches));
        }
        if let Some(scope) = p.container_scope {
            pod.insert("container_scope".into(), json!(scope));
        }
        m.insert("pod".into(), Value::Object(pod));
    }
    if let Some(t) = &r.token {
        m.insert(
            "token".into(),
            json!({
                "namespace": t.namespace, "service_account": t.service_account,
                "pod_name": t.pod_name, "pod_uid": t.pod_uid, "node_name": t.node_name,
                "jti": t.jti,
            }),
        );
    }
    m.insert("binding".into(), json!(r.binding));
    let proofs = [
        (Proof::KERNEL, "kernel"),
        (Proof::SIGNATURE, "signature"),
        (Proof::EKS_AUTH, "eks-auth"),
    ];
    let verified_by: Vec<&str> = proofs
        .iter()
        .filter(|(p, _)| r.verified_by.contains(*p))
        .map(|(_, name)| *name)
        .collect();
    m.insert("verified_by".into(), json!(verified_by));
    if let Some(arn) = &r.role_arn {
        m.insert("role_arn".into(), json!(arn));
    }
    if let Some(id) = &r.association_id {
        m.insert("association_id".into(), json!(id));
    }
    if let Some(s) = &r.credentials {
        let mut served = Map::new();
        served.insert("access_key_id".into(), json!(s.access_key_id));
        if let Some(arn) = &s.assumed_role_arn {
            served.insert("assumed_role_arn".into(), json!(arn));
        }
        served.insert("expiration".into(), json!(s.expiration));
        served.insert("source".into(), json!(s.source));
        m.insert("credentials".into(), Value::Object(served));
    }
    Value::Object(m)
}

fn record(u: &mut Unstructured) -> Result<AuditRecord> {
    Ok(AuditRecord {
        ts: u.arbitrary()?,
        outcome: *u.choose(&["allowed", "denied", "error"])?,
        http_status: u.arbitrary()?,
        reason: u.arbitrary()?,
        cache: *u.choose(&[None, Some("hit"), Some("miss"), Some("coalesced")])?,
        latency_us: u.arbitrary()?,
        cluster: u.arbitrary()?,
        node: u.arbitrary()?,
        caller: CallerRecord {
            peer: u.arbitrary()?,
            cgroup_id: u.arbitrary()?,
            cgroup_path: u.arbitrary()?,
            pod_uid: u.arbitrary()?,
            container_id: u.arbitrary()?,
            pid: u.arbitrary()?,
            comm: u.arbitrary()?,
            start_ns: u.arbitrary()?,
            exec_id: u.arbitrary()?,
        },
        pod: if u.arbitrary()? {
            Some(PodRecord {
                namespace: u.arbitrary()?,
                name: u.arbitrary()?,
                service_account: u.arbitrary()?,
                container: u.arbitrary()?,
                token_matches: u.arbitrary()?,
                container_scope: *u.choose(&[
                    None,
                    Some("listed"),
                    Some("unlisted"),
                    Some("pending"),
                ])?,
            })
        } else {
            None
        },
        token: if u.arbitrary()? {
            Some(TokenRecord {
                namespace: u.arbitrary()?,
                service_account: u.arbitrary()?,
                pod_name: u.arbitrary()?,
                pod_uid: u.arbitrary()?,
                node_name: u.arbitrary()?,
                jti: u.arbitrary()?,
            })
        } else {
            None
        },
        binding: *u.choose(&["match", "mismatch", "unattributed", "off"])?,
        verified_by: Proof::from_bits_truncate(u.arbitrary()?),
        role_arn: u.arbitrary()?,
        association_id: u.arbitrary()?,
        credentials: if u.arbitrary()? {
            Some(ServedCredentials {
                access_key_id: u.arbitrary()?,
                assumed_role_arn: u.arbitrary()?,
                expiration: u.arbitrary()?,
                source: *u.choose(&["cache", "coalesced", "eks_auth"])?,
            })
        } else {
            None
        },
    })
}
