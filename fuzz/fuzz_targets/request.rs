//! Whole requests, from raw bytes to the bytes answered: the agent's HTTP/1 connection settings
//! (`listener::http1_builder`) over an in-memory stream, the real endpoint and cache, and a
//! stand-in for EKS Auth.
//!
//! Input: one byte choosing the binding mode (`% 3`: off, audit, enforce) and the caller (`/ 3 % 3`:
//! no kernel record, in pod `POD`, in a cgroup that is no pod's), then the bytes a client sends
//! (several requests on one connection reach the cache). The client then waits, shuts its side
//! down and reads to the end. Time is paused: hyper's header timeout fires at once when a head is
//! incomplete.
//!
//! Checked: the connection answers or closes (within an hour of paused time) and nothing panics;
//! every answer keeps `check_answer`'s invariants (a 200 only for a well-formed token, no secret
//! in an error); what reaches the wire starts as an HTTP/1 response, and carries exactly the
//! secrets of the 200s the endpoint gave.
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use pod_identity_agent::config::TokenBinding;
use pod_identity_agent::listener::http1_builder;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use fuzz_support::{RequestFacts, SECRET_MARK, StandIn, caller, check_answer, clock, endpoint};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, raw)) = data.split_first() else {
        return;
    };
    let binding = [
        TokenBinding::Off,
        TokenBinding::Audit,
        TokenBinding::Enforce,
    ][usize::from(mode % 3)];
    let caller = Arc::new(caller(mode / 3));
    fuzz_support::runtime().block_on(async {
        let clock = clock();
        let endpoint = Arc::new(endpoint(binding, clock, StandIn::new(clock)));
        let served_200 = Arc::new(Mutex::new(0usize));

        let service = {
            let served_200 = served_200.clone();
            service_fn(move |req: http::Request<Incoming>| {
                let (endpoint, caller, served_200) =
                    (endpoint.clone(), caller.clone(), served_200.clone());
                async move {
                    let facts = RequestFacts::of(&req);
                    let response = fuzz_support::collect(endpoint.handle(req, &caller).await).await;
                    check_answer(&facts, binding, &caller, &response, clock.unix_now());
                    if response.status() == 200 {
                        *served_200.lock().unwrap() += 1;
                    }
                    Ok::<_, Infallible>(response.map(http_body_util::Full::new))
                }
            })
        };
        let (client, server) = tokio::io::duplex(64 * 1024);
        let connection = http1_builder().serve_connection(TokioIo::new(server), service);
        let (mut from_agent, mut to_agent) = tokio::io::split(client);
        let send = async {
            // The agent may close before reading everything: that is its right.
            let _ = to_agent.write_all(raw).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            let _ = to_agent.shutdown().await;
        };
        let receive = async {
            let mut out = Vec::new();
            let _ = from_agent.read_to_end(&mut out).await;
            out
        };
        let answered = tokio::time::timeout(Duration::from_secs(3600), async {
            let (_, out, _) = tokio::join!(send, receive, connection);
            out
        })
        .await;
        let out = answered.expect("the connection neither answered nor closed within an hour");

        if !out.is_empty() {
            assert!(
                out.starts_with(b"HTTP/1."),
                "{:?}",
                String::from_utf8_lossy(&out)
            );
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut first = httparse::Response::new(&mut headers);
            assert!(
                matches!(first.parse(&out), Ok(httparse::Status::Complete(_))),
                "not an HTTP/1 response: {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        let secrets = out
            .windows(SECRET_MARK.len())
            .filter(|w| *w == SECRET_MARK.as_bytes())
            .count();
        assert_eq!(
            secrets,
            *served_200.lock().unwrap(),
            "secrets on the wire: {:?}",
            String::from_utf8_lossy(&out)
        );
    });
});
