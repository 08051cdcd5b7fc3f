//! Exec tracing: every successful `execve` by a process in one node instance's cgroup2 subtree,
//! from `ebpf/exec.bpf.c` on the `sched_process_exec` tracepoint (as a BTF tracepoint, kernel
//! 5.5+ with BTF; no tracefs mount needed), read back through a ring buffer.
//!
//! The filter is in the kernel: the program compares the exec'ing process's cgroup2 ancestor at
//! the instance's level with the instance's id, so other processes on the host cost one helper
//! call and one compare. The link is held by file descriptor and never pinned: when the
//! [`ExecTracer`] (or the daemon) goes away, the kernel detaches it.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader};

use crate::bpf::EXEC_OBJ;

/// Bytes of argv an event carries at most (`AN_EXEC_ARGV` in `ebpf/include/exec.h`).
pub const ARGV_BYTES: usize = 256;
const FILENAME_BYTES: usize = 256;
const EVENT_BYTES: usize = 8 + 8 + 6 * 4 + FILENAME_BYTES + ARGV_BYTES;
const PROGRAM: &str = "exec_trace";

/// Errors from loading or attaching the exec tracer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot read cgroup2 directory {path}: {source} (exec tracing needs the node's cgroup2 \
         subtree; run `agentnode doctor`)"
    )]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the kernel's BTF (exec tracing needs /sys/kernel/btf/vmlinux): {0}")]
    Btf(#[from] aya::BtfError),
    #[error("cannot load the exec tracing BPF object: {0} (run `agentnode doctor` as root)")]
    Load(#[from] aya::EbpfError),
    #[error("cannot load or attach the exec tracer: {0} (run `agentnode doctor`)")]
    Program(#[from] aya::programs::ProgramError),
    #[error("exec tracer map: {0}")]
    Map(#[from] aya::maps::MapError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One exec inside a traced task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecEvent {
    /// The cgroup2 id of the task (the instance's child cgroup the process is under).
    pub cgroup: u64,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub time_ns: u64,
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub filename: Vec<u8>,
    /// The first [`ARGV_BYTES`] of argv, arguments NUL-separated.
    pub argv: Vec<u8>,
    /// Whether argv was longer than what `argv` holds.
    pub argv_truncated: bool,
}

impl ExecEvent {
    fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < EVENT_BYTES {
            return None;
        }
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let filename_len = (u32_at(28) as usize).min(FILENAME_BYTES);
        let argv_len = (u32_at(32) as usize).min(ARGV_BYTES);
        let argv_total = u32_at(36) as usize;
        let names = 40;
        let argv = names + FILENAME_BYTES;
        Some(Self {
            cgroup: u64_at(0),
            time_ns: u64_at(8),
            pid: u32_at(16),
            ppid: u32_at(20),
            uid: u32_at(24),
            filename: b[names..names + filename_len].to_vec(),
            argv: b[argv..argv + argv_len].to_vec(),
            argv_truncated: argv_total > argv_len,
        })
    }
}

/// The cgroup2 id of `dir`: the kernel's id is the directory's inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| Error::Cgroup {
            path: dir.to_owned(),
            source,
        })
}

/// The tracer for one node instance; dropping it detaches the program.
pub struct ExecTracer {
    // Owns the program and, through it, the link.
    _ebpf: Ebpf,
    events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for ExecTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecTracer").finish_non_exhaustive()
    }
}

impl ExecTracer {
    /// Traces every exec under `instance`, a cgroup2 directory `level` levels below the
    /// hierarchy's root (the root is level 0; count from the real root, not a namespace's).
    ///
    /// # Panics
    ///
    /// If the embedded object lacks its program or maps: a build error, not a runtime one.
    pub fn attach(instance: &Path, level: u32) -> Result<Self> {
        let id = cgroup_id(instance)?;
        let mut ebpf = EbpfLoader::new()
            .override_global("instance_cgroup", &id, true)
            .override_global("instance_level", &level, true)
            .load(EXEC_OBJ)?;
        let btf = Btf::from_sys_fs()?;
        let program: &mut BtfTracePoint = ebpf
            .program_mut(PROGRAM)
            .expect("exec.bpf.c defines exec_trace")
            .try_into()?;
        program.load("sched_process_exec", &btf)?;
        program.attach()?;
        let events =
            RingBuf::try_from(ebpf.take_map("events").expect("exec.bpf.c defines events"))?;
        let lost = PerCpuArray::try_from(ebpf.take_map("lost").expect("exec.bpf.c defines lost"))?;
        Ok(Self {
            _ebpf: ebpf,
            events,
            lost,
        })
    }

    /// Every event queued since the last call (non-blocking).
    pub fn events(&mut self) -> Vec<ExecEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(e) = ExecEvent::parse(&item) {
                out.push(e);
            }
        }
        out
    }

    /// Execs that found the ring buffer full since the tracer was attached.
    pub fn lost(&self) -> Result<u64> {
        Ok(self.lost.get(&0, 0)?.iter().sum())
    }

    /// Becomes readable when events are queued (for an event loop's reader).
    #[must_use]
    pub fn events_fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }
}
