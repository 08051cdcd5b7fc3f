//! Isolated task execution: `clone3` straight into the task's cgroup2 node with new pid, mount,
//! uts, ipc, net and cgroup namespaces (and a user namespace on request), a read-only root,
//! dropped privileges, rlimits and a default seccomp filter. The root is a private copy of a
//! template mount namespace built once for the host root ([`template`]) with the task's own
//! mounts on top, or, for tasks the template cannot serve, assembled on a staging tmpfs and
//! entered with `pivot_root`. Needs Linux 5.12+ (`mount_setattr`; the template path also
//! `open_tree`/`move_mount`, 5.2); `CLONE_INTO_CGROUP` (5.7) is used when present and replaced by
//! an explicit attach otherwise.
//!
//! The parent prepares everything (paths, argv, env, the mount plan, the seccomp program)
//! before the clone. The child shares the parent's address space until it execs (no page
//! tables copied, see [`sys::spawn_vm`]) and runs [`child::entry`], which makes raw system
//! calls only: it joins its v1 cgroups itself, waits on a sync pipe for its id maps when it
//! has a user namespace, builds its root and execs.

mod child;
mod fresh;
pub mod landlock;
pub mod launcher;
mod netns;
mod plan;
mod seccomp;
mod sockets;
mod start_step;
mod task;
mod template;
mod zygote;

pub use launcher::Launcher;
pub use seccomp::{
    default_program as default_seccomp, install_and_probe as probe_seccomp,
    Program as SeccompProgram,
};
pub use task::{Exit, Task};

use std::ffi::CString;
use std::io::Read as _;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Instant;

use crate::cgroup::{self, TaskCgroup};
use crate::sys::{self, ChildStack};
use start_step::StartStep;

/// Errors from setting up or running a task.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error("command not found: {0:?} (give an absolute path, or install it in the task's root)")]
    CommandNotFound(String),
    #[error("{what} {path} {why}")]
    BadPath {
        what: &'static str,
        path: PathBuf,
        why: &'static str,
    },
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("cannot build the seccomp filter: {0}")]
    Seccomp(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("task setup failed: cannot {step}: {source} (run agentnode doctor to check namespace and mount support)")]
    Setup {
        step: String,
        source: std::io::Error,
    },
    #[error("cannot execute {exe:?} in the task: {source}")]
    Exec { exe: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// A bind mount from the host into the task.
#[derive(Debug, Clone)]
pub struct Bind {
    pub src: PathBuf,
    pub dest: PathBuf,
    pub writable: bool,
}

/// Everything about one task: what it runs, how it is isolated, and its cgroup's limits.
#[derive(Debug, Clone)]
pub struct Spec {
    pub argv: Vec<String>,
    /// `KEY=VALUE` strings: the task's whole environment.
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    /// The directory whose top-level entries become the task's read-only root (`/`: the host).
    pub rootfs: PathBuf,
    /// An empty directory the staging tmpfs is mounted on (in the task's mount namespace only).
    pub stage: PathBuf,
    /// Host directory bound read-write at /workspace.
    pub workspace: Option<PathBuf>,
    pub binds: Vec<Bind>,
    pub tmp_size: u64,
    pub uid: u32,
    pub gid: u32,
    /// First host id of the range task ids 0..65536 map to; `None`: no user namespace.
    pub userns_base: Option<u32>,
    /// A network namespace to join (a `/run/netns/NAME` path) instead of creating one.
    pub netns: Option<PathBuf>,
    /// Descriptors for the task's stdin, stdout, stderr; `None` inherits this process's.
    pub stdio: [Option<RawFd>; 3],
    pub nofile: u64,
    pub seccomp: bool,
    /// Capability numbers (`CAP_NET_BIND_SERVICE` = 10, ...) the task keeps; all others drop.
    pub keep_caps: Vec<u32>,
    /// Written to the task's cgroup before it runs.
    pub limits: cgroup::Limits,
    /// Whether the task outlives the process that starts it (the node's tasks, re-adopted by
    /// its next start): no parent-death signal once it has exec'd.
    pub outlive: bool,
}

/// The `PATH` used to resolve a bare command name inside the task's root.
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn resolve(spec: &Spec) -> Result<String> {
    let cmd = spec
        .argv
        .first()
        .ok_or_else(|| Error::Invalid {
            what: "command",
            why: "it is empty (give the command to run after --)".to_owned(),
        })?
        .clone();
    if cmd.contains('/') {
        return Ok(cmd);
    }
    let path = spec
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(SAFE_PATH);
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = format!("{dir}/{cmd}");
        let host = spec.rootfs.join(candidate.trim_start_matches('/'));
        if let Ok(c) = CString::new(host.as_os_str().as_bytes()) {
            // SAFETY: valid C string.
            if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 && host.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(Error::CommandNotFound(cmd))
}

fn cstrings(items: &[String], what: &'static str) -> Result<Vec<CString>> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_bytes()).map_err(|_| Error::Invalid {
                what,
                why: format!("{s:?} contains a NUL byte"),
            })
        })
        .collect()
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io("create a pipe")(std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The highest capability number of this kernel (read once: it cannot change while it runs).
fn cap_last() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63)
    })
}

fn check_caps(caps: &[u32]) -> Result<()> {
    let last = cap_last();
    match caps.iter().find(|&&c| c > last) {
        Some(c) => Err(Error::Invalid {
            what: "capability",
            why: format!("{c} is not a capability of this kernel (0 to {last})"),
        }),
        None => Ok(()),
    }
}

/// Refuses `(uid_t)-1`, which `setresuid` and `chown` read as "leave unchanged": a task asked to
/// run as it would keep the parent's ids (root). The child also checks the ids it got.
fn check_ids(uid: u32, gid: u32) -> Result<()> {
    for (what, id) in [("uid", uid), ("gid", gid)] {
        if id == u32::MAX {
            return Err(Error::Invalid {
                what: "user",
                why: format!(
                    "{what} {id} is (uid_t)-1, \"unchanged\" to the kernel (give 0 to {})",
                    id - 1
                ),
            });
        }
    }
    Ok(())
}

/// The identity and restrictions [`confine_self`] gives the calling process.
#[derive(Debug, Clone)]
pub struct Confine {
    pub uid: u32,
    pub gid: u32,
    /// Capability numbers kept (ambient); every other one is dropped.
    pub keep_caps: Vec<u32>,
    pub nofile: u64,
    pub seccomp: bool,
}

/// Builds ahead, once, what `confine_self` takes in every process forked from this one: the
/// seccomp program and the Landlock ruleset (each fork would build its own, ~0.4 MiB of fresh
/// memory and its CPU, before an agent forked to join a task could start).
pub fn confine_ahead() -> Result<()> {
    seccomp::default_program()?;
    landlock::ruleset();
    Ok(())
}

/// Gives the calling process what a task's command has at exec, by the same steps: rlimits,
/// the bounding and ambient sets, the ids (no supplementary group), the kept capabilities,
/// `no_new_privs`, the Landlock scope and the seccomp filter; every descriptor above 2 becomes
/// close-on-exec. For a single-threaded process forked to join a running task, after it
/// joined the task's cgroups and namespaces (`agentnode.agents.forkserver`). A step that fails
/// once the first one ran writes its record (`StartStep`) to `err` and ends the process with
/// status 127: a half-confined process never returns.
pub fn confine_self(c: &Confine, err: RawFd) -> Result<()> {
    check_caps(&c.keep_caps)?;
    check_ids(c.uid, c.gid)?;
    // Its write end stays open here: the parent-alive check before seccomp sees no hang-up.
    let (sync_r, sync_w) = pipe()?;
    let prepared = child::Prepared {
        ops: Vec::new(),
        join: Vec::new(),
        sync_read: sync_r.as_raw_fd(),
        sync_write: sync_w.as_raw_fd(),
        err_write: err,
        netns: None,
        hostname: CString::default(),
        cwd: CString::default(),
        exe: CString::default(),
        _argv: Vec::new(),
        _env: Vec::new(),
        argv_ptrs: Vec::new(),
        env_ptrs: Vec::new(),
        stdio: [None; 3],
        userns: false,
        uid: c.uid,
        gid: c.gid,
        cap_last: cap_last(),
        keep_caps: c.keep_caps.iter().fold(0, |m, c| m | (1u64 << c)),
        // Its parent-death signal is left as it is (none after a fork).
        outlive: true,
        nofile: c.nofile,
        landlock: landlock::ruleset(),
        seccomp: if c.seccomp {
            Some(seccomp::default_program()?)
        } else {
            None
        },
        sigmask: 0,
        nice: None,
    };
    // SAFETY: raw syscalls on this process, with values prepared above.
    unsafe { child::drop_privileges(&prepared) };
    Ok(())
}

fn prepare(
    spec: &Spec,
    ops: Vec<plan::Op>,
    join: &[OwnedFd],
    sync: (RawFd, RawFd),
    err: RawFd,
    netns: Option<RawFd>,
) -> Result<child::Prepared> {
    let exe = resolve(spec)?;
    check_caps(&spec.keep_caps)?;
    check_ids(spec.uid, spec.gid)?;
    if !spec.stage.is_dir() {
        return Err(Error::BadPath {
            what: "staging directory",
            path: spec.stage.clone(),
            why: "does not exist",
        });
    }
    if let Some(ws) = &spec.workspace {
        if !ws.is_dir() {
            return Err(Error::BadPath {
                what: "workspace",
                path: ws.clone(),
                why: "is not a directory",
            });
        }
    }
    let argv = cstrings(&spec.argv, "argument")?;
    let env = cstrings(&spec.env, "environment entry")?;
    let mut argv_ptrs: Vec<_> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<_> = env.iter().map(|c| c.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let c = |s: &str, what: &'static str| cstrings(&[s.to_owned()], what).map(|mut v| v.remove(0));
    Ok(child::Prepared {
        ops,
        join: join.iter().map(AsRawFd::as_raw_fd).collect(),
        sync_read: sync.0,
        sync_write: sync.1,
        err_write: err,
        netns,
        hostname: c(&spec.hostname, "hostname")?,
        cwd: c(&spec.cwd, "working directory")?,
        exe: c(&exe, "command")?,
        _argv: argv,
        _env: env,
        argv_ptrs,
        env_ptrs,
        stdio: spec.stdio,
        userns: spec.userns_base.is_some(),
        uid: spec.uid,
        gid: spec.gid,
        cap_last: cap_last(),
        keep_caps: spec.keep_caps.iter().fold(0, |m, c| m | (1u64 << c)),
        outlive: spec.outlive,
        nofile: spec.nofile,
        landlock: landlock::ruleset(),
        seccomp: if spec.seccomp {
            Some(seccomp::default_program()?)
        } else {
            None
        },
        sigmask: 0,
        nice: None,
    })
}

fn write_id_maps(pid: libc::pid_t, base: u32) -> Result<()> {
    let map = format!("0 {base} 65536\n");
    for file in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{file}"), &map)
            .map_err(io("write the task's id maps"))?;
    }
    Ok(())
}

/// The network namespace a task joins, if it joins one (the given one, or one made ahead),
/// and the copy of the template made with one made ahead.
fn network(spec: &Spec) -> Result<(Option<OwnedFd>, Option<template::MadeCopy>)> {
    let given = spec
        .netns
        .as_ref()
        .map(|p| {
            std::fs::File::open(p)
                .map(OwnedFd::from)
                .map_err(|_| Error::BadPath {
                    what: "network namespace",
                    path: p.clone(),
                    why: "cannot be opened",
                })
        })
        .transpose()?;
    // A pooled namespace is owned by this user namespace, so a task in its own user namespace
    // would have no say over it: those make theirs at clone.
    Ok(match given {
        None if spec.userns_base.is_none() => {
            netns::take().map_or((None, None), |ready| (Some(ready.net), ready.mounts))
        }
        given => (given, None),
    })
}

/// Starts a task in `cgroup` (fresh from `Manager::create`, with `spec`'s limits), isolated as
/// `spec` says: a clone, for the starts no zygote serves (see [`Launcher::start`]). Returns once
/// the task has exec'd its command; every error leaves nothing behind. It needs no manager, so
/// several threads can start tasks at once.
fn spawn(cgroup: Box<dyn TaskCgroup>, spec: &Spec) -> Result<Task> {
    let _starting = crate::background::quiet::starting();
    let (sync_r, sync_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (netns, made) = network(spec)?;
    let join = cgroup.join_files()?;
    let mut planned = template::plan(spec, made)?;
    let mut prepared = prepare(
        spec,
        planned.ops,
        &join,
        (sync_r.as_raw_fd(), sync_w.as_raw_fd()),
        err_w.as_raw_fd(),
        netns.as_ref().map(AsRawFd::as_raw_fd),
    )?;
    let cg_dir =
        std::fs::File::open(cgroup.placement()).map_err(io("open the task's cgroup2 directory"))?;
    let flags = clone_flags(spec, planned.from_template, netns.is_some());
    // Outlives the child's use of it: every path below either reads the error pipe to its end
    // (exec or exit) or kills and reaps the child before returning.
    let stack = ChildStack::new().map_err(io("map the task's setup stack"))?;
    let started = Instant::now();
    prepared.sigmask = sys::block_signals();
    let arg = std::ptr::from_ref(&prepared).cast();
    // SAFETY: child::entry makes raw system calls only and writes nothing but its stack;
    // `prepared` and `stack` stay untouched until it has exec'd or exited (see above).
    let mut cloned =
        unsafe { sys::spawn_vm(flags, Some(cg_dir.as_fd()), &stack, child::entry, arg) };
    if cloned.as_ref().is_err_and(|e| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL)
        )
    }) {
        // Kernels before 5.7 lack CLONE_INTO_CGROUP: clone, then attach while the child waits.
        // SAFETY: as above.
        cloned = unsafe { sys::spawn_vm(flags, None, &stack, child::entry, arg) };
        if let Ok((pid, pidfd)) = &cloned {
            if let Err(e) = cgroup::write_procs(cgroup.placement(), *pid) {
                sys::restore_signals(prepared.sigmask);
                kill_and_reap(pidfd); // outside the cgroup, so Task's cgroup.kill misses it
                return Err(e.into());
            }
        }
    }
    sys::restore_signals(prepared.sigmask);
    let (pid, pidfd) = cloned.map_err(io("clone the task"))?;
    drop(sync_r);
    drop(err_w);
    drop(netns);
    drop(join);
    let mut task = Task::new(pid, pidfd, cgroup, started);
    let announces = planned.from_template && planned.made.is_none();
    if let Some(ns) = planned.made.take() {
        task.hold(ns);
    } else if !planned.from_template {
        task.hold_mounts();
    }
    if let Some(base) = spec.userns_base {
        if let Err(e) = map_ids_and_release(pid, base, &sync_w) {
            drop(task); // kills and reaps the child, removes its cgroups
            return Err(e);
        }
    }
    let report = match read_report(err_r, &mut task, announces) {
        Ok(report) => report,
        Err(e) => {
            task.reap_blocking(); // the child may still be on `stack`: end it before unmapping
            return Err(io("wait for the task to start")(e));
        }
    };
    drop(sync_w); // held until exec so the child can tell a dead parent (see child::run)
    exec_report(task, &report, spec, &prepared.ops)
}

/// The task, once its error pipe has ended: it exec'd, unless `report` names the step that
/// failed (with the steps of `ops`), and then it is reaped and released.
fn exec_report(mut task: Task, report: &[u8], spec: &Spec, ops: &[plan::Op]) -> Result<Task> {
    let Some((step, errno)) = StartStep::parse(report) else {
        return Ok(task);
    };
    let source = std::io::Error::from_raw_os_error(errno);
    task.reap_blocking();
    drop(task);
    Err(if step == StartStep::Exec {
        Error::Exec {
            exe: spec.argv[0].clone(),
            source,
        }
    } else {
        Error::Setup {
            step: step.describe(ops),
            source,
        }
    })
}

/// Reads the child's error pipe to its end (exec or exit): empty when it exec'd. A child that
/// copies the template itself (`announces`) first reports that it is in its own copy, for
/// `task` to hold: then the task's exit leaves the copy's teardown to [`Task`]'s background
/// close, as with a copy made at clone or ahead (which the task holds at once).
fn read_report(err_r: OwnedFd, task: &mut Task, announces: bool) -> std::io::Result<Vec<u8>> {
    let mut report = Vec::new();
    let mut err_file = std::fs::File::from(err_r);
    if announces {
        (&mut err_file).take(8).read_to_end(&mut report)?;
        if report[..] == child::mounts_ready()[..] {
            task.hold_mounts();
            report.clear();
        }
    }
    err_file.read_to_end(&mut report)?;
    Ok(report)
}

/// The namespaces the clone creates: not the mount namespace of a task that starts from the
/// template (it enters a copy of that), nor the network namespace of one that joins a ready one.
fn clone_flags(spec: &Spec, from_template: bool, joins_netns: bool) -> u64 {
    let mut flags =
        (libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWCGROUP)
            as u64;
    if !from_template {
        flags |= libc::CLONE_NEWNS as u64;
    }
    if !joins_netns {
        flags |= libc::CLONE_NEWNET as u64;
    }
    if spec.userns_base.is_some() {
        flags |= libc::CLONE_NEWUSER as u64;
    }
    flags
}

/// SIGKILLs and reaps a child through its pidfd, waiting however long that takes.
fn kill_and_reap(pidfd: &OwnedFd) {
    let fd = pidfd.as_raw_fd();
    // SAFETY: plain syscalls on our pidfd; siginfo is plain data that waitid fills.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
        let mut info: libc::siginfo_t = std::mem::zeroed();
        while libc::waitid(
            libc::P_PIDFD,
            fd as libc::id_t,
            &raw mut info,
            libc::WEXITED,
        ) != 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
}

fn map_ids_and_release(pid: libc::pid_t, base: u32, sync_w: &OwnedFd) -> Result<()> {
    write_id_maps(pid, base)?;
    // SAFETY: valid descriptor and one-byte buffer.
    if unsafe { libc::write(sync_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) } != 1 {
        return Err(io("release the task")(std::io::Error::last_os_error()));
    }
    Ok(())
}
