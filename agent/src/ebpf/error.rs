//! What went wrong loading, attaching or reading the programs, and at which step.

use std::path::PathBuf;

use aya::{maps::MapError, programs::ProgramError};

/// What went wrong, and at which step.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("reading /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    #[error("no cgroup2 filesystem in /proc/self/mountinfo")]
    NoCgroup2Mount,
    #[error(
        "the cgroup2 mount at {} is not the cgroup hierarchy's root: {why}; cgroup ids and levels \
         would not be the host's (run the agent in the host's cgroup namespace, with the host's \
         cgroup2 mount)",
        mount_point.display()
    )]
    NotHierarchyRoot { mount_point: PathBuf, why: String },
    #[error("cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod parent {} is not below the cgroup2 mount {}", path.display(), mount.display())]
    PodParentOutsideMount { path: PathBuf, mount: PathBuf },
    #[error("{0} pod parents exist, the programs check at most {max}", max = agent_common::MAX_POD_PARENTS)]
    TooManyPodParents(usize),
    #[error("invalid watch targets: {0}")]
    Targets(String),
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {0} not found in the eBPF object")]
    MissingProgram(&'static str),
    #[error("program {name}: {step}")]
    Program {
        name: &'static str,
        /// `type`, `load` or `attach`.
        step: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {0} not found in the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {step}")]
    Map {
        name: &'static str,
        /// `type`, `write`, `read`, `remove`, `open`.
        step: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is not a hash map")]
    NotAHashMap(&'static str),
    #[error("map {name}: duplicating its file descriptor")]
    DupMap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("opening cgroup {}", path.display())]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(super) fn map_error(name: &'static str, step: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, step, source }
}

pub(super) fn program_step(
    name: &'static str,
    step: &'static str,
) -> impl Fn(ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, step, source }
}
