//! `bld_remote.persist` from inside Blender (blender-remote's in-Blender API): the same bounded store that
//! `put_persist_data`/`get_persist_data` use over the wire (`bld_remote_core::persist`), so a script and
//! a client see the same data. Values go in as JSON (converted like results) and come out as new Python
//! objects. The store belongs to the running service: without one, these raise `RuntimeError`.
//!
//! Runs on the calling Python thread (Blender's main thread in practice), holding the GIL.

use std::sync::Arc;

use bld_remote_core::server::Shared;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::convert::{json_to_py, py_to_json};
use crate::service::current;

fn store() -> PyResult<Arc<Shared>> {
    current().map(|(s, _)| s).ok_or_else(|| {
        PyRuntimeError::new_err(
            "bld_remote's service is not running: persist data lives in the service (start_mcp_service() first)",
        )
    })
}

/// Store `data` (converted to JSON) under `key`, replacing what was there. `ValueError` past a limit.
#[pyfunction]
pub fn persist_put(key: String, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let shared = store()?;
    let value = py_to_json(data, 0);
    shared
        .persist()
        .put(key, value)
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The value stored under `key`, or `default`.
#[pyfunction]
#[pyo3(signature = (key, default=None))]
pub fn persist_get(py: Python<'_>, key: &str, default: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
    let shared = store()?;
    match shared.persist().get(key) {
        Some(v) => Ok(json_to_py(py, &v)?.unbind()),
        None => Ok(default.unwrap_or_else(|| py.None())),
    }
}

/// Remove `key`; True if it was there.
#[pyfunction]
pub fn persist_remove(key: &str) -> PyResult<bool> {
    Ok(store()?.persist().remove(key))
}

/// Every key stored.
#[pyfunction]
pub fn persist_keys() -> PyResult<Vec<String>> {
    Ok(store()?.persist().keys())
}
