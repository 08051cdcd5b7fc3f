//! `ExitRecorder`: exit statuses of tasks the node is not the parent of
//! (`agentnode_core::exits`), for the node's live restore (`agentnode.node.restore`).

use std::path::PathBuf;
use std::sync::Mutex;

use agentnode_core::exits;
use pyo3::prelude::*;

use crate::errors::NativeError;

/// The recorder pinned under one bpffs directory (loaded and pinned on first open).
#[pyclass(module = "agentnode._native", frozen)]
pub struct ExitRecorder {
    inner: Mutex<exits::ExitRecorder>,
}

impl ExitRecorder {
    /// `f` with the GIL held: a map lookup or update is a few microseconds, less than giving
    /// the GIL up and taking it back costs the node's event loop (whose thread calls these on
    /// every task start and end) when another thread is waiting for it.
    fn quick<T>(
        &self,
        f: impl FnOnce(&mut exits::ExitRecorder) -> exits::Result<T>,
    ) -> PyResult<T> {
        let mut r = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(f(&mut r).map_err(NativeError::from)?)
    }

    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut exits::ExitRecorder) -> exits::Result<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut r = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut r).map_err(NativeError::from)
        })
        .map_err(PyErr::from)
    }
}

// pyo3 extracts arguments as owned values; borrowing them would not save a copy.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl ExitRecorder {
    #[new]
    fn new(py: Python<'_>, pin_dir: PathBuf) -> PyResult<Self> {
        let r = py
            .detach(|| exits::ExitRecorder::open(&pin_dir))
            .map_err(NativeError::from)?;
        Ok(Self {
            inner: Mutex::new(r),
        })
    }

    /// Records the exit status of `pid`, started at `start_ticks` (`/proc/PID/stat` field 22).
    fn watch(&self, pid: u32, start_ticks: u64) -> PyResult<()> {
        self.quick(|r| r.watch(pid, start_ticks))
    }

    /// The wait status recorded for `pid` started at `start_ticks`, or None.
    fn status(&self, pid: u32, start_ticks: u64) -> PyResult<Option<i32>> {
        self.quick(|r| r.status(pid, start_ticks))
    }

    /// Stops watching `pid`.
    fn forget(&self, pid: u32) -> PyResult<()> {
        self.quick(|r| r.forget(pid))
    }

    /// The pids watched now.
    fn watched(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        self.with(py, |r| Ok(r.watched()))
    }

    /// Unpins the recorder under `pin_dir`; whether anything was pinned.
    #[staticmethod]
    fn remove(py: Python<'_>, pin_dir: PathBuf) -> PyResult<bool> {
        Ok(py
            .detach(|| exits::ExitRecorder::remove(&pin_dir))
            .map_err(NativeError::from)?)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ExitRecorder>()
}
