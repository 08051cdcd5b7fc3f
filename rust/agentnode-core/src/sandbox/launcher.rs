//! The launcher: how one node instance starts its tasks. It owns what the instance makes ahead
//! of its starts, the cgroup subtree (with its spare task cgroups, see [`Manager`]) and the
//! zygote pool (see `zygote.rs`), and picks for each start the fastest way that keeps the task
//! as isolated as asked: a waiting zygote when one can serve the spec, else a fresh clone into
//! a new task cgroup.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use super::zygote::{self, Zygote, Zygotes};
use super::{check_ids, Error, Result, Spec, Task};
use crate::cgroup::{Hierarchy, Manager, TaskCgroup};

/// Called with a new task's cgroup2 directory after the cgroup is made and before any process
/// joins it; an error ends the start (and removes the cgroup).
pub type BeforeStart<'a, E> = &'a mut dyn FnMut(&Path) -> std::result::Result<(), E>;

/// One node instance's task starts. Closing it (or dropping it) ends the zygotes and removes
/// the instance's cgroups; its tasks must be gone by then.
#[derive(Debug)]
pub struct Launcher {
    /// Made at the first start a zygote can serve. Declared first, so it closes first: the
    /// zygotes sit in cgroups of the instance, which `cgroups` removes when dropped.
    zygotes: OnceLock<Zygotes>,
    cgroups: Mutex<Option<Manager>>,
}

impl Launcher {
    /// Detects this process's cgroup layout and creates the instance's subtree (sweeping dead
    /// instances' leftovers first): `n<pid>-<start>`, or with a `node` name `k<node>`, whose
    /// tasks may outlive this process; its task cgroups named in `spare` are kept for
    /// [`Launcher::adopt`].
    pub fn new(node: &str, spare: &[String]) -> Result<Self> {
        let manager = Hierarchy::detect().and_then(|h| Manager::new(&h, node, spare))?;
        Ok(Self {
            zygotes: OnceLock::new(),
            cgroups: Mutex::new(Some(manager)),
        })
    }

    /// The instance name, `n<pid>-<starttime>` (empty once closed).
    #[must_use]
    pub fn name(&self) -> String {
        self.with_cgroups(|m| m.name().to_owned())
    }

    /// The instance's directories in every hierarchy, cgroup2 first (none once closed).
    #[must_use]
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.with_cgroups(Manager::dirs)
    }

    /// The names of the task cgroups made ahead, not yet given to a task.
    #[must_use]
    pub fn spares(&self) -> Vec<String> {
        self.with_cgroups(Manager::spares)
    }

    /// The zygotes ready now: each one's host pid and the name of its task cgroup.
    #[must_use]
    pub fn zygotes(&self) -> Vec<(libc::pid_t, String)> {
        self.zygotes.get().map(Zygotes::ready).unwrap_or_default()
    }

    /// Takes over task cgroup `name`, which an earlier process of this node left running and
    /// `new` spared.
    pub fn adopt(&self, name: &str) -> Result<Box<dyn TaskCgroup>> {
        let guard = self.lock();
        let manager = guard.as_ref().ok_or_else(closed)?;
        Ok(manager.adopt(name)?)
    }

    /// Ends the zygotes not taken and removes the instance's cgroups. Idempotent.
    pub fn close(&self) {
        if let Some(z) = self.zygotes.get() {
            z.close();
        }
        drop(self.lock().take());
    }

    /// Starts the task `spec` describes; returns once it has exec'd its command,
    /// and leaves nothing behind on any error. A start with a `before_start` hook always clones
    /// into a fresh cgroup, since a zygote's cgroup already holds a process. Several threads may
    /// start tasks at once.
    pub fn start<E: From<Error>>(
        &self,
        spec: &Spec,
        before_start: Option<BeforeStart<'_, E>>,
    ) -> std::result::Result<Task, E> {
        let mut task = self.start_task(spec, before_start)?;
        if spec.outlive {
            // Here, on the starting thread: the caller's thread (a node's event loop) need not
            // read it.
            task.note_start_ticks();
        }
        Ok(task)
    }

    fn start_task<E: From<Error>>(
        &self,
        spec: &Spec,
        before_start: Option<BeforeStart<'_, E>>,
    ) -> std::result::Result<Task, E> {
        check_ids(spec.uid, spec.gid)?;
        if before_start.is_none() && Zygotes::serve(spec) {
            if let Some(z) = self.take_zygote(&spec.stage) {
                if let Some(task) = zygote::start(z, spec)? {
                    return Ok(task);
                }
            }
        }
        // The lock covers only creating the cgroup: the clone and the wait for the child's exec
        // run unlocked (the child never touches Rust locks, whatever state others leave them in).
        let cgroup = {
            let guard = self.lock();
            let manager = guard.as_ref().ok_or_else(closed)?;
            manager.create(&spec.limits).map_err(Error::from)?
        };
        // The hook sees the empty cgroup before any task process exists, so what it attaches
        // (the egress programs) is in force from the task's first instruction. If it fails,
        // dropping the cgroup removes it.
        if let Some(hook) = before_start {
            hook(cgroup.placement())?;
        }
        Ok(super::spawn(cgroup, spec)?)
    }

    /// A ready zygote for a task staged on `stage`, unless the launcher is closed or none is
    /// ready; the first call starts the pool.
    fn take_zygote(&self, stage: &Path) -> Option<Zygote> {
        if let Some(pool) = self.zygotes.get() {
            return pool.take();
        }
        let maker = self.lock().as_ref()?.maker();
        self.zygotes
            .get_or_init(|| Zygotes::new(maker, stage.to_owned()))
            .take()
    }

    fn with_cgroups<T: Default>(&self, f: impl FnOnce(&Manager) -> T) -> T {
        self.lock().as_ref().map(f).unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Option<Manager>> {
        self.cgroups.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn closed() -> Error {
    Error::Invalid {
        what: "launcher",
        why: "it is closed".to_owned(),
    }
}
