//! `ExecTracerHandle`: exec tracing for one node instance (`agentnode_core::exectrace`). Python
//! (`agentnode.audit.execs`) maps cgroup ids to tasks and writes the audit records.

use std::path::PathBuf;
use std::sync::Mutex;

use agentnode_core::exectrace::{self, ExecTracer};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::{with_open, NativeError};

/// One exec: `(cgroup_id, time_ns, pid, ppid, uid, filename, argv, argv_truncated)`.
type RawEvent<'py> = (
    u64,
    u64,
    u32,
    u32,
    u32,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    bool,
);

/// The exec tracer attached for one cgroup2 subtree; `close()` (or garbage collection, or
/// process exit) detaches it.
#[pyclass(module = "agentnode._native")]
pub struct ExecTracerHandle {
    inner: Mutex<Option<ExecTracer>>,
}

impl ExecTracerHandle {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut ExecTracer) -> Result<T, exectrace::Error> + Send,
    ) -> PyResult<T> {
        with_open(py, &self.inner, NativeError::ExecTracerClosed, f)
    }
}

// pyo3 extracts arguments as owned values; borrowing them would not save a copy.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl ExecTracerHandle {
    #[new]
    fn new(py: Python<'_>, instance: PathBuf, level: u32) -> PyResult<Self> {
        let t = py
            .detach(|| ExecTracer::attach(&instance, level))
            .map_err(NativeError::from)?;
        Ok(Self {
            inner: Mutex::new(Some(t)),
        })
    }

    /// Execs queued since the last call.
    fn events<'py>(&self, py: Python<'py>) -> PyResult<Vec<RawEvent<'py>>> {
        let events = self.with(py, |t| Ok(t.events()))?;
        Ok(events
            .into_iter()
            .map(|e| {
                (
                    e.cgroup,
                    e.time_ns,
                    e.pid,
                    e.ppid,
                    e.uid,
                    PyBytes::new(py, &e.filename),
                    PyBytes::new(py, &e.argv),
                    e.argv_truncated,
                )
            })
            .collect())
    }

    /// Execs lost to a full ring buffer since attach.
    fn lost(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |t| t.lost())
    }

    /// A file descriptor that polls readable when events are queued.
    fn events_fd(&self, py: Python<'_>) -> PyResult<i32> {
        self.with(py, |t| Ok(t.events_fd()))
    }

    /// Detaches the program and frees the maps; idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            self.inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        });
    }
}

/// The cgroup2 id of a cgroup2 directory (what BPF's cgroup helpers return).
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // pyo3 extracts arguments as owned values
fn cgroup_id(dir: PathBuf) -> PyResult<u64> {
    Ok(exectrace::cgroup_id(&dir).map_err(NativeError::from)?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ExecTracerHandle>()?;
    m.add_function(wrap_pyfunction!(cgroup_id, m)?)
}
