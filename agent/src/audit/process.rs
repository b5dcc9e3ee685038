//! The caller's process as Tetragon names it, so that an audit record joins with Tetragon's events
//! for the same process: Tetragon's `exec_id` is base64 (standard, padded) of
//! `"<node name>:<ktime>:<pid>"`, where `ktime` is the process's start in ns since boot. For the
//! processes Tetragon reads from /proc when it starts, `ktime` is `/proc/<pid>/stat`'s `starttime`
//! (clock ticks since boot) × 10⁹ / 100, which is what [`start_ns`] reads; for a process Tetragon
//! saw `execve`, it is the kernel's monotonic clock at the exec, a little after the fork's
//! `starttime` (`docs/audit-log.md`, "Joining with Tetragon", says how to join then).
//!
//! Read on the writer thread, a few ms after the request: a process that has exited by then has
//! no start time in its record. The pid is the kernel's (the node's PID namespace), so the agent
//! must see the node's /proc (`hostPID`) for this; elsewhere the field is left out.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Linux's USER_HZ, the unit of `starttime`: 100 on every architecture the agent (and Tetragon,
/// which assumes it too) runs on.
const USER_HZ: u64 = 100;

/// The start of process `pid`, ns since boot, from `/proc/<pid>/stat`; `None` when it is gone or
/// not visible.
pub(super) fn start_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    starttime_ns(&stat)
}

/// `starttime` (field 22) of a `/proc/<pid>/stat` line, in ns. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses itself: fields are counted after the last `)`.
fn starttime_ns(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    // Field 3 (state) is the first after the name, so field 22 is the 20th.
    let ticks: u64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    ticks.checked_mul(1_000_000_000 / USER_HZ)
}

/// One `starttime` tick (and `/proc/uptime`'s resolution), in ns.
const TICK_NS: u64 = 1_000_000_000 / USER_HZ;

/// The start of process `pid`, ns since boot, if it started no later than `at` (the request's
/// answer): a process that started after it is a newer one the kernel gave the caller's pid to,
/// once the caller had exited, and is left out rather than named as the caller.
pub(super) fn start_ns_before(pid: u32, at: std::time::SystemTime) -> Option<u64> {
    let start = start_ns(pid)?;
    let since = std::time::SystemTime::now()
        .duration_since(at)
        .unwrap_or_default();
    let since = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
    let at_ns = uptime_ns()?.saturating_sub(since).saturating_add(TICK_NS);
    (start <= at_ns).then_some(start)
}

/// Ns since boot (`/proc/uptime`: the boot-time clock that `starttime` counts, in hundredths
/// of a second).
fn uptime_ns() -> Option<u64> {
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let (secs, hundredths) = uptime.split_whitespace().next()?.split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    let hundredths: u64 = hundredths.get(..2)?.parse().ok()?;
    Some(secs * 1_000_000_000 + hundredths * TICK_NS)
}

/// Tetragon's `exec_id` of the process `pid` of node `node` started at `start_ns`.
pub(super) fn exec_id(node: &str, start_ns: u64, pid: u32) -> String {
    STANDARD.encode(format!("{node}:{start_ns}:{pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starttime_is_field_22_counted_after_the_command_name() {
        // A command name with a space and a parenthesis, as a process may set it.
        let stat = "4242 (my (app) x) S 1 4242 4242 0 -1 4194560 150 0 0 0 1 2 0 0 20 0 1 0 \
                    123456 1000 100 18446744073709551615";
        assert_eq!(starttime_ns(stat), Some(123_456 * 10_000_000));
        assert_eq!(starttime_ns("4242 (x) S 1"), None);
        assert_eq!(starttime_ns("garbage"), None);
    }

    #[test]
    fn exec_id_is_tetragons_encoding() {
        // base64("node-a:1230000000:4242")
        assert_eq!(
            exec_id("node-a", 1_230_000_000, 4242),
            "bm9kZS1hOjEyMzAwMDAwMDA6NDI0Mg=="
        );
    }

    #[test]
    fn reads_this_process_start() {
        let ours = start_ns(std::process::id()).unwrap();
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap();
        let up_s: f64 = uptime.split_whitespace().next().unwrap().parse().unwrap();
        // Started after boot and before now.
        #[allow(clippy::cast_precision_loss)]
        let started_s = ours as f64 / 1e9;
        assert!(
            started_s > 0.0 && started_s <= up_s + 0.01,
            "{started_s} {up_s}"
        );
        assert_eq!(start_ns(u32::MAX), None);
    }

    #[test]
    fn a_process_that_started_after_the_request_is_not_the_caller() {
        let pid = std::process::id();
        let now = std::time::SystemTime::now();
        assert_eq!(start_ns_before(pid, now), start_ns(pid));
        // A request answered before this process started: its pid was someone else's then.
        let long_ago = now - std::time::Duration::from_secs(365 * 24 * 3600);
        assert_eq!(start_ns_before(pid, long_ago), None);
    }
}
