//! The Events task: takes observations off the queue, feeds the [`Correlator`], and makes the API
//! calls it asks for, one at a time, each within the client's deadline.

use crate::backoff::Backoff;

use futures::future::OptionFuture;
use tokio_util::sync::CancellationToken;

use super::correlator::{Call, Correlator, Limits, Reporter, Sent};
use super::observation::PodNames;
use super::recorder::EventInbox;
use crate::kubernetes::{ApiErrors, KubeApi, Operation};

/// The Events task: takes observations, and sends what the correlator calls for, one call at a
/// time, each within the client's deadline. Observations keep being taken while a call is under
/// way, so a slow API delays Events, never the queue's consumer. Ends at shutdown.
pub async fn run<A: KubeApi>(
    api: A,
    inbox: EventInbox,
    reporter: Reporter,
    names: PodNames,
    backoff: Backoff,
    errors: ApiErrors,
    shutdown: CancellationToken,
) {
    let EventInbox {
        queue: mut inbox,
        outcomes,
    } = inbox;
    let mut correlator = Correlator::new(Limits::kubelet(), backoff, reporter, outcomes);
    let mut in_flight: Option<std::pin::Pin<Box<dyn Future<Output = Sent> + Send>>> = None;
    loop {
        let due = correlator.next_due(tokio::time::Instant::now());
        tokio::select! {
            () = shutdown.cancelled() => break,
            observation = inbox.recv() => match observation {
                Some(o) => correlator.observe(o, &*names, tokio::time::Instant::now(), std::time::SystemTime::now()),
                None => break,
            },
            Some(sent) = OptionFuture::from(in_flight.as_mut()), if in_flight.is_some() => {
                in_flight = None;
                if let Err(e) = &sent.result {
                    errors.count(sent.operation());
                    tracing::debug!(error = %e, operation = sent.operation().as_str(), "posting an Event failed");
                }
                correlator.finished(sent, tokio::time::Instant::now());
            }
            () = sleep_until(due), if in_flight.is_none() && due.is_some() => {}
        }
        if in_flight.is_none()
            && let Some(call) = correlator.next_call(tokio::time::Instant::now())
        {
            in_flight = Some(Box::pin(send(api.clone(), call)));
        }
    }
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// One API call the correlator asked for.
async fn send<A: KubeApi>(api: A, call: Call) -> Sent {
    let result = match &call {
        Call::Create {
            namespace, event, ..
        } => api.create_event(namespace, event).await,
        Call::Patch {
            namespace,
            name,
            patch,
            ..
        } => api.patch_event(namespace, name, patch).await,
    };
    Sent { call, result }
}

impl Sent {
    fn operation(&self) -> Operation {
        match self.call {
            Call::Create { .. } => Operation::CreateEvent,
            Call::Patch { .. } => Operation::PatchEvent,
        }
    }
}
