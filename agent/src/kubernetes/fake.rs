//! A scripted [`KubeApi`] for unit tests: one node, the Events it was sent, injected failures.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::{Event, Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::Status;

use super::{KubeApi, Operation};

#[derive(Default)]
pub struct State {
    pub node: Option<Node>,
    /// Every call, in order.
    pub calls: Vec<Operation>,
    pub node_patches: Vec<serde_json::Value>,
    pub created: Vec<Event>,
    pub event_patches: Vec<(String, serde_json::Value)>,
    /// Errors (status codes) for the next calls of an operation, in order.
    pub failures: VecDeque<(Operation, u16)>,
    /// Another writer changes the node just before the next node patch applies.
    pub concurrent_writes: u32,
    /// Calls never answer.
    pub hang: bool,
}

#[derive(Clone, Default)]
pub struct FakeApi(pub Arc<Mutex<State>>);

pub fn taint(key: &str, effect: &str) -> Taint {
    Taint {
        key: key.to_owned(),
        effect: effect.to_owned(),
        ..Taint::default()
    }
}

impl FakeApi {
    pub fn with_node(name: &str, taints: Vec<Taint>) -> Self {
        let api = FakeApi::default();
        api.state().node = Some(Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                resource_version: Some("1".to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..NodeSpec::default()
            }),
            status: None,
        });
        api
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    pub fn taints(&self) -> Vec<Taint> {
        let state = self.state();
        state
            .node
            .as_ref()
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
    }

    pub fn fail(&self, op: Operation, code: u16, times: usize) {
        let mut state = self.state();
        for _ in 0..times {
            state.failures.push_back((op, code));
        }
    }

    /// Records the call; `Err` for an injected failure; pends forever when hanging.
    async fn enter(&self, op: Operation) -> Result<(), kube::Error> {
        let hang = {
            let mut state = self.state();
            state.calls.push(op);
            state.hang
        };
        if hang {
            std::future::pending::<()>().await;
        }
        let mut state = self.state();
        if let Some(i) = state.failures.iter().position(|(o, _)| *o == op) {
            let (_, code) = state.failures.remove(i).unwrap();
            return Err(api_error(code));
        }
        Ok(())
    }
}

pub fn api_error(code: u16) -> kube::Error {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        _ => "ServiceUnavailable",
    };
    kube::Error::Api(Status::failure("injected", reason).with_code(code).boxed())
}

fn bump(rv: &mut Option<String>) {
    let n: u64 = rv.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
    *rv = Some((n + 1).to_string());
}

impl KubeApi for FakeApi {
    async fn get_node(&self, name: &str) -> Result<Node, kube::Error> {
        self.enter(Operation::GetNode).await?;
        let state = self.state();
        state
            .node
            .clone()
            .filter(|n| n.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| api_error(404))
    }

    async fn patch_node(&self, name: &str, patch: &serde_json::Value) -> Result<Node, kube::Error> {
        self.enter(Operation::PatchNode).await?;
        let mut state = self.state();
        state.node_patches.push(patch.clone());
        let concurrent = state.concurrent_writes > 0;
        if concurrent {
            state.concurrent_writes -= 1;
        }
        let node = state
            .node
            .as_mut()
            .filter(|n| n.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| api_error(404))?;
        if concurrent {
            // Another controller adds a taint meanwhile.
            if let Some(taints) = node.spec.as_mut().and_then(|s| s.taints.as_mut()) {
                taints.push(taint("other.example.com/added-meanwhile", "NoSchedule"));
            }
            bump(&mut node.metadata.resource_version);
        }
        if let Some(rv) = patch.pointer("/metadata/resourceVersion")
            && rv.as_str() != node.metadata.resource_version.as_deref()
        {
            return Err(api_error(409));
        }
        if let Some(taints) = patch.pointer("/spec/taints") {
            let taints: Vec<Taint> = serde_json::from_value(taints.clone()).unwrap();
            node.spec.get_or_insert_with(NodeSpec::default).taints = Some(taints);
        }
        bump(&mut node.metadata.resource_version);
        Ok(node.clone())
    }

    async fn create_event(&self, namespace: &str, event: &Event) -> Result<Event, kube::Error> {
        self.enter(Operation::CreateEvent).await?;
        assert_eq!(event.metadata.namespace.as_deref(), Some(namespace));
        self.state().created.push(event.clone());
        Ok(event.clone())
    }

    async fn patch_event(
        &self,
        _namespace: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<Event, kube::Error> {
        self.enter(Operation::PatchEvent).await?;
        let mut state = self.state();
        state.event_patches.push((name.to_owned(), patch.clone()));
        let event = state
            .created
            .iter()
            .find(|e| e.metadata.name.as_deref() == Some(name))
            .cloned()
            .ok_or_else(|| api_error(404))?;
        Ok(event)
    }
}
