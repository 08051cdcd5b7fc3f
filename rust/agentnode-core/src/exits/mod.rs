//! Exit statuses of tasks whose node agent is not their parent: from `ebpf/exits.bpf.c` on the
//! `sched_process_exit` tracepoint, into a hash map of watched pids.
//!
//! Unlike the other BPF objects here, the map and the link are pinned under a bpffs directory:
//! a task started to outlive its node agent may end while no agent runs (reaped by init, its
//! status gone with it), and the next agent reads the status the kernel recorded. The map is
//! pinned by name, so every load reuses the one pinned before; the link is attached once and
//! then held by its pin. [`ExitRecorder::remove`] takes both away.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::BtfTracePoint;
use aya::{Btf, EbpfLoader};

use crate::bpf::EXITS_OBJ;

const PROGRAM: &str = "exit_record";
const MAP: &str = "an_exits";
const LINK: &str = "exit_link";

/// Errors from loading, pinning or reading the exit recorder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot make the bpffs directory {path}: {source} (is bpffs mounted at /sys/fs/bpf?)")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the kernel's BTF (exit recording needs /sys/kernel/btf/vmlinux): {0}")]
    Btf(#[from] aya::BtfError),
    #[error("cannot load the exit recorder BPF object: {0} (run `agentnode doctor` as root)")]
    Load(#[from] aya::EbpfError),
    #[error("cannot load or attach the exit recorder: {0} (run `agentnode doctor`)")]
    Program(#[from] aya::programs::ProgramError),
    #[error("cannot pin the exit recorder's link: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("exit recorder map: {0}")]
    Map(#[from] aya::maps::MapError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `struct an_exit` of `ebpf/include/exits.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawExit {
    start_ticks: u64,
    status: i32,
    done: u32,
}

// SAFETY: plain data of fixed layout, no padding (8 + 4 + 4 bytes).
unsafe impl aya::Pod for RawExit {}

/// The recorder, pinned under one bpffs directory.
pub struct ExitRecorder {
    map: HashMap<MapData, u32, RawExit>,
}

impl std::fmt::Debug for ExitRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitRecorder").finish_non_exhaustive()
    }
}

impl ExitRecorder {
    /// Opens the recorder pinned under `dir` (a bpffs directory, made if missing), loading and
    /// pinning it first if none is.
    ///
    /// # Panics
    ///
    /// If the embedded object lacks its program or map: a build error, not a runtime one.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(EXITS_OBJ)?;
        let link = dir.join(LINK);
        if PinnedLink::from_pin(&link).is_err() {
            let btf = Btf::from_sys_fs()?;
            let program: &mut BtfTracePoint = ebpf
                .program_mut(PROGRAM)
                .expect("exits.bpf.c defines exit_record")
                .try_into()?;
            program.load("sched_process_exit", &btf)?;
            let id = program.attach()?;
            let owned: FdLink = program.take_link(id)?.into();
            owned.pin(&link)?;
        }
        let map = HashMap::try_from(ebpf.take_map(MAP).expect("exits.bpf.c defines an_exits"))?;
        Ok(Self { map })
    }

    /// Records the exit of process `pid`, started at `start_ticks` (`/proc/PID/stat` field 22).
    pub fn watch(&mut self, pid: u32, start_ticks: u64) -> Result<()> {
        let value = RawExit {
            start_ticks,
            ..RawExit::default()
        };
        Ok(self.map.insert(pid, value, 0)?)
    }

    /// The wait status recorded for `pid` started at `start_ticks`: `None` while it runs (or
    /// when it is not watched, or the pid is another process's).
    pub fn status(&self, pid: u32, start_ticks: u64) -> Result<Option<i32>> {
        match self.map.get(&pid, 0) {
            Ok(e) if e.done != 0 && e.start_ticks == start_ticks => Ok(Some(e.status)),
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops watching `pid` (its status, if any, goes too).
    pub fn forget(&mut self, pid: u32) -> Result<()> {
        match self.map.remove(&pid) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            // How aya reports a key not in the map on removal.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The pids watched now.
    pub fn watched(&self) -> Vec<u32> {
        self.map
            .keys()
            .filter_map(std::result::Result::ok)
            .collect()
    }

    /// Unpins the recorder under `dir`: the kernel detaches the program and frees the map once
    /// no one holds them. Returns whether anything was pinned.
    pub fn remove(dir: &Path) -> Result<bool> {
        let mut any = false;
        for name in [LINK, MAP] {
            match std::fs::remove_file(dir.join(name)) {
                Ok(()) => any = true,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Dir {
                        path: dir.join(name),
                        source,
                    })
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
        Ok(any)
    }
}
