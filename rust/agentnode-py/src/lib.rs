//! `agentnode._native`: the thin pyo3 layer over `agentnode-core`. It copies Python inputs into
//! owned Rust values, releases the GIL around blocking work, and maps errors to the exceptions
//! of `agentnode.errors`. Typed in `python/agentnode/_native.pyi`.

mod egress;
mod errors;
mod exectrace;
mod exits;
mod isolation;
mod sched;
mod tasknet;
mod vector;

use pyo3::prelude::*;

use errors::NativeError;

/// Does nothing: the benchmark harness measures the cost of one call into the extension.
#[pyfunction]
fn noop() {}

/// Runs every doctor probe and returns the report as JSON (schema `docs/doctor.schema.json`).
#[pyfunction]
fn doctor(py: Python<'_>) -> PyResult<String> {
    let report = py.detach(agentnode_core::doctor::run);
    Ok(serde_json::to_string(&report).map_err(NativeError::from)?)
}

/// This process's cgroup layout and directories, as JSON.
#[pyfunction]
fn cgroup_hierarchy(py: Python<'_>) -> PyResult<String> {
    let h = py
        .detach(agentnode_core::cgroup::Hierarchy::detect)
        .map_err(NativeError::from)?;
    Ok(serde_json::to_string(&h).map_err(NativeError::from)?)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(noop, m)?)?;
    m.add_function(wrap_pyfunction!(doctor, m)?)?;
    m.add_function(wrap_pyfunction!(cgroup_hierarchy, m)?)?;
    isolation::register(m)?;
    sched::register(m)?;
    vector::register(m)?;
    egress::register(m)?;
    exectrace::register(m)?;
    exits::register(m)?;
    tasknet::register(m)?;
    Ok(())
}
