//! `agentnode._native.VectorCollection`: one usearch-backed collection. Vectors arrive through
//! the buffer protocol (numpy float32 arrays, `array('f')`), are copied once into owned memory,
//! and every add, search and save runs with the GIL released.

use std::collections::HashSet;
use std::path::PathBuf;

use agentnode_core::vector::{Collection, Filter, Hit, Label, Options};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::NativeError;

type Labels4 = (String, String, String, Vec<u8>);

fn floats(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    let buffer = PyBuffer::<f32>::get(data).map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(
            "vectors must be a float32 buffer (a numpy float32 array or array('f'))",
        )
    })?;
    buffer.to_vec(py)
}

fn hits(found: Vec<Hit>) -> Vec<(u64, f32)> {
    found.into_iter().map(|h| (h.key, h.distance)).collect()
}

fn filter(
    tenant: Option<String>,
    namespace: Option<String>,
    task: Option<String>,
    keys: Option<HashSet<u64>>,
) -> Filter {
    Filter {
        tenant,
        namespace,
        task,
        keys,
    }
}

/// An HNSW vector collection with per-key labels (tenant, namespace, task, payload).
#[pyclass(module = "agentnode._native", frozen)]
pub struct VectorCollection {
    inner: Collection,
}

fn options(
    dims: usize,
    metric: &str,
    dtype: &str,
    connectivity: usize,
    expansion_add: usize,
    expansion_search: usize,
) -> Result<Options, NativeError> {
    Ok(Options {
        dims,
        metric: metric.parse()?,
        dtype: dtype.parse()?,
        connectivity,
        expansion_add,
        expansion_search,
    })
}

// pyo3 extracts arguments into owned values; borrowing them is not an option here.
#[allow(clippy::needless_pass_by_value)]
#[pymethods]
impl VectorCollection {
    #[new]
    #[pyo3(signature = (dims, *, metric="cos", dtype="f32", connectivity=0, expansion_add=0, expansion_search=0))]
    fn new(
        dims: usize,
        metric: &str,
        dtype: &str,
        connectivity: usize,
        expansion_add: usize,
        expansion_search: usize,
    ) -> PyResult<Self> {
        let opts = options(
            dims,
            metric,
            dtype,
            connectivity,
            expansion_add,
            expansion_search,
        )?;
        Ok(Self {
            inner: Collection::new(opts).map_err(NativeError::from)?,
        })
    }

    /// Loads a file written by `save`; raises `VectorError` if it is missing, corrupt or of
    /// another shape.
    #[staticmethod]
    #[pyo3(signature = (path, dims, *, metric="cos", dtype="f32", connectivity=0, expansion_add=0, expansion_search=0))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        dims: usize,
        metric: &str,
        dtype: &str,
        connectivity: usize,
        expansion_add: usize,
        expansion_search: usize,
    ) -> PyResult<Self> {
        let opts = options(
            dims,
            metric,
            dtype,
            connectivity,
            expansion_add,
            expansion_search,
        )?;
        let inner = py
            .detach(|| Collection::load(&path, opts))
            .map_err(NativeError::from)?;
        Ok(Self { inner })
    }

    #[getter]
    fn dims(&self) -> usize {
        self.inner.options().dims
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    #[getter]
    fn memory_usage(&self) -> usize {
        self.inner.memory_usage()
    }

    #[getter]
    fn expansion_search(&self) -> usize {
        self.inner.expansion_search()
    }

    /// Changes the search-time candidate list size (`ef`) for later searches.
    fn set_expansion_search(&self, ef: usize) -> PyResult<()> {
        self.inner
            .set_expansion_search(ef)
            .map_err(NativeError::from)?;
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, key: u64) -> bool {
        self.inner.contains(key)
    }

    /// `(tenant, namespace, task, payload)` of `key`, or None.
    fn label<'py>(
        &self,
        py: Python<'py>,
        key: u64,
    ) -> Option<(String, String, String, Bound<'py, PyBytes>)> {
        self.inner
            .label(key)
            .map(|l| (l.tenant, l.namespace, l.task, PyBytes::new(py, &l.payload)))
    }

    #[pyo3(signature = (key, vector, *, tenant, namespace, task, payload=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn upsert(
        &self,
        py: Python<'_>,
        key: u64,
        vector: &Bound<'_, PyAny>,
        tenant: String,
        namespace: String,
        task: String,
        payload: Vec<u8>,
    ) -> PyResult<()> {
        let vector = floats(py, vector)?;
        let label = Label {
            tenant,
            namespace,
            task,
            payload,
        };
        py.detach(|| self.inner.upsert(key, &vector, label))
            .map_err(NativeError::from)?;
        Ok(())
    }

    /// `vectors` holds `len(keys) * dims` float32 values; `labels` one
    /// `(tenant, namespace, task, payload)` per key.
    #[pyo3(signature = (keys, vectors, labels, *, threads=2))]
    fn upsert_batch(
        &self,
        py: Python<'_>,
        keys: Vec<u64>,
        vectors: &Bound<'_, PyAny>,
        labels: Vec<Labels4>,
        threads: usize,
    ) -> PyResult<()> {
        let vectors = floats(py, vectors)?;
        let labels = labels
            .into_iter()
            .map(|(tenant, namespace, task, payload)| Label {
                tenant,
                namespace,
                task,
                payload,
            })
            .collect();
        py.detach(|| self.inner.upsert_batch(&keys, &vectors, labels, threads))
            .map_err(NativeError::from)?;
        Ok(())
    }

    /// Raises `VectorError` unless every key is usable and `vectors` holds `len(keys) * dims`
    /// finite float32 values; writes nothing.
    fn check_batch(
        &self,
        py: Python<'_>,
        keys: Vec<u64>,
        vectors: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let vectors = floats(py, vectors)?;
        py.detach(|| self.inner.check_batch(&keys, &vectors))
            .map_err(NativeError::from)?;
        Ok(())
    }

    fn delete(&self, py: Python<'_>, key: u64) -> PyResult<bool> {
        Ok(py
            .detach(|| self.inner.delete(key))
            .map_err(NativeError::from)?)
    }

    /// The `k` nearest `(key, distance)` pairs passing the filter, closest first.
    #[pyo3(signature = (query, k, *, tenant=None, namespace=None, task=None, keys=None))]
    #[allow(clippy::too_many_arguments)]
    fn search(
        &self,
        py: Python<'_>,
        query: &Bound<'_, PyAny>,
        k: usize,
        tenant: Option<String>,
        namespace: Option<String>,
        task: Option<String>,
        keys: Option<HashSet<u64>>,
    ) -> PyResult<Vec<(u64, f32)>> {
        let query = floats(py, query)?;
        let f = filter(tenant, namespace, task, keys);
        let found = py
            .detach(|| self.inner.search(&query, k, &f))
            .map_err(NativeError::from)?;
        Ok(hits(found))
    }

    /// One result list per query row of `queries` (`n * dims` float32 values).
    #[pyo3(signature = (queries, k, *, tenant=None, namespace=None, task=None, keys=None, threads=2))]
    #[allow(clippy::too_many_arguments)]
    fn search_batch(
        &self,
        py: Python<'_>,
        queries: &Bound<'_, PyAny>,
        k: usize,
        tenant: Option<String>,
        namespace: Option<String>,
        task: Option<String>,
        keys: Option<HashSet<u64>>,
        threads: usize,
    ) -> PyResult<Vec<Vec<(u64, f32)>>> {
        let queries = floats(py, queries)?;
        let f = filter(tenant, namespace, task, keys);
        let found = py
            .detach(|| self.inner.search_batch(&queries, k, &f, threads))
            .map_err(NativeError::from)?;
        Ok(found.into_iter().map(hits).collect())
    }

    /// Writes the collection to `path` atomically (temp file, fsync, rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path))
            .map_err(NativeError::from)?;
        Ok(())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<VectorCollection>()
}
