//! Python bindings for Layer 1: the node instance's `Launcher` (its cgroup subtree and task
//! starts) and the task handle (`NativeTask`). Policy (defaults, parsing, timeouts, exit
//! reasons) is Python's.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use agentnode_core::cgroup::Limits;
use agentnode_core::sandbox::{self, Bind, Spec, Task};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::errors::NativeError;

/// How this node instance starts its tasks (see `agentnode_core::sandbox::Launcher`): its
/// cgroup subtree, made when it is (sweeping dead instances' leftovers), and its zygote pool.
#[pyclass(module = "agentnode._native", frozen)]
pub struct Launcher {
    inner: sandbox::Launcher,
}

#[pymethods]
impl Launcher {
    /// Sweeps dead instances' task cgroups, then makes this instance's subtree: `n<pid>-<start>`,
    /// or with a `node` name, `k<node>`, whose tasks may outlive this process (its earlier
    /// process's task cgroups are swept, but those named in `spare`, `TASK`: re-adopted now).
    #[new]
    #[pyo3(signature = (*, node=String::new(), spare=Vec::new()))]
    #[allow(clippy::needless_pass_by_value)] // pyo3 hands over owned values
    fn new(py: Python<'_>, node: String, spare: Vec<String>) -> PyResult<Self> {
        let inner = py
            .detach(|| sandbox::Launcher::new(&node, &spare))
            .map_err(NativeError::from)?;
        Ok(Self { inner })
    }

    /// Starts the task `spec` (an `agentnode.isolation.launch.Launch`) describes; returns once
    /// it has exec'd its command. `before_start` is called with the task's cgroup2 directory
    /// after it is made and before any process joins it.
    #[pyo3(signature = (spec, *, before_start=None))]
    #[allow(clippy::needless_pass_by_value)] // pyo3 hands over owned values
    fn start(
        &self,
        py: Python<'_>,
        spec: LaunchSpec,
        before_start: Option<Py<PyAny>>,
    ) -> PyResult<NativeTask> {
        let spec = &spec.0;
        let task = match before_start {
            None => py.detach(|| self.inner.start::<NativeError>(spec, None)),
            // The hook is Python: it runs with the GIL taken again, on this thread.
            Some(hook) => py.detach(|| {
                let mut call = |dir: &Path| -> Result<(), NativeError> {
                    Python::attach(|py| hook.call1(py, (dir.to_path_buf(),)))?;
                    Ok(())
                };
                self.inner.start(spec, Some(&mut call))
            }),
        }?;
        Ok(NativeTask::from(task))
    }

    /// The zygotes ready now (tasks started ahead, waiting for their command): host pid to
    /// the name of its task cgroup.
    fn zygotes(&self) -> std::collections::HashMap<i32, String> {
        self.inner.zygotes().into_iter().collect()
    }

    /// The instance name, `n<pid>-<starttime>`.
    #[getter]
    fn name(&self) -> String {
        self.inner.name()
    }

    /// This instance's directories in every hierarchy (cgroup2 first).
    fn dirs(&self) -> Vec<PathBuf> {
        self.inner.dirs()
    }

    /// Names of the task cgroups made ahead of time, not yet given to a task.
    fn spares(&self) -> Vec<String> {
        self.inner.spares()
    }

    /// Takes over task cgroup `name` (`TASK`) an earlier process of this node left running,
    /// spared at construction.
    fn adopt(&self, py: Python<'_>, name: &str) -> PyResult<AdoptedCgroup> {
        let cg = py
            .detach(|| self.inner.adopt(name))
            .map_err(NativeError::from)?;
        Ok(AdoptedCgroup {
            inner: Mutex::new(Some(cg)),
        })
    }

    /// Removes the instance's subtree (its tasks must be gone). Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
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
    start_ticks: Option<u64>,
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

    /// Its init's start time in clock ticks since boot, for a task started with `outlive`
    /// (None for the others, or when its init was gone by the end of its start).
    #[getter]
    fn start_ticks(&self) -> Option<u64> {
        self.start_ticks
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

    /// `(cpu_s, memory_peak)` of the running task (two files, not the eight of `stats`);
    /// None once it is reaped.
    fn usage(&self, py: Python<'_>) -> Option<(f64, u64)> {
        py.detach(|| self.lock().usage())
            .map(|u| (Duration::from_micros(u.cpu_us).as_secs_f64(), u.memory_peak))
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

/// An `agentnode.isolation.launch.Launch` read into the core's `Spec`, each field from the
/// attribute of the same name (so a new option is one more name in the lists below).
pub struct LaunchSpec(Spec);

/// `$ty { $name: <the attribute $name of $o>, ..., $field: $value, ... }`.
macro_rules! by_name {
    ($o:expr, $ty:ident { $($name:ident),* ; $($field:ident: $value:expr),* $(,)? }) => {
        $ty {
            $($name: field($o, pyo3::intern!($o.py(), stringify!($name)))?,)*
            $($field: $value,)*
        }
    };
}

impl<'py> FromPyObject<'_, 'py> for LaunchSpec {
    type Error = PyErr;

    fn extract(o: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        let binds: Vec<(PathBuf, PathBuf, bool)> = field(o, pyo3::intern!(o.py(), "binds"))?;
        let binds = binds
            .into_iter()
            .map(|(src, dest, writable)| Bind {
                src,
                dest,
                writable,
            })
            .collect();
        let limits = by_name!(o, Limits {
            cpu_quota_us, cpu_period_us, cpu_weight, memory_max, memory_high, swap_max, pids_max;
        });
        Ok(Self(by_name!(o, Spec {
            argv, env, cwd, hostname, rootfs, stage, workspace, tmp_size, uid, gid, userns_base,
            netns, stdio, nofile, seccomp, keep_caps, outlive;
            binds: binds, limits: limits,
        })))
    }
}

/// The attribute `name` of `o` as a `T`; a missing or mistyped one is an error that names it.
/// (Names are interned: a start reads some 25 of them.)
fn field<'py, T>(o: Borrowed<'_, 'py, PyAny>, name: &Bound<'py, PyString>) -> PyResult<T>
where
    T: for<'a> FromPyObject<'a, 'py, Error = PyErr>,
{
    let named = |e: PyErr| PyTypeError::new_err(format!("Launch.{name}: {e}"));
    o.getattr(name).and_then(|v| v.extract()).map_err(named)
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
            start_ticks: task.start_ticks(),
            inner: Mutex::new(task),
        }
    }
}

/// From now on this process makes nothing ahead of its starts (spare task cgroups, network
/// namespaces, zygotes): for a process that starts one task and exits.
#[pyfunction]
fn make_nothing_ahead() {
    agentnode_core::background::ahead::make_none();
}

/// Builds ahead what `confine_self` takes (the seccomp program, the Landlock ruleset), for a
/// server whose forks each confine themselves (`agentnode_core::sandbox::confine_ahead`).
#[pyfunction]
fn confine_ahead() -> PyResult<()> {
    sandbox::confine_ahead().map_err(|e| NativeError::from(e).into())
}

/// Gives this process what a task's command has at exec (`agentnode_core::sandbox::confine_self`):
/// rlimits, capabilities (all dropped but `keep_caps`), ids, `no_new_privs`, Landlock and, with
/// `seccomp`, the default filter. For a single-threaded process forked into a running task; a
/// step that fails writes its record to `err` and ends the process (status 127).
#[pyfunction]
#[pyo3(signature = (*, uid, gid, keep_caps, nofile, seccomp, err))]
fn confine_self(
    uid: u32,
    gid: u32,
    keep_caps: Vec<u32>,
    nofile: u64,
    seccomp: bool,
    err: i32,
) -> PyResult<()> {
    let confine = sandbox::Confine {
        uid,
        gid,
        keep_caps,
        nofile,
        seccomp,
    };
    sandbox::confine_self(&confine, err).map_err(|e| NativeError::from(e).into())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(make_nothing_ahead, m)?)?;
    m.add_function(wrap_pyfunction!(confine_ahead, m)?)?;
    m.add_function(wrap_pyfunction!(confine_self, m)?)?;
    m.add_class::<Launcher>()?;
    m.add_class::<NativeTask>()?;
    m.add_class::<AdoptedCgroup>()?;
    m.add_function(wrap_pyfunction!(sweep_cgroups, m)?)?;
    Ok(())
}
