//! A running task: waits and signals go through its pidfd (no pid-reuse races), kill and freeze
//! through its cgroup2 node, so the whole tree is reached, double-forked daemons included.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{io, Result};
use crate::background::later::later;
use crate::cgroup::{CgroupStats, TaskCgroup};

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Exit {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
}

/// A started task. Dropping it kills and reaps whatever still runs and removes its cgroups.
#[derive(Debug)]
pub struct Task {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    /// The task's mount namespace, held so that its exit does not unmount the tree (see
    /// [`crate::background::later`]).
    mounts: Option<OwnedFd>,
    cgroup: Option<Box<dyn TaskCgroup>>,
    started: Instant,
    exit: Option<Exit>,
    wall: Option<Duration>,
    last_stats: CgroupStats,
    /// The process that started it: a forked copy of the handle must leave the task alone.
    owner: u32,
    /// Its init's start time (see [`Task::start_ticks`]), for a task that outlives its starter.
    start_ticks: Option<u64>,
}

impl Task {
    /// Holds the task's mount namespace once the child is in it for good (see [`crate::background::later`]).
    pub(super) fn hold_mounts(&mut self) {
        // Opened while the child sets up: it cannot have exited and been reaped yet (we hold
        // its pidfd and have not waited), and if it has exited the open just fails.
        self.mounts = std::fs::File::open(format!("/proc/{}/ns/mnt", self.pid))
            .ok()
            .map(OwnedFd::from);
    }

    /// Holds the task's mount namespace, made before it started.
    pub(super) fn hold(&mut self, ns: OwnedFd) {
        self.mounts = Some(ns);
    }

    pub(super) fn new(
        pid: libc::pid_t,
        pidfd: OwnedFd,
        cgroup: Box<dyn TaskCgroup>,
        started: Instant,
    ) -> Self {
        Self {
            pid,
            pidfd,
            mounts: None,
            cgroup: Some(cgroup),
            started,
            exit: None,
            wall: None,
            last_stats: CgroupStats::default(),
            owner: std::process::id(),
            start_ticks: None,
        }
    }

    /// Reads its init's start time once it has exec'd: for a task to be found again by a later
    /// process (see `Spec::outlive`), which checks pid and start time both.
    pub(super) fn note_start_ticks(&mut self) {
        self.start_ticks = u32::try_from(self.pid)
            .ok()
            .and_then(crate::sys::start_ticks);
    }

    /// Writes `limits` to the task's cgroups.
    pub(super) fn apply(&self, limits: &crate::cgroup::Limits) -> Result<()> {
        if let Some(cg) = self.cgroup.as_deref() {
            cg.apply(limits)?;
        }
        Ok(())
    }

    #[must_use]
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Its init's start time in clock ticks since boot (`/proc/PID/stat` field 22), read at the
    /// start of a task started with `Spec::outlive`; `None` for the others, or when its init
    /// was gone by then.
    #[must_use]
    pub fn start_ticks(&self) -> Option<u64> {
        self.start_ticks
    }

    /// The pidfd: readable when the task's init has exited (for `loop.add_reader`).
    #[must_use]
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// The task's cgroup2 directory (for BPF attachment), until it is reaped.
    #[must_use]
    pub fn cgroup_dir(&self) -> Option<&Path> {
        self.cgroup.as_deref().map(TaskCgroup::placement)
    }

    #[must_use]
    pub fn exit(&self) -> Option<Exit> {
        self.exit
    }

    /// Sends `signal` to the task's init through its pidfd.
    pub fn signal(&self, signal: i32) -> Result<()> {
        if self.exit.is_some() {
            return Ok(());
        }
        // SAFETY: plain syscall on our pidfd.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(io("signal the task")(e));
            }
        }
        Ok(())
    }

    /// SIGKILLs every process of the task: `cgroup.kill`, or, without it (before 5.14), freeze,
    /// SIGKILL every listed pid, thaw.
    pub fn kill(&self) -> Result<()> {
        let Some(cg) = self.cgroup.as_deref() else {
            return Ok(());
        };
        if cg.kill().is_err() {
            cg.set_frozen(true)?;
            if let Ok(procs) = std::fs::read_to_string(cg.placement().join("cgroup.procs")) {
                for pid in procs
                    .lines()
                    .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
                {
                    // SAFETY: frozen pids cannot exit and be reused before the thaw below.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            cg.set_frozen(false)?;
        }
        Ok(())
    }

    pub fn set_frozen(&self, frozen: bool) -> Result<()> {
        if let Some(cg) = self.cgroup.as_deref() {
            cg.set_frozen(frozen)?;
        }
        Ok(())
    }

    /// Reaps the task if its init has exited; then kills any survivor and releases its cgroups.
    pub fn try_wait(&mut self) -> Result<Option<Exit>> {
        if self.exit.is_some() {
            return Ok(self.exit);
        }
        // SAFETY: siginfo is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pidfd and out pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.pidfd.as_raw_fd() as libc::id_t,
                &raw mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(io("wait for the task")(e));
        }
        // SAFETY: waitid filled a SIGCHLD siginfo, or left si_pid zero when nothing exited.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        let exit = if info.si_code == libc::CLD_EXITED {
            Exit {
                code: Some(status),
                signal: None,
            }
        } else {
            Exit {
                code: None,
                signal: Some(status),
            }
        };
        self.wall = Some(self.started.elapsed());
        self.exit = Some(exit);
        self.release();
        Ok(Some(exit))
    }

    /// Waits up to `timeout` (forever when `None`) for the task's init to exit.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<Exit>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(exit) = self.try_wait()? {
                return Ok(Some(exit));
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&raw mut pfd, 1, ms) };
        }
    }

    /// Gives the task up: dropping this handle then neither kills nor reaps it, and its
    /// cgroups and mount namespace stay (the task runs on; see `Spec::outlive`).
    pub fn leave(&mut self) {
        // What a forked copy of the handle does on drop (see `Drop`).
        self.owner = 0;
        std::mem::forget(self.cgroup.take());
        self.mounts = None;
    }

    pub(super) fn reap_blocking(&mut self) {
        let _ = self.kill();
        let _ = self.wait(None);
    }

    /// Accounting: the cgroup's live figures while it runs, the final ones after.
    pub fn stats(&mut self) -> (Duration, CgroupStats) {
        if let Some(cg) = self.cgroup.as_deref() {
            if let Ok(s) = cg.stats() {
                self.last_stats = s;
            }
        }
        (
            self.wall.unwrap_or_else(|| self.started.elapsed()),
            self.last_stats.clone(),
        )
    }

    /// CPU time and memory peak of the running task's cgroup (None once it is reaped): the
    /// cheap reading a tool call takes before and after itself.
    #[must_use]
    pub fn usage(&self) -> Option<crate::cgroup::Usage> {
        self.cgroup.as_deref().and_then(|cg| cg.usage().ok())
    }

    /// After init is reaped: record final accounting, kill any process that escaped the pid
    /// namespace's teardown; the cgroups and the mount namespace go on the background thread.
    fn release(&mut self) {
        let mounts = self.mounts.take();
        let cg = self.cgroup.take();
        if let Some(cg) = cg.as_deref() {
            // A pids controller that counted the task (a peak) and counts nobody now means the
            // cgroup is empty, and stays so: only a privileged writer could move a process in.
            // Decided on this final reading alone: an earlier live one says nothing of now.
            let empty = cg.stats().is_ok_and(|s| {
                let empty = s.pids_peak > 0 && s.pids_current == 0;
                self.last_stats = s;
                empty
            });
            if !empty {
                let _ = cg.kill();
            }
        }
        if mounts.is_some() || cg.is_some() {
            later(move || {
                drop(mounts);
                drop(cg);
            });
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if std::process::id() != self.owner {
            // A forked child's copy (its exit drops every handle it inherited): the task and
            // its cgroups are the parent's to end and remove.
            std::mem::forget(self.cgroup.take());
            return;
        }
        if self.exit.is_none() {
            self.reap_blocking();
        }
        self.release();
    }
}
