//! cgroups: which layout this host has and where this process sits.
//!
//! Linux has two cgroup hierarchies. cgroup v2 (4.5+, "unified") is one tree with controllers
//! enabled per subtree; it is also where BPF programs attach, where `cgroup.kill` (5.14) and
//! `cgroup.freeze` (5.2) live, and what `CLONE_INTO_CGROUP` (5.7) targets. cgroup v1 mounts one
//! tree per controller. A "hybrid" host mounts v1 controllers and an empty cgroup2 tree
//! (usually at `/sys/fs/cgroup/unified`) that still carries placement, kill, freeze and BPF.
//!
//! The layout is read from `/proc/self/mountinfo` and `/proc/self/cgroup`, never guessed from
//! paths, and every path agentnode uses is under the cgroup this process was started in.

mod instance;
mod layout;
mod manager;

pub use instance::{sweep, Manager, SUBTREE};
pub use layout::{Hierarchy, Layout, V1Controller};
pub use manager::{v2_files, CgroupStats, Hybrid, Limits, TaskCgroup, Usage, V1_CONTROLLERS, V2};

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Errors from reading or changing cgroups.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup filesystem is mounted (neither cgroup2 nor any v1 controller in /proc/self/mountinfo)")]
    NotMounted,
    #[error("cannot create cgroup {path}: {source} (run as root, or run agentnode doctor)")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("this host cannot enforce {what} in {dir} (drop that limit, or enable the controller; see agentnode doctor)")]
    Unsupported { what: &'static str, dir: PathBuf },
    #[error("no cgroup2 tree is mounted, so tasks cannot be placed, killed or frozen (mount cgroup2, e.g. at /sys/fs/cgroup/unified)")]
    NoUnified,
    #[error("the {controller} cgroup v1 controller is not mounted for this process (mount it, or run agentnode doctor)")]
    MissingController { controller: &'static str },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Moves `pid` into the cgroup at `dir` (any hierarchy).
pub fn write_procs(dir: &std::path::Path, pid: libc::pid_t) -> Result<()> {
    manager::write(dir, "cgroup.procs", &pid.to_string())
}

/// A cgroup directory this process created and removes when dropped (empty by then: the
/// processes in it have exited and been reaped).
#[derive(Debug)]
pub struct OwnedDir {
    path: PathBuf,
}

impl OwnedDir {
    /// Creates `parent/name`, failing if it exists (somebody else's, or a leftover to sweep).
    pub fn create(parent: &std::path::Path, name: &str) -> std::io::Result<Self> {
        let path = parent.join(name);
        std::fs::create_dir(&path)?;
        Ok(Self { path })
    }

    /// Takes over an existing directory (an earlier instance's task cgroup): removed on drop
    /// like one made here.
    #[must_use]
    pub fn adopt(path: PathBuf) -> Self {
        Self { path }
    }

    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Writes one cgroup control file in this directory.
    pub fn write(&self, file: &str, value: &str) -> std::io::Result<()> {
        std::fs::write(self.path.join(file), value)
    }
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        remove_when_empty(&self.path);
    }
}

/// How long removing a cgroup waits for the processes left in it to exit.
const RELEASE_WAIT: Duration = Duration::from_secs(3);

/// Removes cgroup directory `dir` once the processes in it have exited, waiting at most
/// `RELEASE_WAIT`; whether it is gone. rmdir is the only way to remove a cgroup and fails
/// while processes remain: those of an ended task were killed, but each must still run to
/// its exit, which on a loaded host took longer than the 100 ms this once waited (a node's
/// graceful stop left its cgroups). A stuck process costs the wait once; the next start's
/// sweep removes what is left.
pub(crate) fn remove_when_empty(dir: &std::path::Path) -> bool {
    let deadline = Instant::now() + RELEASE_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// An `OwnedDir` dropped while a process is still in it (a killed task's, on its way out)
    /// is removed once that process exits, even 400 ms later.
    #[test]
    fn a_cgroup_is_removed_once_its_last_process_exits() {
        // SAFETY: a plain syscall.
        if unsafe { libc::geteuid() } != 0 && std::env::var_os("CI").is_none() {
            return; // cgroups are root's to make; CI runs as root, where this never skips
        }
        let hierarchy = Hierarchy::detect().unwrap();
        let parent = hierarchy
            .unified
            .clone()
            .or_else(|| hierarchy.v1_dir("pids").map(PathBuf::from))
            .expect("a cgroup2 tree or a v1 pids hierarchy");
        let name = format!("agentnode-test-release-{}", std::process::id());
        let dir = OwnedDir::create(&parent, &name).unwrap();
        let mut late = Command::new("sleep")
            .arg("0.4")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        dir.write("cgroup.procs", &late.id().to_string()).unwrap();
        let path = dir.path().to_owned();
        let reaper = std::thread::spawn(move || late.wait());
        let start = Instant::now();
        drop(dir);
        assert!(!path.exists(), "the cgroup outlived its last process");
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(reaper.join().unwrap().unwrap().success());
    }
}
