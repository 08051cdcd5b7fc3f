//! `TaskNetwork`: the node side of task networking (`agentnode_core::tasknet`), for
//! `agentnode.egress.network`, which keeps the names, addresses and owners.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use agentnode_core::tasknet::{netns_state, NetnsState, NodeSide, TaskSpec};
use pyo3::prelude::*;

use crate::errors::NativeError;

/// A link: its name, alias and master's name.
type LinkRow = (String, Option<String>, Option<String>);

/// An rtnetlink socket in the namespace of the node's bridge.
#[pyclass(module = "agentnode._native", frozen)]
pub struct TaskNetwork {
    inner: NodeSide,
}

// pyo3 extracts arguments as owned values; borrowing them would not save a copy.
#[allow(clippy::needless_pass_by_value, clippy::too_many_arguments)]
#[pymethods]
impl TaskNetwork {
    #[new]
    #[pyo3(signature = (*, node_netns=None))]
    fn new(py: Python<'_>, node_netns: Option<PathBuf>) -> PyResult<Self> {
        let inner = py
            .detach(|| NodeSide::open(node_netns.as_deref()))
            .map_err(NativeError::from)?;
        Ok(Self { inner })
    }

    /// Every link: `(name, alias, master)`.
    fn links(&self, py: Python<'_>) -> PyResult<Vec<LinkRow>> {
        let links = py
            .detach(|| self.inner.links())
            .map_err(NativeError::from)?;
        Ok(links
            .into_iter()
            .map(|l| (l.name, l.alias, l.master))
            .collect())
    }

    /// Makes a task's netns and veth; `address` and `gateway` as integers (`int(IPv4Address)`).
    #[pyo3(signature = (*, netns, veth, alias, bridge, address, prefix, gateway))]
    fn add_task(
        &self,
        py: Python<'_>,
        netns: String,
        veth: String,
        alias: String,
        bridge: String,
        address: u32,
        prefix: u8,
        gateway: u32,
    ) -> PyResult<()> {
        let spec = TaskSpec {
            netns,
            veth,
            alias,
            bridge,
            address: Ipv4Addr::from(address),
            prefix,
            gateway: Ipv4Addr::from(gateway),
        };
        py.detach(|| self.inner.add_task(&spec))
            .map_err(NativeError::from)?;
        Ok(())
    }

    /// Whether the netns name was there.
    #[pyo3(signature = (*, netns))]
    fn release_task(&self, py: Python<'_>, netns: String) -> PyResult<bool> {
        Ok(py
            .detach(|| self.inner.release_task(&netns))
            .map_err(NativeError::from)?)
    }

    /// What the name `netns` under /run/netns holds: "absent", "unmounted" (a file, no
    /// namespace), "orphaned" (a namespace without its task link) or "live".
    #[staticmethod]
    #[pyo3(signature = (netns))]
    fn netns_state(py: Python<'_>, netns: String) -> PyResult<&'static str> {
        let state = py
            .detach(|| netns_state(&netns))
            .map_err(NativeError::from)?;
        Ok(match state {
            NetnsState::Absent => "absent",
            NetnsState::Unmounted => "unmounted",
            NetnsState::Orphaned => "orphaned",
            NetnsState::Live => "live",
        })
    }

    /// `(veth was there, netns was there)`.
    #[pyo3(signature = (*, veth, netns))]
    fn remove_task(&self, py: Python<'_>, veth: String, netns: String) -> PyResult<(bool, bool)> {
        Ok(py
            .detach(|| self.inner.remove_task(&veth, &netns))
            .map_err(NativeError::from)?)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TaskNetwork>()
}
