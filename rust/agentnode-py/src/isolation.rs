//! Python bindings for Layer 1: the node's cgroup subtree (`CgroupManager`), `spawn`, and the
//! task handle (`NativeTask`). Policy (defaults, parsing, timeouts, exit reasons) is Python's.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use agentnode_core::cgroup::{Hierarchy, Limits, Manager};
use agentnode_core::sandbox::zygote::{self, Zygotes};
use agentnode_core::sandbox::{self, Bind, Spec, Task};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::NativeError;

/// This node instance's cgroup subtree; creating it sweeps dead instances' leftovers.
#[pyclass(module = "agentnode._native", frozen)]
pub struct CgroupManager {
    /// Made at the first start a zygote can serve. Declared first, so it closes first: the
    /// zygotes sit in cgroups of the instance, which `inner` removes when dropped.
    zygotes: OnceLock<Zygotes>,
    inner: Mutex<Option<Manager>>,
}

#[pymethods]
impl CgroupManager {
    /// Sweeps dead instances' task cgroups, then makes this instance's subtree: `n<pid>-<start>`,
    /// or with a `node` name, `k<node>`, whose tasks may outlive this process (its earlier
    /// process's task cgroups are swept, but those named in `spare`, `TASK`: re-adopted now).
    #[new]
    #[pyo3(signature = (*, node=String::new(), spare=Vec::new()))]
    #[allow(clippy::needless_pass_by_value)] // pyo3 hands over owned values
    fn new(py: Python<'_>, node: String, spare: Vec<String>) -> PyResult<Self> {
        let m = py
            .detach(|| Hierarchy::detect().and_then(|h| Manager::new(&h, &node, &spare)))
            .map_err(NativeError::from)?;
        Ok(Self {
            zygotes: OnceLock::new(),
            inner: Mutex::new(Some(m)),
        })
    }

    /// The zygotes ready now (tasks started ahead, waiting for their command): host pid to
    /// the name of its task cgroup.
    fn zygotes(&self) -> std::collections::HashMap<i32, String> {
        self.zygotes
            .get()
            .map(|z| z.ready().into_iter().collect())
            .unwrap_or_default()
    }

    /// The instance name, `n<pid>-<starttime>`.
    #[getter]
    fn name(&self) -> String {
        self.lock()
            .as_ref()
            .map(|m| m.name().to_owned())
            .unwrap_or_default()
    }

    /// This instance's directories in every hierarchy (cgroup2 first).
    fn dirs(&self) -> Vec<PathBuf> {
        self.lock().as_ref().map(Manager::dirs).unwrap_or_default()
    }

    /// Names of the task cgroups made ahead of time, not yet given to a task.
    fn spares(&self) -> Vec<String> {
        self.lock()
            .as_ref()
            .map(Manager::spares)
            .unwrap_or_default()
    }

    /// Takes over task cgroup `name` (`TASK`) an earlier process of this node left running,
    /// spared at construction.
    fn adopt(&self, py: Python<'_>, name: &str) -> PyResult<AdoptedCgroup> {
        let cg = py
            .detach(|| -> sandbox::Result<_> {
                let guard = self.lock();
                let m = guard.as_ref().ok_or(sandbox::Error::Invalid {
                    what: "cgroup manager",
                    why: "it is closed".to_owned(),
                })?;
                Ok(m.adopt(name)?)
            })
            .map_err(NativeError::from)?;
        Ok(AdoptedCgroup {
            inner: Mutex::new(Some(cg)),
        })
    }

    /// Removes the instance's subtree (its tasks must be gone). Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            if let Some(z) = self.zygotes.get() {
                z.close();
            }
            drop(self.lock().take());
        });
    }
}

impl CgroupManager {
    /// A ready zygote for a task staged on `stage`, unless the manager is closed or none is
    /// ready; the first call starts the pool.
    fn take_zygote(&self, stage: &Path) -> Option<zygote::Zygote> {
        if let Some(pool) = self.zygotes.get() {
            return pool.take();
        }
        let maker = self.lock().as_ref()?.maker();
        self.zygotes
            .get_or_init(|| Zygotes::new(maker, stage.to_owned()))
            .take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Manager>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes dead instances' cgroups under `unified` and `v1` subtree dirs; returns the count.
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // pyo3 hands over owned values
fn sweep_cgroups(py: Python<'_>, unified: PathBuf, v1: Vec<PathBuf>) -> usize {
    py.detach(|| agentnode_core::cgroup::sweep(&unified, &v1, "", &[]))
}

/// A running task (see `agentnode.isolation.Task`).
#[pyclass(module = "agentnode._native", frozen)]
pub struct NativeTask {
    inner: Mutex<Task>,
    pid: i32,
    pidfd: i32,
    cgroup_dir: Option<PathBuf>,
}

fn exit_tuple(e: sandbox::Exit) -> (Option<i32>, Option<i32>) {
    (e.code, e.signal)
}

impl NativeTask {
    fn lock(&self) -> std::sync::MutexGuard<'_, Task> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[pymethods]
impl NativeTask {
    #[getter]
    fn pid(&self) -> i32 {
        self.pid
    }

    #[getter]
    fn pidfd(&self) -> i32 {
        self.pidfd
    }

    /// The task's cgroup2 directory (for BPF attachment).
    #[getter]
    fn cgroup_dir(&self) -> Option<PathBuf> {
        self.cgroup_dir.clone()
    }

    /// Reaps the task if it has exited: `(code, signal)`, else None.
    fn try_wait(&self, py: Python<'_>) -> PyResult<Option<(Option<i32>, Option<i32>)>> {
        // Reaping reads the final accounting (about 0.2 ms), and the lock may be held by a
        // thread in `wait`: neither may stall every other Python thread.
        let r = py
            .detach(|| self.lock().try_wait())
            .map_err(NativeError::from)?;
        Ok(r.map(exit_tuple))
    }

    /// Waits up to `timeout` seconds (None: forever); `(code, signal)` or None on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<Option<(Option<i32>, Option<i32>)>> {
        let timeout = match timeout {
            Some(t) if t.is_nan() => {
                return Err(NativeError::from(sandbox::Error::Invalid {
                    what: "wait timeout",
                    why: "it is NaN (give seconds, or None to wait until the task ends)".to_owned(),
                })
                .into());
            }
            // Longer than a Duration holds (over 500 billion years) is the same as forever.
            Some(t) => Duration::try_from_secs_f64(t.max(0.0)).ok(),
            None => None,
        };
        let r = py
            .detach(|| self.lock().wait(timeout))
            .map_err(NativeError::from)?;
        Ok(r.map(exit_tuple))
    }

    /// Sends a signal to the task's init through its pidfd.
    fn signal(&self, py: Python<'_>, sig: i32) -> PyResult<()> {
        Ok(py
            .detach(|| self.lock().signal(sig))
            .map_err(NativeError::from)?)
    }

    /// SIGKILLs every process of the task (cgroup.kill).
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py
            .detach(|| self.lock().kill())
            .map_err(NativeError::from)?)
    }

    fn set_frozen(&self, py: Python<'_>, frozen: bool) -> PyResult<()> {
        Ok(py
            .detach(|| self.lock().set_frozen(frozen))
            .map_err(NativeError::from)?)
    }

    /// Accounting as a dict: `wall_s` and the cgroup figures.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (wall, s) = py.detach(|| self.lock().stats());
        stats_dict(py, wall, &s)
    }

    /// Lets the task run on without this handle: nothing kills or reaps it and its cgroups
    /// stay (for a task started with `outlive`, which the node's next start re-adopts).
    fn leave(&self) {
        self.lock().leave();
    }

    /// Kills and reaps whatever still runs and removes the task's cgroups.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut t = self.lock();
            if t.exit().is_none() {
                let _ = t.kill();
                t.wait(None)
            } else {
                Ok(None)
            }
        })
        .map_err(NativeError::from)?;
        Ok(())
    }
}

/// Starts an isolated task; returns once it has exec'd its command. `before_start` is called
/// with the task's cgroup2 directory after it is made and before any process joins it.
#[pyfunction]
#[pyo3(signature = (
    manager, argv, *, env, cwd, hostname, rootfs, stage, workspace, binds, tmp_size, uid, gid,
    userns_base, netns, stdio, nofile, seccomp, caps, cpu_quota_us, cpu_period_us, cpu_weight,
    memory_max, memory_high, swap_max, pids_max, before_start=None, outlive=false
))]
#[allow(clippy::too_many_arguments)]
fn spawn(
    py: Python<'_>,
    manager: &CgroupManager,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: String,
    hostname: String,
    rootfs: PathBuf,
    stage: PathBuf,
    workspace: Option<PathBuf>,
    binds: Vec<(PathBuf, PathBuf, bool)>,
    tmp_size: u64,
    uid: u32,
    gid: u32,
    userns_base: Option<u32>,
    netns: Option<PathBuf>,
    stdio: (Option<i32>, Option<i32>, Option<i32>),
    nofile: u64,
    seccomp: bool,
    caps: Vec<u32>,
    cpu_quota_us: Option<u64>,
    cpu_period_us: u64,
    cpu_weight: Option<u64>,
    memory_max: Option<u64>,
    memory_high: Option<u64>,
    swap_max: Option<u64>,
    pids_max: Option<u64>,
    before_start: Option<Py<PyAny>>,
    outlive: bool,
) -> PyResult<NativeTask> {
    // (uid_t)-1 means "leave unchanged" to setresuid/setresgid: the task would keep root.
    if uid == u32::MAX || gid == u32::MAX {
        return Err(NativeError::from(sandbox::Error::Invalid {
            what: "user",
            why: format!("{uid}:{gid}: ids must be below 4294967295 (which means 'unchanged')"),
        })
        .into());
    }
    let spec = Spec {
        argv,
        env,
        cwd,
        hostname,
        rootfs,
        stage,
        workspace,
        binds: binds
            .into_iter()
            .map(|(src, dest, writable)| Bind {
                src,
                dest,
                writable,
            })
            .collect(),
        tmp_size,
        uid,
        gid,
        userns_base,
        netns,
        stdio: [stdio.0, stdio.1, stdio.2],
        nofile,
        seccomp,
        keep_caps: caps,
        outlive,
    };
    let limits = Limits {
        cpu_quota_us,
        cpu_period_us,
        cpu_weight,
        memory_max,
        memory_high,
        swap_max,
        pids_max,
    };
    if before_start.is_none() && Zygotes::serve(&spec) {
        let started = py.detach(|| match manager.take_zygote(&spec.stage) {
            Some(z) => zygote::start(z, &limits, &spec),
            None => Ok(None),
        });
        if let Some(task) = started.map_err(NativeError::from)? {
            return Ok(NativeTask::from(task));
        }
    }
    // The manager lock covers only creating the cgroup: the clone and the wait for the child's
    // exec run unlocked, so several threads start tasks at once (the child never touches Rust
    // locks, whatever state other threads leave them in).
    let cgroup = py
        .detach(|| -> sandbox::Result<_> {
            let guard = manager.lock();
            let m = guard.as_ref().ok_or(sandbox::Error::Invalid {
                what: "cgroup manager",
                why: "it is closed".to_owned(),
            })?;
            Ok(m.create(&limits)?)
        })
        .map_err(NativeError::from)?;
    // The hook sees the empty cgroup before any task process exists, so what it attaches (the
    // egress programs) is in force from the task's first instruction. If it fails, dropping
    // the cgroup removes it.
    if let Some(hook) = before_start {
        hook.call1(py, (cgroup.placement().to_path_buf(),))?;
    }
    let task = py
        .detach(|| sandbox::spawn(cgroup, &spec))
        .map_err(NativeError::from)?;
    Ok(NativeTask::from(task))
}

/// Accounting as Python sees it: `wall_s` and the cgroup figures.
fn stats_dict<'py>(
    py: Python<'py>,
    wall: Duration,
    s: &agentnode_core::cgroup::CgroupStats,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("wall_s", wall.as_secs_f64())?;
    d.set_item(
        "cpu_user_s",
        Duration::from_micros(s.cpu_user_us).as_secs_f64(),
    )?;
    d.set_item(
        "cpu_system_s",
        Duration::from_micros(s.cpu_system_us).as_secs_f64(),
    )?;
    d.set_item("memory_current", s.memory_current)?;
    d.set_item("memory_peak", s.memory_peak)?;
    d.set_item("pids_current", s.pids_current)?;
    d.set_item("pids_peak", s.pids_peak)?;
    d.set_item("oom_kills", s.oom_kills)?;
    d.set_item("pids_limit_hits", s.pids_limit_hits)?;
    Ok(d)
}

/// A task cgroup of an earlier instance, taken over (see `CgroupManager.adopt`).
#[pyclass(module = "agentnode._native", frozen)]
pub struct AdoptedCgroup {
    inner: Mutex<Option<Box<dyn agentnode_core::cgroup::TaskCgroup>>>,
}

impl AdoptedCgroup {
    fn with<T>(
        &self,
        f: impl FnOnce(&dyn agentnode_core::cgroup::TaskCgroup) -> agentnode_core::cgroup::Result<T>,
    ) -> PyResult<Option<T>> {
        let guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match guard.as_deref() {
            Some(cg) => Ok(Some(f(cg).map_err(NativeError::from)?)),
            None => Ok(None),
        }
    }
}

#[pymethods]
impl AdoptedCgroup {
    /// The cgroup2 directory.
    #[getter]
    fn placement(&self) -> PyResult<Option<PathBuf>> {
        self.with(|cg| Ok(cg.placement().to_path_buf()))
    }

    /// SIGKILLs every process in it (cgroup.kill).
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.with(|cg| cg.kill()))?;
        Ok(())
    }

    /// Accounting as `NativeTask.stats` has it, with `wall_s` given by the caller.
    fn stats<'py>(&self, py: Python<'py>, wall_s: f64) -> PyResult<Bound<'py, PyDict>> {
        let s = py
            .detach(|| self.with(|cg| cg.stats()))?
            .unwrap_or_default();
        stats_dict(py, Duration::from_secs_f64(wall_s.max(0.0)), &s)
    }

    /// Gives the cgroup up as it is (its task runs on, for a later start to adopt).
    fn leave(&self) {
        let cg = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        std::mem::forget(cg);
    }

    /// Removes the cgroup (its processes must be gone). Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            drop(
                self.inner
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take(),
            );
        });
    }
}

impl From<Task> for NativeTask {
    fn from(task: Task) -> Self {
        Self {
            pid: task.pid(),
            pidfd: task.pidfd(),
            cgroup_dir: task.cgroup_dir().map(PathBuf::from),
            inner: Mutex::new(task),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CgroupManager>()?;
    m.add_class::<NativeTask>()?;
    m.add_class::<AdoptedCgroup>()?;
    m.add_function(wrap_pyfunction!(spawn, m)?)?;
    m.add_function(wrap_pyfunction!(sweep_cgroups, m)?)?;
    Ok(())
}
