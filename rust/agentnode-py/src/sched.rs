//! `agentnode._native.Scheduler`: the Rust scheduler (`agentnode_core::sched`) as a pyclass.
//! Arguments are copied into owned values, then the GIL is released around the locked work.

use agentnode_core::sched::{Class, Limits, Popped, Shared, Task};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;

use crate::errors::NativeError;

// Borrowed strings: copying every tenant and class name cost a third of `push_many`.
type TaskTuple = (u64, PyBackedStr, PyBackedStr, u64, u64);

/// Priority classes, weighted fair share between tenants, limits, aging and capacity admission.
#[pyclass(module = "agentnode._native", frozen)]
pub struct Scheduler {
    inner: Shared,
}

fn class(name: &str) -> PyResult<Class> {
    Ok(Class::parse(name).map_err(NativeError::from)?)
}

fn id_or_none(p: Option<Popped>) -> Option<u64> {
    p.map(|p| p.id)
}

// pyo3 extracts sequence arguments as owned Vecs; borrowing them is not an option.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl Scheduler {
    #[new]
    #[pyo3(signature = (*, tenant_limit = 0, class_limits = None, aging = 0))]
    fn new(
        tenant_limit: u32,
        class_limits: Option<std::collections::HashMap<String, u32>>,
        aging: u32,
    ) -> PyResult<Self> {
        let mut limits = Limits {
            tenant_running: tenant_limit,
            aging,
            ..Limits::default()
        };
        for (name, limit) in class_limits.unwrap_or_default() {
            limits.class_running[class(&name)? as usize] = limit;
        }
        Ok(Self {
            inner: Shared::new(limits),
        })
    }

    #[pyo3(signature = (tenant, *, weight = 1, limit = None))]
    fn set_tenant(
        &self,
        py: Python<'_>,
        tenant: &str,
        weight: u32,
        limit: Option<u32>,
    ) -> PyResult<()> {
        let tenant = tenant.to_owned();
        py.detach(|| self.inner.lock().set_tenant(&tenant, weight, limit))
            .map_err(NativeError::from)?;
        Ok(())
    }

    #[pyo3(signature = (id, tenant, cls, cpu = 0, mem = 0))]
    fn push(
        &self,
        py: Python<'_>,
        id: u64,
        tenant: &str,
        cls: &str,
        cpu: u64,
        mem: u64,
    ) -> PyResult<()> {
        let class = class(cls)?;
        let tenant = tenant.to_owned();
        py.detach(|| {
            self.inner.lock().push(&Task {
                id,
                tenant: &tenant,
                class,
                cpu,
                mem,
            })
        })
        .map_err(NativeError::from)?;
        Ok(())
    }

    fn push_many(&self, py: Python<'_>, tasks: Vec<TaskTuple>) -> PyResult<()> {
        let classes = tasks
            .iter()
            .map(|t| class(&t.2))
            .collect::<PyResult<Vec<_>>>()?;
        py.detach(|| {
            let batch: Vec<Task<'_>> = tasks
                .iter()
                .zip(classes)
                .map(|(t, class)| Task {
                    id: t.0,
                    tenant: &t.1,
                    class,
                    cpu: t.3,
                    mem: t.4,
                })
                .collect();
            self.inner.lock().push_many(&batch)
        })
        .map_err(NativeError::from)?;
        Ok(())
    }

    fn pop(&self, py: Python<'_>, free_cpu: u64, free_mem: u64) -> Option<u64> {
        py.detach(|| id_or_none(self.inner.lock().pop(free_cpu, free_mem)))
    }

    fn pop_many(&self, py: Python<'_>, n: usize, free_cpu: u64, free_mem: u64) -> Vec<u64> {
        py.detach(|| {
            self.inner
                .lock()
                .pop_many(n, free_cpu, free_mem)
                .into_iter()
                .map(|p| p.id)
                .collect()
        })
    }

    fn cancel(&self, py: Python<'_>, id: u64) -> PyResult<()> {
        py.detach(|| self.inner.lock().cancel(id))
            .map_err(NativeError::from)?;
        Ok(())
    }

    fn complete(&self, py: Python<'_>, id: u64) -> PyResult<()> {
        py.detach(|| self.inner.lock().complete(id))
            .map_err(NativeError::from)?;
        Ok(())
    }

    fn complete_many(&self, py: Python<'_>, ids: Vec<u64>) -> PyResult<()> {
        py.detach(|| {
            let mut s = self.inner.lock();
            ids.iter().try_for_each(|&id| s.complete(id).map(drop))
        })
        .map_err(NativeError::from)?;
        Ok(())
    }

    #[getter]
    fn queued(&self) -> usize {
        self.inner.lock().queued()
    }

    #[getter]
    fn running(&self) -> usize {
        self.inner.lock().running()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Scheduler>()
}
