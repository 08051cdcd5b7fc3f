//! Zygotes: tasks started ahead of their spec. A background thread clones each one into a fresh
//! task cgroup (its v1 nodes joined), with its own pid, uts, ipc and cgroup namespaces, a
//! network namespace and a copy of the template made ahead, and its /proc mounted; then it
//! waits. A start that takes one writes its limits, sends it the task's [`Prepared`] and waits
//! for the exec: the clone, the cgroup joins and the namespace and /proc work (about half of a
//! start, more when a cgroup join waits on the kernel) are off its path.
//!
//! A zygote shares this process's memory and descriptor table until it takes a task
//! (`CLONE_VM | CLONE_FILES`): it reads the task's [`Prepared`] where the start left it and
//! finds every descriptor it names open, then takes its own copy of the table
//! (`unshare(CLONE_FILES)`) before it touches any. So it holds no copies while it waits: an idle
//! zygote keeps no pipe of another start from its end of file.
//!
//! It dies with this process: it polls a pidfd of it while it waits, and its parent-death
//! signal, set again after its task's uid change as for any task, fires when the thread that
//! cloned it ends. That thread is the pool's, which runs until the pool closes (see
//! [`crate::background::ahead`]); closing the pool therefore ends the tasks started from it too, as the
//! cgroup manager's close does anyway.

use std::fs::File;
use std::io::Read as _;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once, PoisonError, Weak};
use std::time::Instant;

use super::child::{self, Boot};
use super::plan::{self, Start};
use super::{kill_and_reap, pipe, prepare, template, Result, Spec, Task};
use crate::background::ahead::{self, Ahead};
use crate::background::later::later;
use crate::cgroup::{self, TaskCgroup};
use crate::sys::{self, ChildStack};

/// Makes a fresh, empty task cgroup (see `cgroup::Manager::maker`).
pub type MakeCgroup = dyn Fn() -> cgroup::Result<Box<dyn TaskCgroup>> + Send + Sync;

/// One zygote, ready for a task. Dropping it kills and reaps it and removes its cgroups.
pub struct Zygote {
    pid: libc::pid_t,
    pidfd: Option<OwnedFd>,
    cgroup: Option<Box<dyn TaskCgroup>>,
    /// Its mount namespace, held for the task (see [`crate::background::later`]).
    mounts: Option<OwnedFd>,
    /// The template its mounts copy: a start after the template was rebuilt cannot use it.
    from: Arc<OwnedFd>,
    cmd: (OwnedFd, OwnedFd),
    /// Read by the zygote while it lives; dropped only after it has been reaped or has exec'd.
    boot: Option<Box<Boot>>,
    stack: Option<ChildStack>,
}

impl Zygote {
    /// Whether it has exited (killed from outside, or its boot failed).
    fn exited(&self) -> bool {
        self.pidfd
            .as_ref()
            .is_none_or(|fd| readable(fd.as_raw_fd(), 0))
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if let Some(pidfd) = &self.pidfd {
            kill_and_reap(pidfd);
        }
        // Now nothing reads them.
        drop(self.boot.take());
        drop(self.stack.take());
        let (cgroup, mounts) = (self.cgroup.take(), self.mounts.take());
        later(move || {
            drop(mounts);
            drop(cgroup);
        });
    }
}

/// Up to [`crate::background::ahead::READY`] zygotes of one cgroup manager's instance.
#[derive(Debug)]
pub struct Zygotes {
    pool: Arc<Ahead<Zygote>>,
}

/// Every pool of this process, so that a change of the host's mounts drops their zygotes.
static POOLS: Mutex<Vec<Weak<Ahead<Zygote>>>> = Mutex::new(Vec::new());

/// Registers [`forget_all`] with the pools holding template copies, at the first pool.
static HOLD: Once = Once::new();

impl Zygotes {
    /// A pool whose zygotes sit in cgroups from `make_cgroup` and copy the template built on
    /// `stage`. Nothing is made before the first [`Zygotes::take`].
    pub fn new(make_cgroup: Arc<MakeCgroup>, stage: PathBuf) -> Self {
        // SAFETY: plain syscalls; the pidfd is a fresh descriptor we own.
        let daemon = sys::pidfd_open(unsafe { libc::getpid() }).ok();
        // SAFETY: plain syscall (errno is not consulted: -1 is a valid nice value too).
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let pool = Arc::new(Ahead::keeping(
            "agentnode-zygote",
            move || make(&*make_cgroup, &stage, daemon.as_ref()?.as_raw_fd(), nice),
            |z| template::is_current(&z.from),
        ));
        HOLD.call_once(|| ahead::hold_template_copies(forget_all));
        let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(&pool));
        Self { pool }
    }

    /// Whether a zygote can serve `spec`: a task that starts from the template (as the root
    /// user namespace's root) in a network namespace of its own.
    #[must_use]
    pub fn serve(spec: &Spec) -> bool {
        spec.netns.is_none() && template::fits(spec)
    }

    /// A ready zygote, or `None`.
    #[must_use]
    pub fn take(&self) -> Option<Zygote> {
        self.pool.take()
    }

    /// The zygotes ready now: each one's host pid and the name of its task cgroup.
    #[must_use]
    pub fn ready(&self) -> Vec<(libc::pid_t, String)> {
        self.pool.with_ready(|ready| {
            ready
                .iter()
                .map(|z| {
                    let name = z
                        .cgroup
                        .as_deref()
                        .and_then(|c| c.placement().file_name())
                        .map(|n| n.to_string_lossy().into_owned());
                    (z.pid, name.unwrap_or_default())
                })
                .collect()
        })
    }

    /// Stops the thread and kills the zygotes not taken. The tasks started from this pool die
    /// with the thread (their parent-death signal). Idempotent.
    pub fn close(&self) {
        self.pool.close();
    }
}

impl Drop for Zygotes {
    fn drop(&mut self) {
        self.close();
    }
}

/// Drops every ready zygote of every pool: the host's mounts changed, so their copies of the
/// template are stale and would keep unmounted file systems busy.
fn forget_all() {
    let pools: Vec<_> = POOLS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for pool in pools {
        pool.clear();
    }
}

/// Whether `fd` is readable within `timeout_ms` (-1: however long it takes).
fn readable(fd: RawFd, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) };
        if r >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return r > 0;
        }
    }
}

/// The next 8-byte record on the error pipe `err_r` of the zygote `pidfd`, or `None` when it
/// exited without one. That pipe never ends while this process holds its write end, so the
/// zygote's exit is watched through its pidfd.
fn record(err_r: RawFd, pidfd: RawFd) -> Option<[u8; 8]> {
    let mut fds = [err_r, pidfd].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // A record written just before the exit is still there to read.
        if r <= 0 || fds[0].revents == 0 {
            return None;
        }
        let mut buf = [0u8; 8];
        // SAFETY: an 8-byte buffer; the zygote writes each record whole, in one write.
        let n = unsafe { libc::read(err_r, buf.as_mut_ptr().cast(), buf.len()) };
        return (n == 8).then_some(buf);
    }
}

/// Makes one zygote on the pool's thread, or `None` (the thread tries again later).
fn make(
    make_cgroup: &MakeCgroup,
    stage: &std::path::Path,
    daemon: RawFd,
    nice: i32,
) -> Option<Zygote> {
    let template = template::current(stage)?;
    let ready = super::netns::make()?;
    let copy = ready.mounts.filter(|m| Arc::ptr_eq(&m.from, &template))?;
    let cgroup = make_cgroup().ok()?;
    let join = cgroup.join_files().ok()?;
    let (cmd_r, cmd_w) = pipe().ok()?;
    let (err_r, err_w) = pipe().ok()?;
    let boot = Box::new(Boot {
        ops: plan::zygote_boot(copy.ns.as_raw_fd()).ok()?,
        join: join.iter().map(AsRawFd::as_raw_fd).collect(),
        netns: ready.net.as_raw_fd(),
        err_write: err_w.as_raw_fd(),
        cmd_read: cmd_r.as_raw_fd(),
        daemon,
        nice,
    });
    let stack = ChildStack::new().ok()?;
    let cg_dir = File::open(cgroup.placement()).ok()?;
    let flags = (libc::CLONE_NEWPID
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_FILES) as u64;
    let arg = std::ptr::from_ref::<Boot>(&boot).cast();
    let mask = sys::block_signals();
    // SAFETY: child::zygote_entry makes raw system calls only and writes nothing but its
    // stack; `boot` and `stack` live in the Zygote until it has exec'd or been reaped.
    let cloned = unsafe {
        sys::spawn_vm(
            flags,
            Some(cg_dir.as_fd()),
            &stack,
            child::zygote_entry,
            arg,
        )
    };
    sys::restore_signals(mask);
    let (pid, pidfd) = cloned.ok()?;
    let zygote = Zygote {
        pid,
        pidfd: Some(pidfd),
        cgroup: Some(cgroup),
        mounts: Some(copy.ns),
        from: copy.from,
        cmd: (cmd_r, cmd_w),
        boot: Some(boot),
        stack: Some(stack),
    };
    // Dropping the zygote on a failed boot kills and reaps it; the descriptors it used from
    // the shared table (this error pipe too: each start brings its own) close after that.
    let ready = record(err_r.as_raw_fd(), zygote.pidfd.as_ref()?.as_raw_fd());
    (ready? == child::zygote_ready()).then_some(zygote)
}

/// Starts the task `spec` (one [`Zygotes::serve`] accepts) describes in `z`.
/// `Ok(None)` when the zygote cannot serve it (its template is stale, or it died): the caller
/// starts the task the usual way. Otherwise as [`super::spawn`].
pub fn start(mut z: Zygote, spec: &Spec) -> Result<Option<Task>> {
    let _starting = crate::background::quiet::starting();
    // `serving` checks that the spec fits the template, as `serve` did before the take.
    let fresh = template::serving(spec).is_some_and(|ns| Arc::ptr_eq(&ns, &z.from));
    if !fresh || spec.netns.is_some() || z.exited() {
        return Ok(None);
    }
    let (Some(pidfd), Some(cgroup)) = (z.pidfd.take(), z.cgroup.take()) else {
        return Ok(None);
    };
    // From here the task owns the zygote: dropping it kills and reaps it, removes its cgroups.
    let mut task = Task::new(z.pid, pidfd, cgroup, Instant::now());
    if let Some(mounts) = z.mounts.take() {
        task.hold(mounts);
    }
    task.apply(&spec.limits)?;
    let trees = template::trees(spec)?;
    let raw: Vec<RawFd> = trees.iter().map(AsRawFd::as_raw_fd).collect();
    let ops = plan::from_template(spec, Start::Booted, &raw)?;
    let (sync_r, sync_w) = pipe()?;
    // Made for this start, not with the zygote: a process forked from this one while the
    // zygote waited holds copies of the zygote's descriptors, which would keep this pipe from
    // ending at the exec.
    let (err_r, err_w) = pipe()?;
    let mut prepared = prepare(
        spec,
        ops,
        &[],
        (sync_r.as_raw_fd(), sync_w.as_raw_fd()),
        err_w.as_raw_fd(),
        None,
    )?;
    prepared.sigmask = sys::signal_mask();
    // SAFETY: plain syscall on the calling thread.
    prepared.nice = Some(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
    // Moved to a binding declared after `prepared` and `trees`, so that every return below
    // drops it (killing and reaping the zygote) before them: the zygote reads both.
    let mut task = task;
    let addr = std::ptr::from_ref(&prepared) as usize;
    // SAFETY: an 8-byte buffer; a pipe write this small is whole or fails.
    let sent = unsafe {
        libc::write(
            z.cmd.1.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<usize>(),
        )
    };
    let first = if sent == 8 {
        record(err_r.as_raw_fd(), task.pidfd())
    } else {
        None
    };
    let Some(first) = first else {
        return Ok(None); // it died before it took the task
    };
    // It has its own table now (or failed before it could: then it reports the step), so the
    // pipe ends when it execs.
    drop(err_w);
    drop(sync_r);
    let mut report = Vec::new();
    if first != child::zygote_go() {
        report.extend_from_slice(&first);
    }
    if let Err(e) = File::from(err_r).read_to_end(&mut report) {
        task.reap_blocking();
        return Err(super::io("wait for the task to start")(e));
    }
    drop(sync_w); // held until exec so the task can tell a dead parent
    super::exec_report(task, &report, spec, &prepared.ops).map(Some)
}
