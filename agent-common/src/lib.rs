//! Types and names shared by the eBPF programs (`agent-ebpf`) and the agent's userspace.
//!
//! Every type here is `#[repr(C)]` with explicit padding so both sides agree on the layout byte for
//! byte; the `user` feature adds the `aya::Pod` impls the agent needs to read and write the maps.
//!
//! Addresses are always 16-byte IPv6 in network byte order, IPv4 as v4-mapped (`::ffff:a.b.c.d`):
//! a v4 client, a v6 client and a v4 client on an `AF_INET6` socket must all produce the key the
//! server builds from what `accept()` returned.
//!
//! A connection's life, and where its record lives:
//! 1. `connect()`: connect4/6 check the open-connection cap and token bucket of the caller's pod
//!    (every caller outside pods shares one key, [`NON_POD_KEY`]), then record the caller under
//!    the socket cookie ([`CALLER_BY_COOKIE_MAP`]). A counter or record that cannot be made
//!    refuses the connect (`EPERM`): nothing goes uncounted.
//! 2. `BPF_SOCK_OPS_TCP_CONNECT_CB` (same syscall, source port bound): sock_ops moves the record
//!    to the 4-tuple ([`CALLER_BY_CONN_MAP`]), stamped with the socket's cookie, counts the
//!    connection as open for its pod ([`OPEN_BY_POD_MAP`]) and asks for the socket's state
//!    changes. It also notes the 4-tuple under the cookie ([`CONN_BY_COOKIE_MAP`]). A 4-tuple
//!    already recorded from another network namespace stays with its first owner for now
//!    ([`EVENT_TUPLE_COLLISION`]); the newcomer's record stays pending under its cookie.
//! 3. `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB` (the client got the agent's SYN-ACK; its ACK has not
//!    left yet, so this comes before the agent can accept): the record is marked established. A
//!    contested 4-tuple goes to the socket that gets here, which only the real peer of the
//!    agent's connection can: the other owner's record is replaced.
//! 4. The agent accepts and reads the record by 4-tuple (it does not delete it), and uses it only
//!    if established.
//! 5. The client socket is released (`close()`; a `cgroup/sock_release` program, which finds the
//!    4-tuple by cookie), enters `TCP_CLOSE_WAIT` (the agent closed its end) or `TCP_CLOSE`
//!    (reset, timed out, refused, disconnected; sock_ops' state callback), whichever comes first:
//!    the record is deleted and uncounted, by the socket whose cookie it carries and no other. No
//!    record outlives its connection, and whoever deletes the record uncounts it, so each count is
//!    undone exactly once. TCP keepalive, set on the client socket at step 2, ends a connection the
//!    agent never accepted (its probe meets a reset) within seconds of the agent forgetting it.
#![no_std]

/// `.rodata` global ([`WatchConfig`]), set once at load: what the programs watch and how hard they
/// limit it. A global, not a map, so that an unrelated connect costs a few loads and compares and
/// no map lookup.
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// `Array` of one [`PodParents`]: the cgroups whose children are pods. A map, not a global, so
/// that userspace can add a parent that appears after the agent started.
pub const POD_PARENTS_MAP: &str = "POD_PARENTS";
/// LRU hash socket cookie (`u64`) → [`CallerRecord`], written by connect4/6, consumed by sock_ops
/// within the same `connect()` call.
pub const CALLER_BY_COOKIE_MAP: &str = "CALLER_BY_COOKIE";
/// Hash [`ConnKey`] → [`CallerRecord`], written by sock_ops at `TCP_CONNECT_CB`, read by the agent on
/// accept, deleted by sock_ops when the client socket closes.
pub const CALLER_BY_CONN_MAP: &str = "CALLER_BY_CONN";
/// Hash socket cookie (`u64`) → [`ConnKey`], written by sock_ops at `TCP_CONNECT_CB`, so that the
/// sock_release program (which cannot read a socket's source port) finds the record to delete.
pub const CONN_BY_COOKIE_MAP: &str = "CONN_BY_COOKIE";
/// LRU hash pod key (`u64`, see [`CallerRecord::pod_key`]) → [`CgroupConnectState`]: the token
/// bucket. Untouched while the connect rate is 0.
pub const CONNECT_STATE_MAP: &str = "CONNECT_STATE";
/// Hash pod key (`u64`) → [`OpenState`]: connections to the agent a pod holds open.
pub const OPEN_BY_POD_MAP: &str = "OPEN_BY_POD";
/// Per-CPU array of [`EVENT_COUNT`] `u64` counters, indexed by the `EVENT_*` constants.
pub const EVENTS_MAP: &str = "EVENTS";
/// Array of one `u64`, touched only by the compare-and-swap probe program.
pub const PROBE_MAP: &str = "PROBE";

/// The key of every caller outside the pod hierarchy in [`OPEN_BY_POD_MAP`] and
/// [`CONNECT_STATE_MAP`]: all of them share one budget, whatever cgroup they are in. No cgroup has
/// id 0.
pub const NON_POD_KEY: u64 = 0;

/// Entries compiled into the object; userspace sizes them at load.
pub const CALLER_BY_COOKIE_ENTRIES: u32 = 4096;
/// See [`CALLER_BY_COOKIE_ENTRIES`].
pub const CALLER_BY_CONN_ENTRIES: u32 = 16384;
/// See [`CALLER_BY_COOKIE_ENTRIES`]; [`CONN_BY_COOKIE_MAP`] has as many entries.
pub const CONNECT_STATE_ENTRIES: u32 = 8192;
/// See [`CALLER_BY_COOKIE_ENTRIES`].
pub const OPEN_BY_POD_ENTRIES: u32 = 8192;

/// Most pod parents the programs check, most specific first.
pub const MAX_POD_PARENTS: usize = 16;

/// [`EVENTS_MAP`] index: the token bucket's compare-and-swap lost every retry to other CPUs; the
/// connect was let through (contention is never a refusal).
pub const EVENT_LIMITER_CONTENDED: u32 = 0;
/// No token bucket could be created (map full): the connect was let through.
pub const EVENT_LIMITER_STATE_FULL: u32 = 1;
/// No open-connection counter could be created (map full): the connect was refused.
pub const EVENT_OPEN_STATE_FULL: u32 = 2;
/// The record could not be written under the socket cookie: the connect was refused.
pub const EVENT_COOKIE_RECORD_FAILED: u32 = 3;
/// The record could not be written under the 4-tuple (map full, beyond the sizing from
/// `--max-pods`): the connection is unrecorded, and the agent refuses it under `enforce`.
pub const EVENT_CONN_RECORD_FAILED: u32 = 4;
/// A record left under a 4-tuple that a new connection of the same network namespace now uses
/// was removed: its socket is gone (two live sockets of one namespace cannot share a 4-tuple) and
/// its close was never seen, e.g. another program cleared our state callback.
pub const EVENT_LEFTOVER_REMOVED: u32 = 5;
/// A connect was refused: the pod holds its maximum of open connections to the agent.
pub const EVENT_OPEN_CAP_REFUSED: u32 = 6;
/// A connect was refused by the pod's token bucket.
pub const EVENT_RATE_REFUSED: u32 = 7;
/// A connection reached `TCP_CONNECT_CB` with no record under its cookie (evicted): it goes
/// unrecorded, and the agent refuses it under `enforce`.
pub const EVENT_RECORD_MISSING: u32 = 8;
/// A connection's 4-tuple was already recorded from another network namespace: the first
/// owner's record stays, the newcomer goes unrecorded.
pub const EVENT_TUPLE_COLLISION: u32 = 9;
/// A socket tried to delete a record another socket made (same 4-tuple): refused.
pub const EVENT_FOREIGN_RELEASE: u32 = 10;
/// Number of `EVENT_*` counters.
pub const EVENT_COUNT: u32 = 11;

/// The process that called `connect()` to the agent, as seen by the kernel at that moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerRecord {
    /// cgroup v2 id of the caller (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Cookie of the caller's network namespace (0 where the kernel cannot tell).
    pub netns_cookie: u64,
    /// The pod cgroup the caller is in, found through the pod parents: the child of the first
    /// parent that is an ancestor of the caller's cgroup. 0 when no parent matched.
    pub pod_cgroup_id: u64,
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) when the record was made, refreshed when the
    /// connection is established.
    pub ktime_ns: u64,
    /// Thread group id: what userspace calls the pid.
    pub tgid: u32,
    /// Thread id: what the kernel calls the pid.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `task->comm`, NUL-padded.
    pub comm: [u8; 16],
    /// The [`OpenState::epoch`] of the pod counter this connection is counted in; 0 = not counted.
    pub open_epoch: u64,
    /// Cookie of the client socket that made the record: only that socket deletes it.
    pub sock_cookie: u64,
    /// 1 once the client socket completed its handshake (`ACTIVE_ESTABLISHED_CB`, before its ACK
    /// leaves): the agent accepts only connections whose client got this far, and a socket of
    /// another namespace holding the same 4-tuple never does (the agent's SYN-ACK is routed to
    /// the real client), so the agent hands out only established records.
    pub established: u32,
    pub _pad: u32,
}

impl CallerRecord {
    /// What the connect limits are keyed by: the pod, or [`NON_POD_KEY`] for every caller
    /// outside pods (one budget, however many cgroups they make).
    #[must_use]
    pub const fn pod_key(&self) -> u64 {
        pod_key(self.pod_cgroup_id)
    }
}

/// The key of a caller's connect limits: its pod cgroup, or [`NON_POD_KEY`] outside pods.
#[must_use]
pub const fn pod_key(pod_cgroup_id: u64) -> u64 {
    if pod_cgroup_id != 0 {
        pod_cgroup_id
    } else {
        NON_POD_KEY
    }
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

/// What the programs watch and how hard they limit it: the [`CONFIG_GLOBAL`] global.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchConfig {
    /// The agent's IPv4 address as the kernel stores it (network byte order).
    pub ip4: u32,
    /// The agent's IPv6 address as the kernel stores it (four network-order words).
    pub ip6: [u32; 4],
    /// The agent's IPv4 port, host order; 0 = no IPv4 listener is watched.
    pub port4: u16,
    /// The agent's IPv6 port, host order; 0 = no IPv6 listener is watched.
    pub port6: u16,
    /// Token bucket applied to every pod's connects to the agent.
    pub limit: ConnectLimit,
    /// Most connections to the agent one pod may hold open; 0 = no cap (and no counting).
    pub max_open_per_pod: u32,
    pub _pad: u32,
}

impl WatchConfig {
    /// Watches nothing: what the object holds until userspace sets it at load.
    pub const EMPTY: WatchConfig = WatchConfig {
        ip4: 0,
        ip6: [0; 4],
        port4: 0,
        port6: 0,
        limit: ConnectLimit { rate: 0, burst: 0 },
        max_open_per_pod: 0,
        _pad: 0,
    };
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// A token bucket: `rate` connects per second refill it, up to `burst`. `rate == 0` turns it off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectLimit {
    pub rate: u32,
    pub burst: u32,
}

/// A cgroup whose children are pods, and its depth below the cgroup2 hierarchy root (root = 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodParent {
    pub id: u64,
    pub level: u32,
    pub _pad: u32,
}

/// Index 0 of [`POD_PARENTS_MAP`]: the first `count` entries are used, deepest first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodParents {
    pub count: u32,
    pub _pad: u32,
    pub parents: [PodParent; MAX_POD_PARENTS],
}

/// Per-pod state of the token bucket and counters, updated with atomics by the eBPF side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupConnectState {
    /// The bucket as GCRA keeps it: the "theoretical arrival time" (`bpf_ktime_get_ns`) of the next
    /// connect. A single word, so one compare-and-swap updates the bucket atomically.
    pub tat_ns: u64,
    /// Connects to the agent let through by the bucket.
    pub allowed: u64,
    /// Connects to the agent refused (`EPERM`) by the bucket.
    pub denied: u64,
    /// Connects let through because the compare-and-swap kept losing to other CPUs.
    pub contended: u64,
}

/// Per-pod count of open connections to the agent, updated with atomics by the eBPF side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenState {
    /// When this counter was created (`bpf_ktime_get_ns`, never 0). A connection is uncounted
    /// only from the counter it was counted in: if userspace removes a counter (its pod looked
    /// gone) and a new one is made, the old connections' closes cannot drive the new one below
    /// zero.
    pub epoch: u64,
    /// Connections counted at `TCP_CONNECT_CB` and not yet closed.
    pub open: u64,
    /// Connects refused (`EPERM`) because `open` was at the cap.
    pub refused: u64,
}

/// The 12-byte prefix of a v4-mapped IPv6 address (`::ffff:0:0/96`).
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are #[repr(C)], made only of integers and integer arrays, with explicit padding.
    unsafe impl aya::Pod for super::CallerRecord {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::WatchConfig {}
    unsafe impl aya::Pod for super::PodParents {}
    unsafe impl aya::Pod for super::CgroupConnectState {}
    unsafe impl aya::Pod for super::OpenState {}
}

// The layouts are part of the contract with the kernel maps: fail the build if padding sneaks in.
const _: () = assert!(core::mem::size_of::<CallerRecord>() == 88);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 40);
const _: () = assert!(core::mem::size_of::<WatchConfig>() == 40);
const _: () = assert!(core::mem::size_of::<PodParent>() == 16);
const _: () = assert!(core::mem::size_of::<PodParents>() == 8 + 16 * MAX_POD_PARENTS);
const _: () = assert!(core::mem::size_of::<CgroupConnectState>() == 32);
const _: () = assert!(core::mem::size_of::<OpenState>() == 24);
