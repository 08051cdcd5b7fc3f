//! Process probes: a child in each namespace type, `clone3` straight into a cgroup, pidfds and
//! the default seccomp filter answering EPERM.

use std::os::fd::{AsFd, AsRawFd};

use super::{scratch_name, Checks};
use crate::cgroup::{Hierarchy, OwnedDir};
use crate::sys::{self, Forked};

const NAMESPACES: [(&str, &str, libc::c_int); 7] = [
    ("ns.user", "user namespace", libc::CLONE_NEWUSER),
    ("ns.pid", "pid namespace", libc::CLONE_NEWPID),
    ("ns.net", "network namespace", libc::CLONE_NEWNET),
    ("ns.mnt", "mount namespace", libc::CLONE_NEWNS),
    ("ns.uts", "uts namespace", libc::CLONE_NEWUTS),
    ("ns.ipc", "ipc namespace", libc::CLONE_NEWIPC),
    ("ns.cgroup", "cgroup namespace", libc::CLONE_NEWCGROUP),
];

pub(super) fn probe(checks: &mut Checks, h: Option<&Hierarchy>) {
    for (id, feature, flag) in NAMESPACES {
        let fix =
            "enable it in the kernel config (CONFIG_*_NS) and check user.max_*_namespaces sysctls";
        let try_it =
            move || in_child(flag as u64).map(|()| "a child was created in a new one".into());
        if flag == libc::CLONE_NEWUSER {
            // Unprivileged processes may create user namespaces (when the sysctls allow it).
            checks.record(id, feature, false, try_it(), fix);
        } else {
            checks.as_root(id, feature, true, fix, try_it);
        }
    }

    let unified = h.and_then(|h| h.unified.clone());
    checks.as_root(
        "clone3.into_cgroup",
        "clone3 with CLONE_INTO_CGROUP",
        false,
        "Linux 5.7 has it; without it tasks are attached after fork",
        || match &unified {
            Some(dir) => into_cgroup(dir),
            None => Err("no cgroup2 tree to clone into".into()),
        },
    );
    checks.record(
        "pidfd.open",
        "pidfd_open",
        true,
        pidfd(),
        "upgrade to Linux 5.3 or later",
    );
    checks.record(
        "seccomp.filter",
        "seccomp filters",
        true,
        seccomp(),
        "enable CONFIG_SECCOMP_FILTER in the kernel",
    );
}

fn in_child(flags: u64) -> Result<(), String> {
    // SAFETY: the child only returns a constant.
    match unsafe { sys::fork_and_wait(flags, None, || 0) } {
        Ok(0) => Ok(()),
        Ok(code) => Err(format!("child exited with {code}")),
        Err(e) => Err(format!("clone3: {e}")),
    }
}

/// Forks a child into a scratch cgroup2 node and checks the kernel put it there.
fn into_cgroup(parent: &std::path::Path) -> Result<String, String> {
    let node =
        OwnedDir::create(parent, &scratch_name("clone")).map_err(|e| format!("mkdir: {e}"))?;
    let dir = std::fs::File::open(node.path())
        .map_err(|e| format!("open {}: {e}", node.path().display()))?;
    let (rd, wr) = pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the child only closes, reads and exits.
    let forked =
        unsafe { sys::clone3(0, Some(dir.as_fd()), true) }.map_err(|e| format!("clone3: {e}"))?;
    match forked {
        Forked::Child => {
            // SAFETY: async-signal-safe calls only; waits for the parent to close its end.
            unsafe {
                libc::close(wr.as_raw_fd());
                let mut b = 0u8;
                libc::read(rd.as_raw_fd(), std::ptr::addr_of_mut!(b).cast(), 1);
                libc::_exit(0);
            }
        }
        Forked::Parent { pid, pidfd } => {
            let procs =
                std::fs::read_to_string(node.path().join("cgroup.procs")).unwrap_or_default();
            drop(wr);
            let _ = sys::wait_pid(pid);
            if pidfd.is_none() {
                return Err("CLONE_PIDFD returned no pidfd".into());
            }
            if procs.lines().any(|l| l.trim() == pid.to_string()) {
                Ok(format!("child landed in {}", node.path().display()))
            } else {
                Err(format!(
                    "child {pid} was not in {}/cgroup.procs",
                    node.path().display()
                ))
            }
        }
    }
}

fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: valid out array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors owned by us.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

fn pidfd() -> Result<String, String> {
    // SAFETY: the child only blocks in pause() until killed.
    match unsafe { sys::clone3(0, None, false) }.map_err(|e| format!("clone3: {e}"))? {
        Forked::Child => unsafe {
            // SAFETY: async-signal-safe.
            libc::pause();
            libc::_exit(0)
        },
        Forked::Parent { pid, .. } => {
            let result = sys::pidfd_open(pid);
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = sys::wait_pid(pid);
            result
                .map(|_| "opened a pidfd for a child".into())
                .map_err(|e| format!("pidfd_open: {e}"))
        }
    }
}

fn seccomp() -> Result<String, String> {
    let program =
        crate::sandbox::default_seccomp().map_err(|e| format!("building the filter: {e}"))?;
    // SAFETY: the child installs a prebuilt filter (no allocation) and makes one syscall.
    let code = unsafe { sys::fork_and_wait(0, None, || crate::sandbox::probe_seccomp(program)) }
        .map_err(|e| format!("clone3: {e}"))?;
    match code {
        0 => Ok("the default filter answered EPERM".into()),
        2 => Err("seccomp(SECCOMP_SET_MODE_FILTER) failed".into()),
        _ => Err("the default filter was installed but did not answer EPERM".into()),
    }
}
#[cfg(test)]
mod tests {
    #[test]
    fn seccomp_probe() {
        assert_eq!(
            super::seccomp(),
            Ok(String::from("the default filter answered EPERM"))
        );
    }
}
