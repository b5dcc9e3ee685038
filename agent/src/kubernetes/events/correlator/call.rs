//! The API calls the correlator asks for: an Event created whole, or a patch raising its count,
//! built from a series; and who reports them.

use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Event, EventSeries, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::Correlator;
use crate::kubernetes::COMPONENT;
use crate::kubernetes::events::observation::Reason;

/// Who posts the Events (`source`, `reportingComponent`, `reportingInstance`).
#[derive(Debug, Clone)]
pub struct Reporter {
    /// This node's name.
    pub host: String,
}

/// A series' key: the pod's UID and the reason.
pub type Key = (Arc<str>, Reason);

/// An API call to make.
#[derive(Debug, Clone)]
pub enum Call {
    Create {
        key: Key,
        namespace: String,
        event: Box<Event>,
        count: u32,
    },
    Patch {
        key: Key,
        namespace: String,
        name: String,
        patch: serde_json::Value,
        count: u32,
    },
}

impl Call {
    pub(super) fn key(&self) -> &Key {
        match self {
            Call::Create { key, .. } | Call::Patch { key, .. } => key,
        }
    }

    pub(super) fn count(&self) -> u32 {
        match self {
            Call::Create { count, .. } | Call::Patch { count, .. } => *count,
        }
    }
}

/// A call and how it went.
pub struct Sent {
    pub call: Call,
    pub result: Result<Event, kube::Error>,
}

impl Correlator {
    /// The call that brings the API up to date with the series under `key`.
    pub(super) fn call(&self, key: &Key) -> Option<Call> {
        let series = self.series.get(key)?;
        let pod = &series.pod;
        let count = series.count;
        let count_i32 = i32::try_from(count).unwrap_or(i32::MAX);
        let last = timestamp(series.last);
        let event_series = (count > 1).then_some(EventSeries {
            count: Some(count_i32),
            last_observed_time: Some(MicroTime(last)),
        });
        Some(match &series.object {
            Some(name) => Call::Patch {
                key: key.clone(),
                namespace: pod.namespace.clone(),
                name: name.clone(),
                patch: json!({
                    "count": count_i32,
                    "lastTimestamp": Time(last),
                    "message": series.message,
                    "series": event_series,
                }),
                count,
            },
            None => Call::Create {
                key: key.clone(),
                namespace: pod.namespace.clone(),
                event: Box::new(Event {
                    metadata: ObjectMeta {
                        name: Some(event_name(&pod.name, series.last, series.failures)),
                        namespace: Some(pod.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    involved_object: ObjectReference {
                        api_version: Some("v1".to_owned()),
                        kind: Some("Pod".to_owned()),
                        name: Some(pod.name.clone()),
                        namespace: Some(pod.namespace.clone()),
                        uid: Some(pod.uid.clone()),
                        ..ObjectReference::default()
                    },
                    reason: Some(key.1.as_str().to_owned()),
                    message: Some(series.message.clone()),
                    type_: Some("Warning".to_owned()),
                    count: Some(count_i32),
                    first_timestamp: Some(Time(timestamp(series.first))),
                    last_timestamp: Some(Time(last)),
                    series: event_series,
                    source: Some(EventSource {
                        component: Some(COMPONENT.to_owned()),
                        host: Some(self.reporter.host.clone()).filter(|h| !h.is_empty()),
                    }),
                    reporting_component: Some(COMPONENT.to_owned()),
                    reporting_instance: Some(self.reporter.host.clone()).filter(|h| !h.is_empty()),
                    ..Event::default()
                }),
                count,
            },
        })
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// `<pod>.<nanoseconds in hex>`, as the kubelet names its Events (the pod's name shortened so
/// that the whole stays a valid object name); `attempt` makes a retried create's name new.
fn event_name(pod: &str, at: SystemTime, attempt: u32) -> String {
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        + u128::from(attempt);
    let mut end = pod.len().min(253 - 1 - 32);
    while !pod.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}.{nanos:x}", &pod[..end])
}
