//! Types and names shared by the eBPF programs (`agent-ebpf`) and the agent's userspace.
//!
//! Every type here is `#[repr(C)]` with explicit padding so both sides agree on the layout byte for
//! byte; the `user` feature adds the `aya::Pod` impls the agent needs to read and write the maps.
//!
//! Addresses are always 16-byte IPv6 in network byte order, IPv4 as v4-mapped (`::ffff:a.b.c.d`):
//! a v4 client, a v6 client and a v4 client on an `AF_INET6` socket must all produce the key the
//! server builds from what `accept()` returned.
#![no_std]

/// `Array` of one [`WatchConfig`]: which destinations the connect programs watch, and the limit.
pub const WATCH_CONFIG_MAP: &str = "WATCH_CONFIG";
/// LRU hash socket cookie (`u64`) → [`CallerRecord`], written by connect4/6, consumed by sock_ops.
pub const CALLER_BY_COOKIE_MAP: &str = "CALLER_BY_COOKIE";
/// LRU hash [`ConnKey`] → [`CallerRecord`], written by sock_ops, consumed by the agent on accept.
pub const CALLER_BY_CONN_MAP: &str = "CALLER_BY_CONN";
/// LRU hash cgroup id (`u64`) → [`CgroupConnectState`]: token bucket and counters per cgroup.
pub const CONNECT_STATE_MAP: &str = "CONNECT_STATE";

/// Entries in each of the two caller maps. A record lives from `connect()` until the agent accepts
/// the connection, so this bounds connects in flight to the agent, not connections on the node.
pub const CALLER_MAP_ENTRIES: u32 = 16384;
/// Entries in [`CONNECT_STATE_MAP`]: one per cgroup (container) that connected to the agent.
pub const CONNECT_STATE_ENTRIES: u32 = 16384;

/// The process that called `connect()` to the agent, as seen by the kernel at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerRecord {
    /// cgroup v2 id of the caller (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Cookie of the caller's network namespace (0 where the kernel cannot tell).
    pub netns_cookie: u64,
    /// Thread group id: what userspace calls the pid.
    pub tgid: u32,
    /// Thread id: what the kernel calls the pid.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `task->comm`, NUL-padded.
    pub comm: [u8; 16],
}

/// One TCP connection as both ends name it: client and server address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// IPv6 (or v4-mapped IPv4) address, network byte order.
    pub client_addr: [u8; 16],
    /// IPv6 (or v4-mapped IPv4) address, network byte order.
    pub server_addr: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    /// Host byte order.
    pub server_port: u16,
    /// Always zero: hash map keys are compared byte for byte.
    pub _pad: u32,
}

/// What the connect programs watch and how hard they limit it. Index 0 of [`WATCH_CONFIG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchConfig {
    /// The agent's IPv4 address as the kernel stores it (network byte order).
    pub ip4: u32,
    /// The agent's IPv6 address as the kernel stores it (four network-order words).
    pub ip6: [u32; 4],
    /// The agent's IPv4 port, host order; 0 = no IPv4 listener is watched.
    pub port4: u16,
    /// The agent's IPv6 port, host order; 0 = no IPv6 listener is watched.
    pub port6: u16,
    /// Token bucket applied to every cgroup's connects to the agent.
    pub limit: ConnectLimit,
}

/// A token bucket: `rate` connects per second refill it, up to `burst`. `rate == 0` turns it off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectLimit {
    pub rate: u32,
    pub burst: u32,
}

/// Per-cgroup state of the token bucket and counters, updated with atomics by the eBPF side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupConnectState {
    /// The bucket as GCRA keeps it: the "theoretical arrival time" (`bpf_ktime_get_ns`) of the next
    /// connect. A single word, so one compare-and-swap updates the bucket atomically.
    pub tat_ns: u64,
    /// Connects to the agent let through.
    pub allowed: u64,
    /// Connects to the agent refused (`EPERM`) by the token bucket.
    pub denied: u64,
}

/// The 12-byte prefix of a v4-mapped IPv6 address (`::ffff:0:0/96`).
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are #[repr(C)], made only of integers and integer arrays, with explicit padding.
    unsafe impl aya::Pod for super::CallerRecord {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::WatchConfig {}
    unsafe impl aya::Pod for super::CgroupConnectState {}
}

// The layouts are part of the contract with the kernel maps: fail the build if padding sneaks in.
const _: () = assert!(core::mem::size_of::<CallerRecord>() == 48);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 40);
const _: () = assert!(core::mem::size_of::<WatchConfig>() == 32);
const _: () = assert!(core::mem::size_of::<CgroupConnectState>() == 24);
