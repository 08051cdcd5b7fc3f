//! `agentnode._native.Scheduler`: the Rust scheduler (`agentnode_core::sched`) as a pyclass.
//! Arguments are copied into owned values, then the GIL is released around the locked work.

use std::collections::HashMap;

use agentnode_core::sched::{Class, Limits, Popped, Shared, Task};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::errors::NativeError;

/// Tenant and class name objects of a batch remembered by identity; more are looked up by text.
const RECENT_NAMES: usize = 16;

/// Priority classes, weighted fair share between tenants, limits, aging and capacity admission.
#[pyclass(module = "agentnode._native", frozen)]
pub struct Scheduler {
    inner: Shared,
}

fn class(name: &str) -> PyResult<Class> {
    Ok(Class::parse(name).map_err(NativeError::from)?)
}

fn not_str(what: &str, got: &Bound<'_, PyAny>) -> PyErr {
    PyTypeError::new_err(format!("{what} must be a str, got {}", repr(got)))
}

fn repr(obj: &Bound<'_, PyAny>) -> String {
    obj.repr()
        .map_or_else(|_| "?".to_owned(), |r| r.to_string())
}

/// What `make` gives for the str `obj` (a `what`), remembered by the object's identity for the
/// first [`RECENT_NAMES`] objects: held in `seen`, so no other object can take their address.
fn remembered<'py, T: Copy>(
    seen: &mut Vec<(Bound<'py, PyAny>, T)>,
    obj: &Bound<'py, PyAny>,
    what: &str,
    make: impl FnOnce(&str) -> PyResult<T>,
) -> PyResult<T> {
    if let Some((_, v)) = seen.iter().find(|(o, _)| o.is(obj)) {
        return Ok(*v);
    }
    let text = obj.cast::<PyString>().map_err(|_| not_str(what, obj))?;
    let v = make(text.to_str()?)?;
    if seen.len() < RECENT_NAMES {
        seen.push((obj.clone(), v));
    }
    Ok(v)
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
        class_limits: Option<HashMap<String, u32>>,
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

    /// Reads the tuples straight from Python objects: converting each into owned Rust values
    /// (pyo3's `Vec<(u64, String, ...)>`) took twice as long as queueing them. A batch names few
    /// tenants and classes, mostly as the same few `str` objects: those are recognised by identity
    /// (held, so no other object can take their address), any other by its text, and each tenant
    /// name is copied once.
    fn push_many(&self, py: Python<'_>, tasks: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut tenants: Vec<(Bound<'_, PyAny>, usize)> = Vec::new();
        let mut classes: Vec<(Bound<'_, PyAny>, Class)> = Vec::new();
        let mut rows: Vec<(u64, usize, Class, u64, u64)> = Vec::new();
        for item in tasks.try_iter()? {
            let item = item?;
            let t = item
                .cast::<PyTuple>()
                .ok()
                .filter(|t| t.len() == 5)
                .ok_or_else(|| {
                    PyTypeError::new_err(format!(
                        "push_many takes (id, tenant, class, cpu, mem) tuples, got {}",
                        repr(&item)
                    ))
                })?;
            let tenant = remembered(&mut tenants, &*t.get_borrowed_item(1)?, "tenant", |text| {
                if let Some(&i) = by_name.get(text) {
                    return Ok(i);
                }
                let i = by_name.len();
                by_name.insert(text.to_owned(), i);
                Ok(i)
            })?;
            let class = remembered(&mut classes, &*t.get_borrowed_item(2)?, "class", class)?;
            rows.push((
                t.get_borrowed_item(0)?.extract()?,
                tenant,
                class,
                t.get_borrowed_item(3)?.extract()?,
                t.get_borrowed_item(4)?.extract()?,
            ));
        }
        let mut names = vec![""; by_name.len()];
        for (name, &i) in &by_name {
            names[i] = name;
        }
        py.detach(|| {
            let batch: Vec<Task<'_>> = rows
                .iter()
                .map(|&(id, tenant, class, cpu, mem)| Task {
                    id,
                    tenant: names[tenant],
                    class,
                    cpu,
                    mem,
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
            ids.iter().try_for_each(|&id| s.complete(id))
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
