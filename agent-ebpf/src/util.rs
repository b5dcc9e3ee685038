//! Helpers the programs share: return values, the watched listeners, address shapes.

use core::ptr::{addr_of, read_volatile};

use crate::maps::CONFIG;

/// Return value of a cgroup sock_addr program that lets the connect go ahead.
pub const ALLOW: i32 = 1;
/// Return value that refuses it: the caller's `connect()` fails with `EPERM`.
pub const REFUSE: i32 = 0;
/// What a cgroup sock_ops program must always return: 0 makes the kernel discard the `reply` of
/// every sock_ops program on the socket (ours never sets one, others do: timeouts, windows, ECN).
pub const SOCK_OPS_OK: u32 = 1;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const IPPROTO_TCP: u32 = 6;
pub const SOCK_STREAM: u32 = 1;

/// The third word of a v4-mapped IPv6 address (`::ffff:a.b.c.d`) as the kernel stores it.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The watched IPv4 listener, from the global.
#[inline(always)]
pub fn watched4() -> (u32, u16) {
    // SAFETY: a plain global; volatile so that the value set at load is read, not the zero.
    unsafe {
        (
            read_volatile(addr_of!(CONFIG.ip4)),
            read_volatile(addr_of!(CONFIG.port4)),
        )
    }
}

/// The watched IPv6 listener, from the global.
#[inline(always)]
pub fn watched6() -> ([u32; 4], u16) {
    // SAFETY: as in watched4.
    unsafe {
        (
            [
                read_volatile(addr_of!(CONFIG.ip6[0])),
                read_volatile(addr_of!(CONFIG.ip6[1])),
                read_volatile(addr_of!(CONFIG.ip6[2])),
                read_volatile(addr_of!(CONFIG.ip6[3])),
            ],
            read_volatile(addr_of!(CONFIG.port6)),
        )
    }
}

/// Whether an IPv6 destination is the agent: its IPv6 listener, or its IPv4 one v4-mapped (a v4
/// client on an `AF_INET6` socket, `::ffff:a.b.c.d`, triggers only connect6).
#[inline(always)]
pub fn is_agent6(ip6: [u32; 4], port: u16) -> bool {
    let (watch_ip6, watch_port6) = watched6();
    let (watch_ip4, watch_port4) = watched4();
    let to_ip6 = watch_port6 != 0 && port == watch_port6 && ip6 == watch_ip6;
    let to_ip4 = watch_port4 != 0
        && port == watch_port4
        && ip6[0] == 0
        && ip6[1] == 0
        && ip6[2] == V4_MAPPED_WORD
        && ip6[3] == watch_ip4;
    to_ip6 || to_ip4
}

/// `user_port` is a network-order u16 in the low 16 bits.
#[inline(always)]
pub fn port_of_user_port(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
pub fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Network-order words as the kernel stores them, to the same bytes.
#[inline(always)]
pub fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = w.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}
