//! Events on pods whose credential requests are refused or fail, so that `kubectl describe pod`
//! says why a pod gets no AWS credentials.
//!
//! The request path classifies its outcome into an [`Observation`] (in [`crate::http::observe`]:
//! a match on the result, nothing when the request was served) and queues it without waiting
//! ([`EventRecorder::record`]: a full queue drops and counts). A task of its own ([`run`]) names
//! the pod, aggregates and rate-limits per pod ([`correlator`]) and talks to the API, one call at
//! a time with a deadline: a slow or hung API fills the queue, never a request.
//!
//! **Which pod, and who says so.** The Event goes on the pod that asked, as the kernel placed the
//! caller — for a token-binding mismatch, the pod that presented another's token. Its name,
//! namespace and service account come only from tokens EKS Auth verified: from this request's
//! token when EKS Auth's answer proves it checked it (no association, AccessDenied), otherwise
//! from a token of that pod EKS Auth accepted earlier (the credential cache, keyed by the
//! kernel's pod UID: [`PodNames`]). Claims the agent could not verify never name the object or
//! the namespace of an Event — a forged token cannot make the agent write Events elsewhere.
//! A pod that cannot be named this way gets no Event (counted as `unnamed`).
//!
//! Messages name the namespace, service account and role where known; never a token or a
//! credential.
//!
//! The parts: [`observation`] (what the request path reports, and who names the pod),
//! [`message`] (the Event's text), [`recorder`] (the queue between the two sides), [`task`] (the
//! loop that sends), [`correlator`] (aggregation and rate limits, no I/O). None of them imports
//! the HTTP side: it imports this.

pub mod correlator;
pub mod message;
pub mod observation;
pub mod recorder;
pub mod task;

#[cfg(test)]
mod tests;

pub use correlator::Reporter;
pub use message::message;
pub use observation::{
    Detail, Limiter, Observation, PodIdentity, PodNames, Reason, Subject, names_from_cache,
    names_from_view_or_cache, uid_chars,
};
pub use recorder::{EventInbox, EventRecorder, Outcomes, channel};
pub use task::run;
