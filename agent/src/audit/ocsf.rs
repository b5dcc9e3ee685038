//! The `ocsf` audit format: each request as one OCSF [`VERSION`] event of class Authentication
//! (3002), activity Logon, for SIEMs (Security Lake, Splunk, …). Built on the writer thread from the
//! same [`AuditRecord`] as the native line, so it says nothing the native record does not, and
//! never a token, a secret key or a session token. `docs/audit-log.md` ("The OCSF format") maps it
//! field by field and says why Authentication; the tests check every shape against the schema that
//! `ocsf-json-schema` generates for this version with the profiles in [`PROFILES`].
//!
//! What OCSF has no attribute for (the token binding, what vouched for the caller, the token's
//! claims, the cache) goes to `unmapped`, as OCSF intends.

use std::time::UNIX_EPOCH;

use serde::Serialize;
use serde_json::{Value, json};

use super::AuditRecord;

/// The OCSF release the events follow (`metadata.version`).
pub const VERSION: &str = "1.5.0";
/// The profiles the events use: `host` (`device`: the node; `actor`) and `container` (the
/// process's container).
pub const PROFILES: [&str; 2] = ["container", "host"];

const CLASS_UID: u32 = 3002;
const CATEGORY_UID: u32 = 3;
const LOGON: u32 = 1;
const PRODUCT: &str = "eks-pod-identity-agent";

/// One request as an OCSF Authentication event.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    activity_id: u32,
    activity_name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    class_uid: u32,
    class_name: &'static str,
    type_uid: u32,
    type_name: &'static str,
    severity_id: u32,
    severity: &'static str,
    /// When the request was answered, ms since the epoch.
    time: u64,
    /// The request's latency, ms.
    duration: u64,
    status_id: u32,
    status: &'static str,
    /// The HTTP status the caller got.
    status_code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_detail: Option<&'a str>,
    auth_protocol_id: u32,
    auth_protocol: &'static str,
    /// What the caller authenticated to (the class requires it or `dst_endpoint`).
    service: Value,
    metadata: Metadata,
    /// Whom the request acted as: the IAM role when one is known, else the service account the
    /// token claims, else `system:anonymous`.
    user: Value,
    /// The caller: its process (kernel), container and pod (pod view), service account.
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<Value>,
    /// The credentials served.
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<Value>,
    /// The node.
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<Value>,
    src_endpoint: Value,
    unmapped: Value,
}

#[derive(Debug, Serialize)]
struct Metadata {
    version: &'static str,
    profiles: [&'static str; 2],
    product: Value,
    log_name: &'static str,
    /// The cluster, as `k8s.cluster.name` (OpenTelemetry's name): OCSF has no attribute for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<Value>,
}

impl<'a> Event<'a> {
    /// The event of `record`.
    pub fn new(record: &'a AuditRecord) -> Self {
        let allowed = record.outcome == "allowed";
        let (severity_id, severity) = match record.outcome {
            "allowed" => (1, "Informational"),
            "error" => (2, "Low"),
            _ => (3, "Medium"),
        };
        Event {
            activity_id: LOGON,
            activity_name: "Logon",
            category_uid: CATEGORY_UID,
            category_name: "Identity & Access Management",
            class_uid: CLASS_UID,
            class_name: "Authentication",
            type_uid: CLASS_UID * 100 + LOGON,
            type_name: "Authentication: Logon",
            severity_id,
            severity,
            time: millis(&record.ts).unwrap_or(0),
            duration: record.latency_us / 1000,
            status_id: if allowed { 1 } else { 2 },
            status: if allowed { "Success" } else { "Failure" },
            status_code: record.http_status.to_string(),
            status_detail: record.reason.as_deref(),
            // The pod's projected service-account token, exchanged through EKS Auth.
            auth_protocol_id: 99,
            auth_protocol: "EKS Pod Identity",
            service: json!({"name": "EKS Pod Identity"}),
            metadata: Metadata {
                version: VERSION,
                profiles: PROFILES,
                product: json!({"name": PRODUCT, "version": env!("CARGO_PKG_VERSION")}),
                log_name: "audit",
                tags: record
                    .cluster
                    .as_ref()
                    .map(|c| json!([{"name": "k8s.cluster.name", "value": c}])),
            },
            user: user(record),
            actor: actor(record),
            session: record.credentials.as_ref().map(|c| {
                let mut session = json!({"credential_uid": c.access_key_id, "issuer": "eks-auth"});
                if let Some(ms) = millis(&c.expiration) {
                    session["expiration_time"] = json!(ms);
                }
                session
            }),
            device: record
                .node
                .as_ref()
                .map(|n| json!({"hostname": n, "name": n, "type_id": 1, "type": "Server"})),
            src_endpoint: endpoint(&record.caller.peer),
            unmapped: unmapped(record),
        }
    }
}

/// Appends `record`'s OCSF event to `line`, one JSON object and a newline.
///
/// # Errors
/// Serialisation failed (it cannot for these types, whose maps all have string keys).
pub fn to_line(record: &AuditRecord, line: &mut Vec<u8>) -> serde_json::Result<()> {
    serde_json::to_writer(&mut *line, &Event::new(record))?;
    line.push(b'\n');
    Ok(())
}

/// ms since the epoch of an RFC 3339 UTC time as the native record writes it.
fn millis(rfc3339: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(rfc3339).ok()?;
    let since = t.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// `user`: the IAM role the credentials are for, with the access key id and account; when no
/// role is known (refused before EKS Auth answered), the subject the token claims.
fn user(record: &AuditRecord) -> Value {
    let role = record.role_arn.as_deref().or_else(|| {
        record
            .credentials
            .as_ref()
            .and_then(|c| c.assumed_role_arn.as_deref())
    });
    if let Some(arn) = role {
        let mut user = json!({"uid": arn, "type_id": 99, "type": "AWS IAM Role"});
        if let Some(name) = arn.rsplit_once('/').map(|(_, name)| name) {
            user["name"] = json!(name);
        }
        // arn:aws:iam::<account>:role/<name>
        if let Some(account) = arn.split(':').nth(4).filter(|a| !a.is_empty()) {
            user["account"] = json!({"uid": account, "type_id": 10, "type": "AWS Account"});
        }
        if let Some(c) = &record.credentials {
            user["credential_uid"] = json!(c.access_key_id);
        }
        return user;
    }
    let claimed = record.token.as_ref().and_then(|t| {
        Some(service_account(
            t.namespace.as_deref()?,
            t.service_account.as_deref()?,
        ))
    });
    claimed.unwrap_or_else(|| json!({"uid": "system:anonymous", "name": "system:anonymous"}))
}

/// A Kubernetes service account as an OCSF user.
fn service_account(namespace: &str, name: &str) -> Value {
    json!({
        "uid": format!("system:serviceaccount:{namespace}:{name}"),
        "name": name,
        "domain": namespace,
        "type_id": 99,
        "type": "Kubernetes Service Account",
    })
}

/// `actor`: the process the kernel saw connect, in its container and pod; the service account
/// of the pod, as the pod view has it. `None` when nothing is known of the caller.
fn actor(record: &AuditRecord) -> Option<Value> {
    let caller = &record.caller;
    let pod = record.pod.as_ref();
    let mut actor = serde_json::Map::new();
    let mut process = serde_json::Map::new();
    if let Some(pid) = caller.pid {
        process.insert("pid".into(), json!(pid));
    }
    if let Some(comm) = &caller.comm {
        process.insert("name".into(), json!(comm));
    }
    if let Some(exec_id) = &caller.exec_id {
        process.insert("uid".into(), json!(exec_id));
    }
    let mut container = serde_json::Map::new();
    if let Some(id) = &caller.container_id {
        container.insert("uid".into(), json!(id));
    }
    if let Some(name) = pod.and_then(|p| p.container.as_deref()) {
        container.insert("name".into(), json!(name));
    }
    if !container.is_empty() {
        container.insert("orchestrator".into(), json!("Kubernetes"));
        if let Some(uid) = caller.pod_uid.as_deref().filter(|u| is_uuid(u)) {
            container.insert("pod_uuid".into(), json!(uid));
        }
        if let Some(p) = pod {
            // OpenTelemetry's names for the pod's namespace and name.
            container.insert(
                "tags".into(),
                json!([
                    {"name": "k8s.namespace.name", "value": p.namespace},
                    {"name": "k8s.pod.name", "value": p.name},
                ]),
            );
        }
        process.insert("container".into(), Value::Object(container));
    }
    if !process.is_empty() {
        actor.insert("process".into(), Value::Object(process));
    }
    if let Some(p) = pod {
        actor.insert(
            "user".into(),
            service_account(&p.namespace, &p.service_account),
        );
    }
    (!actor.is_empty()).then_some(Value::Object(actor))
}

/// `src_endpoint`: the peer address from `accept()`.
fn endpoint(peer: &str) -> Value {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(addr) => json!({"ip": addr.ip().to_string(), "port": addr.port()}),
        Err(_) => json!({"name": peer}),
    }
}

/// What OCSF has no attribute for, under the native record's names.
fn unmapped(record: &AuditRecord) -> Value {
    let mut unmapped = json!({
        "binding": record.binding,
        "verified_by": record.verified_by,
        "latency_us": record.latency_us,
    });
    let mut put = |key: &str, value: Value| {
        if !value.is_null() {
            unmapped[key] = value;
        }
    };
    put("cache", json!(record.cache));
    put("association_id", json!(record.association_id));
    put("cgroup_id", json!(record.caller.cgroup_id));
    put("cgroup_path", json!(record.caller.cgroup_path));
    put("process_start_ns", json!(record.caller.start_ns));
    put("token", json!(record.token));
    let pod = record.pod.as_ref();
    put("token_matches", json!(pod.and_then(|p| p.token_matches)));
    put(
        "container_scope",
        json!(pod.and_then(|p| p.container_scope)),
    );
    if let Some(c) = &record.credentials {
        put("credentials_source", json!(c.source));
        put("assumed_role_arn", json!(c.assumed_role_arn));
    }
    unmapped
}

/// Whether `s` has the 8-4-4-4-12 hex shape OCSF requires of `pod_uuid`.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}
