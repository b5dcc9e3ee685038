//! The audit record: the event the request path hands over ([`AuditEvent`]: shared references
//! and plain values), the record as written ([`AuditRecord`], schema version [`SCHEMA_VERSION`],
//! documented field by field in `docs/audit-log.md`), and its one-line JSON form ([`to_line`]).
//! Never a token, a secret key or a session token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::attribution::scope::Scope;
use crate::cgroup::CgroupInfo;
use crate::credentials::Issued;
use crate::credentials::cache::Lookup;
use crate::ebpf;
use crate::kubernetes::pod_view::ViewedPod;
use crate::proof::Proof;
use crate::token::Claims;

/// One credential request as the request path hands it over: shared references and plain
/// values, so that queuing it copies a few pointers and formats nothing. The writer thread turns
/// it into an [`AuditRecord`] ([`AuditEvent::to_record`]).
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub at: SystemTime,
    pub outcome: &'static str,
    pub http_status: u16,
    /// Why the request was refused or failed.
    pub reason: Option<String>,
    /// How the credentials were looked up, when they were.
    pub lookup: Option<Lookup>,
    pub latency: Duration,
    pub peer: SocketAddr,
    /// The process that connected, from the kernel.
    pub process: Option<ebpf::Caller>,
    /// Its cgroup, with the pod and container.
    pub cgroup: Option<Arc<CgroupInfo>>,
    /// The token's claims as presented.
    pub claims: Option<Arc<Claims>>,
    /// `match`, `mismatch`, `unattributed` or `off`.
    pub binding: &'static str,
    /// What vouched for the caller's identity.
    pub proof: Proof,
    /// The credentials served: only for allowed requests.
    pub issued: Option<Arc<Issued>>,
    /// The pod the kernel placed the caller in, as the pod view has it.
    pub pod: Option<ViewedPod>,
    /// The caller's container under its pod's list of containers.
    pub scope: Scope,
}

impl AuditEvent {
    /// A request with nothing found out yet: only when, from where, and its answer.
    pub fn new(at: SystemTime, peer: SocketAddr, outcome: &'static str, http_status: u16) -> Self {
        AuditEvent {
            at,
            outcome,
            http_status,
            reason: None,
            lookup: None,
            latency: Duration::ZERO,
            peer,
            process: None,
            cgroup: None,
            claims: None,
            binding: "off",
            proof: Proof::empty(),
            issued: None,
            pod: None,
            scope: Scope::Unscoped,
        }
    }

    /// The record as the log writes it (formatting happens here, on the writer thread).
    pub fn to_record(&self) -> AuditRecord {
        let cgroup = self.cgroup.as_deref();
        let pod = cgroup.and_then(|c| c.pod.as_ref());
        let process = self.process.as_ref();
        let association = self.issued.as_ref().map(|i| &i.association);
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        AuditRecord {
            ts: timestamp(self.at),
            outcome: self.outcome,
            http_status: self.http_status,
            reason: self.reason.clone(),
            cache: self.lookup.map(Lookup::as_str),
            latency_us: u64::try_from(self.latency.as_micros()).unwrap_or(u64::MAX),
            cluster: None,
            node: None,
            caller: CallerRecord {
                peer: self.peer.to_string(),
                cgroup_id: process.map(|p| p.cgroup_id),
                cgroup_path: cgroup.map(|c| c.path.clone()),
                pod_uid: pod.map(|p| p.pod_uid.to_string()),
                container_id: pod.and_then(|p| p.container_id.clone()),
                pid: process.map(|p| p.pid),
                comm: process.map(|p| p.comm.to_string()),
                start_ns: None,
                exec_id: None,
            },
            pod: self.pod.as_ref().map(|viewed| PodRecord {
                namespace: viewed.pod.namespace.to_string(),
                name: viewed.pod.name.to_string(),
                service_account: viewed.pod.service_account.to_string(),
                container: pod
                    .and_then(|p| p.container_id.as_deref())
                    .and_then(|id| viewed.pod.container_name(id))
                    .map(ToString::to_string),
                token_matches: viewed.token_matches,
                container_scope: (self.scope != Scope::Unscoped).then(|| self.scope.as_str()),
            }),
            token: self.claims.as_deref().map(|c| TokenRecord {
                namespace: c.namespace().map(str::to_owned),
                service_account: c.service_account().map(str::to_owned),
                pod_name: c.pod_name().map(str::to_owned),
                pod_uid: c.pod_uid().map(str::to_owned),
                node_name: c.node_name().map(str::to_owned),
                jti: c.jti.clone(),
            }),
            binding: self.binding,
            verified_by: self.proof,
            role_arn: association.and_then(|a| non_empty(&a.role_arn)),
            association_id: association.and_then(|a| non_empty(&a.association_id)),
            credentials: match (&self.issued, self.lookup) {
                (Some(issued), Some(lookup)) => Some(ServedCredentials {
                    access_key_id: issued.credentials.access_key_id.clone(),
                    assumed_role_arn: non_empty(&issued.association.assumed_role_arn),
                    expiration: humantime::format_rfc3339_seconds(issued.credentials.expiration)
                        .to_string(),
                    source: match lookup {
                        Lookup::Hit => "cache",
                        Lookup::Coalesced => "coalesced",
                        Lookup::Miss => "eks_auth",
                    },
                }),
                _ => None,
            },
        }
    }
}

/// One credential request, as the audit log writes it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub ts: String,
    /// `allowed`, `denied` (refused by policy or validation) or `error` (upstream failed).
    pub outcome: &'static str,
    pub http_status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `hit`, `miss` or `coalesced`, when credentials were looked up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    pub latency_us: u64,
    /// The EKS cluster (`--cluster-name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// This node (`--node-name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub caller: CallerRecord,
    /// The pod the kernel placed the caller in, named by the pod view (the API server's pods of
    /// this node); absent when the view does not know it (or is off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenRecord>,
    /// `match`, `mismatch`, `unattributed` or `off`.
    pub binding: &'static str,
    /// What vouched for the caller's identity, a list of `kernel` (the caller is the pod the
    /// token names), `signature` (the token verifies with the cluster's keys) and `eks-auth`
    /// (EKS Auth accepted the token); `[]` when nothing did, and `token` is only what was claimed.
    pub verified_by: Proof,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
    /// The credentials handed out (allowed requests only): the keys to join the record with
    /// CloudTrail. Never the secret key or the session token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<ServedCredentials>,
}

/// The version of the record's schema, written as `v` in every record. It changes only when a
/// field changes meaning or goes away; new fields may appear in any version.
pub const SCHEMA_VERSION: u32 = 1;

/// What identifies the credentials a request was given, as CloudTrail records their use.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServedCredentials {
    /// The access key id (`ASIA…`): CloudTrail's `userIdentity.accessKeyId`. An identifier, not a
    /// secret.
    pub access_key_id: String,
    /// `arn:aws:sts::<account>:assumed-role/<role>/<session>`: CloudTrail's `userIdentity.arn`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assumed_role_arn: Option<String>,
    /// When the credentials expire, RFC 3339 UTC.
    pub expiration: String,
    /// `cache` (served from the cache), `coalesced` (another request's EKS Auth call, shared) or
    /// `eks_auth` (this request's own call).
    pub source: &'static str,
}

/// A record as written: the schema version first, then the record.
#[derive(Serialize)]
struct Versioned<'a> {
    v: u32,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

/// The caller, from the kernel.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CallerRecord {
    pub peer: String,
    pub cgroup_id: Option<u64>,
    pub cgroup_path: Option<String>,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// The process's start, ns since boot (`/proc/<pid>/stat`'s `starttime`, read by the writer
    /// thread); absent when the process was gone or its /proc not visible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_ns: Option<u64>,
    /// The process in Tetragon's `exec_id` form, base64 of `<node>:<start_ns>:<pid>` (needs
    /// `--node-name`); `docs/audit-log.md` says when it equals Tetragon's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<String>,
}

/// The caller's pod as the API server has it, keyed by the pod UID the kernel saw.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// The name of the caller's container (`null` when the kernel placed the caller in no
    /// container of the pod, or the pod's status does not list it yet).
    pub container: Option<String>,
    /// Whether the token's namespace, service account, pod name and pod UID are this pod's;
    /// absent when no token was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_matches: Option<bool>,
    /// The caller's container under the pod's list of containers (annotation
    /// `eks-pod-identity-agent.amazonaws.com/containers`): `listed`, `unlisted` or `pending`;
    /// absent when the pod lists none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_scope: Option<&'static str>,
}

/// The token's claims as presented: verified only as `verified_by` says.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
    pub jti: Option<String>,
}

/// The time format of `ts`.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Appends `record` to `line` as the log writes it: one JSON object, the schema version first,
/// and a newline (the only one: JSON escapes those inside strings).
///
/// # Errors
/// Serialisation failed (it cannot for these types, whose maps all have string keys).
pub fn to_line(record: &AuditRecord, line: &mut Vec<u8>) -> serde_json::Result<()> {
    let versioned = Versioned {
        v: SCHEMA_VERSION,
        record,
    };
    serde_json::to_writer(&mut *line, &versioned)?;
    line.push(b'\n');
    Ok(())
}
