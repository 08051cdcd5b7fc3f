//! Maps `agentnode-core` errors to the exception classes of `agentnode.errors`, so Python code
//! catches `agentnode.errors.CgroupError`, never a bare `RuntimeError`.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

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
    #[error("cannot encode the result as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl NativeError {
    /// The class in `agentnode.errors` that this error becomes.
    fn class_name(&self) -> &'static str {
        match self {
            Self::Cgroup(_) | Self::Sandbox(agentnode_core::sandbox::Error::Cgroup(_)) => {
                "CgroupError"
            }
            Self::Sandbox(_) => "SandboxError",
            Self::Vector(_) => "VectorError",
            Self::Json(_) => "AgentnodeError",
            Self::Sched(_) => "SchedulerError",
            Self::Egress(agentnode_core::egress::Error::Policy(_)) => "PolicyError",
            Self::Egress(_) | Self::Closed => "EgressError",
            Self::ExecTrace(_) | Self::ExecTracerClosed => "AuditError",
        }
    }
}

impl From<NativeError> for PyErr {
    fn from(err: NativeError) -> Self {
        let message = err.to_string();
        Python::attach(|py| {
            match py
                .import("agentnode.errors")
                .and_then(|m| m.getattr(err.class_name()))
            {
                Ok(class) => PyErr::from_value(
                    class
                        .call1((message,))
                        .unwrap_or_else(|e| e.into_value(py).into_bound(py).into_any()),
                ),
                // agentnode.errors ships in the same wheel; this arm only guards a broken install.
                Err(_) => PyRuntimeError::new_err(message),
            }
        })
    }
}
