//! Least privilege for the serving life: once the eBPF programs are attached and every socket is
//! bound, the server gives up every capability, on every thread.
//!
//! What each phase needs (measured by `tests/tests/capabilities.rs`):
//! - start-up: `CAP_NET_BIND_SERVICE` (bind port 80), `CAP_BPF`, `CAP_PERFMON` and
//!   `CAP_NET_ADMIN` (load the programs, create their maps, attach them to the cgroup);
//! - serving: nothing. The maps are read and written through the descriptors the start-up
//!   opened (`bpf(2)` checks capabilities when a map or program is created or opened by id, not
//!   on the map operations of a descriptor one holds); the links detach when their descriptors
//!   close; the audit log, the agent's own shared credentials file (`--rotate-credentials`) and
//!   the cgroup tree are files uid 0 owns or may read, which needs no capability.
//!
//! Capabilities belong to threads, not to the process, and the async runtime's threads exist
//! before the programs are attached. So the drop runs on each thread: a real-time signal is sent
//! to every thread of the process (as libcap's `psx` and Go's `AllThreadsSyscall` do), whose
//! handler clears that thread's sets with raw system calls (async-signal-safe), and the result is
//! read back from `/proc/self/task/*/status` until every thread shows it. Threads made later
//! inherit the empty sets of the thread that makes them. `no_new_privs` is set too, so that no
//! `execve` could gain capabilities again; the bounding set is emptied where the agent holds
//! `CAP_SETPCAP` (as root outside a container); in a container without it, the runtime's
//! bounding set (the chart's four capabilities) stays, and `no_new_privs` with empty permitted
//! sets keeps it unusable.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// `CAP_SETPCAP`: needed to drop from the bounding set.
const CAP_SETPCAP: u32 = 8;
/// How long the threads get to run the drop.
const DROP_DEADLINE: Duration = Duration::from_secs(5);

/// Why the capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("installing the signal handler that drops a thread's capabilities")]
    Handler(#[source] io::Error),
    #[error("listing the process's threads in /proc/self/task")]
    Threads(#[source] io::Error),
    #[error("dropping the capabilities of this thread")]
    Own(#[source] io::Error),
    #[error("threads {0:?} still hold capabilities after {DROP_DEADLINE:?}")]
    Remaining(Vec<i32>),
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Whether the bounding set is to be emptied too (the caller held `CAP_SETPCAP`).
static DROP_BOUNDING: AtomicBool = AtomicBool::new(false);

/// The calling thread's own drop. Only raw system calls: it runs in a signal handler.
fn drop_this_thread() -> bool {
    // SAFETY: prctl and capset take no pointer but the two local structs, which outlive the
    // calls; all are async-signal-safe system calls acting on the calling thread.
    unsafe {
        // prctl reads its arguments as unsigned longs: pass them so (a variadic int would
        // leave the upper half undefined).
        let none: libc::c_ulong = 0;
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            none,
            none,
            none,
        );
        if DROP_BOUNDING.load(Ordering::Relaxed) {
            // Bounding before the rest: dropping from it needs CAP_SETPCAP in effect.
            let mut cap: libc::c_ulong = 0;
            while libc::prctl(libc::PR_CAPBSET_READ, cap, none, none, none) >= 0 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, none, none, none);
                cap += 1;
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            none,
            none,
            none,
        );
        let header = CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) == 0
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    let errno = io::Error::last_os_error().raw_os_error();
    drop_this_thread();
    // Leave errno as the interrupted code had it.
    if let Some(errno) = errno {
        // SAFETY: the thread's own errno location.
        unsafe { *libc::__errno_location() = errno };
    }
}

/// Drops every capability of every thread of the process, for good.
///
/// # Errors
/// The handler could not be installed, this thread's drop failed, or some thread still showed
/// capabilities after [`DROP_DEADLINE`].
pub fn drop_all() -> Result<(), CapabilityError> {
    let signal = libc::SIGRTMIN() + 3;
    DROP_BOUNDING.store(holds(CAP_SETPCAP), Ordering::Relaxed);
    // SAFETY: a zeroed sigaction with a plain handler; the handler only makes system calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut action.sa_mask);
        if libc::sigaction(signal, &raw const action, std::ptr::null_mut()) != 0 {
            return Err(CapabilityError::Handler(io::Error::last_os_error()));
        }
    }
    if !drop_this_thread() {
        return Err(CapabilityError::Own(io::Error::last_os_error()));
    }
    // SAFETY: getpid takes nothing.
    let (pid, me) = (unsafe { libc::getpid() }, gettid());
    let started = Instant::now();
    loop {
        let holding: Vec<i32> = threads()?
            .into_iter()
            .filter(|&tid| tid != me && thread_holds_any(tid))
            .collect();
        if holding.is_empty() {
            return Ok(());
        }
        if started.elapsed() > DROP_DEADLINE {
            return Err(CapabilityError::Remaining(holding));
        }
        for tid in holding {
            // SAFETY: tgkill to a thread of our own process; one that ended meanwhile is ESRCH.
            unsafe {
                libc::syscall(libc::SYS_tgkill, pid, tid, signal);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The ids of the process's threads.
fn threads() -> Result<Vec<i32>, CapabilityError> {
    let dir = std::fs::read_dir("/proc/self/task").map_err(CapabilityError::Threads)?;
    Ok(dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect())
}

/// The capability sets of one thread, as `/proc` shows them: `(CapInh, CapPrm, CapEff, CapBnd,
/// CapAmb)`. `None` when the thread is gone.
pub fn sets_of(tid: i32) -> Option<[u64; 5]> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let mut sets = [0u64; 5];
    for (i, name) in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
        .iter()
        .enumerate()
    {
        let value = status.lines().find_map(|l| l.strip_prefix(name))?;
        sets[i] = u64::from_str_radix(value.trim(), 16).ok()?;
    }
    Some(sets)
}

/// Whether a thread still holds something the drop removes (a gone thread holds nothing).
fn thread_holds_any(tid: i32) -> bool {
    let bounding = DROP_BOUNDING.load(Ordering::Relaxed);
    sets_of(tid).is_some_and(|[inh, prm, eff, bnd, amb]| {
        inh | prm | eff | amb != 0 || (bounding && bnd != 0)
    })
}

/// Whether the calling thread has `cap` in effect.
fn holds(cap: u32) -> bool {
    sets_of(gettid()).is_some_and(|[_, _, eff, _, _]| eff & (1 << cap) != 0)
}

/// The calling thread's id.
fn gettid() -> i32 {
    // SAFETY: gettid takes nothing and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    i32::try_from(tid).unwrap_or(0)
}
