//! The `Host` header of a request, read as an address (the endpoint accepts only its own).

use std::net::IpAddr;

/// The IP of a `Host` header: `169.254.170.23`, `169.254.170.23:80`, `[fd00:ec2::23]`,
/// `[fd00:ec2::23]:80` (and a bare IPv6 address, which some clients send).
pub fn host_ip(host: &str) -> Option<IpAddr> {
    if let Some(rest) = host.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok());
        return if port_ok { ip.parse().ok() } else { None };
    }
    if let Ok(ip) = host.parse() {
        return Some(ip);
    }
    let (ip, port) = host.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}
