//! Maps `agentnode-core` errors to the exception classes of `agentnode.errors`, so Python code
//! catches `agentnode.errors.CgroupError`, never a bare `RuntimeError`.

use pyo3::PyErr;

/// Every error that can cross into Python.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error(transparent)]
    Cgroup(#[from] agentnode_core::cgroup::Error),
    #[error(transparent)]
    Sandbox(#[from] agentnode_core::sandbox::Error),
    #[error(transparent)]
    Sched(#[from] agentnode_core::sched::Error),
    #[error(transparent)]
    Vector(#[from] agentnode_core::vector::Error),
    #[error(transparent)]
    Egress(#[from] agentnode_core::egress::Error),
    #[error("the egress handle is closed (attach a new one)")]
    Closed,
    #[error(transparent)]
    ExecTrace(#[from] agentnode_core::exectrace::Error),
    #[error("the exec tracer is closed (attach a new one)")]
    ExecTracerClosed,
    #[error(transparent)]
    Exits(#[from] agentnode_core::exits::Error),
    #[error(transparent)]
    TaskNet(#[from] agentnode_core::tasknet::Error),
    #[error("cannot encode the result as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Raised by Python code the Rust side called (a hook), passed on as it is.
    #[error(transparent)]
    Python(#[from] PyErr),
}

// The classes of `agentnode.errors`, imported once, on first use: Python code catches those,
// never a bare `RuntimeError`.
pyo3::import_exception!(agentnode.errors, AgentnodeError);
pyo3::import_exception!(agentnode.errors, AuditError);
pyo3::import_exception!(agentnode.errors, CgroupError);
pyo3::import_exception!(agentnode.errors, EgressError);
pyo3::import_exception!(agentnode.errors, PolicyError);
pyo3::import_exception!(agentnode.errors, SandboxError);
pyo3::import_exception!(agentnode.errors, SchedulerError);
pyo3::import_exception!(agentnode.errors, VectorError);

impl From<NativeError> for PyErr {
    fn from(err: NativeError) -> Self {
        if let NativeError::Python(err) = err {
            return err;
        }
        let message = err.to_string();
        match err {
            NativeError::Cgroup(_)
            | NativeError::Sandbox(agentnode_core::sandbox::Error::Cgroup(_)) => {
                CgroupError::new_err(message)
            }
            NativeError::Sandbox(_) | NativeError::Exits(_) => SandboxError::new_err(message),
            NativeError::Vector(_) => VectorError::new_err(message),
            NativeError::Json(_) => AgentnodeError::new_err(message),
            NativeError::Sched(_) => SchedulerError::new_err(message),
            NativeError::Egress(agentnode_core::egress::Error::Policy(_)) => {
                PolicyError::new_err(message)
            }
            NativeError::Egress(_) | NativeError::Closed | NativeError::TaskNet(_) => {
                EgressError::new_err(message)
            }
            NativeError::ExecTrace(_) | NativeError::ExecTracerClosed => {
                AuditError::new_err(message)
            }
            NativeError::Python(_) => unreachable!("returned above"),
        }
    }
}

/// Runs `f` on the object a handle holds in `slot`, with the GIL released; `closed` once the
/// handle was closed. A poisoned lock is taken as it is: the object stays usable.
pub(crate) fn with_open<H: Send, T: Send, E>(
    py: pyo3::Python<'_>,
    slot: &std::sync::Mutex<Option<H>>,
    closed: NativeError,
    f: impl FnOnce(&mut H) -> Result<T, E> + Send,
) -> pyo3::PyResult<T>
where
    NativeError: From<E>,
{
    py.detach(|| {
        let mut guard = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let h = guard.as_mut().ok_or(closed)?;
        f(h).map_err(NativeError::from)
    })
    .map_err(PyErr::from)
}
