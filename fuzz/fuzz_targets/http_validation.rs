//! `Host` and `Authorization` validation.
//!
//! Input: the `Host` value, a newline, the `Authorization` value (no newline: no Authorization).
//! `host_ip` is compared with an independent reading of the value (the `http` crate's authority
//! parser, plus the bare IPv6 address some clients send); then `GET /v1/credentials` with those
//! headers goes through the real endpoint, and its status is compared with the order of checks
//! the README states: Host (403), then the token (400), then binding (403), and only then EKS Auth.
#![no_main]

use std::net::IpAddr;
use std::str::FromStr as _;

use http::{HeaderValue, Request, header};
use libfuzzer_sys::fuzz_target;
use pod_identity_agent::config::TokenBinding;
use pod_identity_agent::http::{CREDENTIALS_PATH, host_ip};
use pod_identity_agent::token::Claims;

use fuzz_support::{
    RequestFacts, StandIn, UPSTREAM_ERROR_JTI, bound, caller, check_answer, clock, endpoint, hosts,
    runtime,
};

fuzz_target!(|data: &[u8]| {
    let (host, authorization) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    if let Ok(host) = std::str::from_utf8(host)
        && let Some(ip) = host_ip(host)
    {
        assert_eq!(
            authority_ip(host),
            Some(ip),
            "host_ip accepts {host:?} as {ip}"
        );
    }

    let host = HeaderValue::from_bytes(host).ok();
    let authorization = authorization.and_then(|a| HeaderValue::from_bytes(a).ok());
    let rt = runtime();
    rt.block_on(async {
        for (binding, caller_kind) in [(TokenBinding::Off, 0), (TokenBinding::Enforce, 1)] {
            let clock = clock();
            let upstream = StandIn::new(clock);
            let endpoint = endpoint(binding, clock, upstream.clone());
            let caller = caller(caller_kind);
            let mut req = Request::builder().method("GET").uri(CREDENTIALS_PATH);
            if let Some(h) = &host {
                req = req.header(header::HOST, h.clone());
            }
            if let Some(a) = &authorization {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            let Ok(req) = req.body(()) else { return };
            let facts = RequestFacts::of(&req);
            let response = fuzz_support::collect(endpoint.handle(req, &caller).await).await;
            let now = clock.unix_now();
            check_answer(&facts, binding, &caller, &response, now);

            let status = response.status().as_u16();
            let host_ok = facts
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .and_then(host_ip)
                .is_some_and(|ip| hosts().contains(&ip));
            let claims = facts
                .token()
                .map(|t| Claims::parse(t).and_then(|c| c.check(now).map(|()| c)));
            let expected = match (host_ok, &claims) {
                (false, _) => Some(403),
                (true, None | Some(Err(_))) => Some(400),
                (true, Some(Ok(c))) if !bound(binding, &caller, c) => Some(403),
                (true, Some(Ok(c))) if upstream_error(c) => None,
                (true, Some(Ok(_))) => Some(200),
            };
            match expected {
                Some(expected) => assert_eq!(status, expected, "{facts:?}"),
                None => assert_ne!(status, 200, "{facts:?}"),
            }
            let calls = upstream.calls();
            assert_eq!(
                calls,
                usize::from(matches!(expected, Some(200) | None)),
                "upstream calls for {facts:?} answered {status}"
            );
        }
    });
});

fn upstream_error(c: &Claims) -> bool {
    c.jti
        .as_deref()
        .and_then(|j| j.strip_prefix(UPSTREAM_ERROR_JTI))
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(status, _)| status.parse::<u16>().is_ok())
}

/// The address a `Host` value names, read as a URI authority (`host[:port]`, the host an IP
/// address, bracketed for IPv6), or a bare IPv6 address. Tolerated, as the agent reads it: an
/// IPv4 address in brackets.
fn authority_ip(host: &str) -> Option<IpAddr> {
    if let Ok(ip) = std::net::Ipv6Addr::from_str(host) {
        return Some(IpAddr::V6(ip));
    }
    let authority = http::uri::Authority::from_str(host).ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    if authority
        .as_str()
        .rsplit_once(']')
        .map_or(authority.as_str(), |(_, p)| p)
        .contains(':')
    {
        authority.port_u16()?;
    }
    let h = authority.host();
    match h.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(literal) => literal.parse().ok(),
        None => h.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
    }
}
