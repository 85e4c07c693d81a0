//! `bld_remote._core`: the native module that Blender's process loads, and nothing more. It joins the
//! pure-Rust service (crates/core: protocol, jobs, server, client) to Python: the main-thread pump, JSON to
//! Python and back, `OutputCapture`, the Client binding, and errors as exceptions. The command line and the
//! MCP server are a separate binary (crates/cli) and are never linked here.
//! This file is only the manifest of modules and exports.

mod error;
mod py;
mod py_capture;
mod py_client;

use bld_remote_core::{client, instances, jobs, protocol, server};
use pyo3::prelude::*;

/// The native half of the `bld_remote` package. Use the Python API in `bld_remote`, not this directly.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", bld_remote_core::config::VERSION)?;
    m.add("DEFAULT_PORT", bld_remote_core::config::DEFAULT_PORT)?;
    m.add("DEFAULT_HOST", bld_remote_core::config::DEFAULT_HOST)?;
    m.add_function(wrap_pyfunction!(py::start, m)?)?;
    m.add_function(wrap_pyfunction!(py::stop, m)?)?;
    m.add_function(wrap_pyfunction!(py::request_stop, m)?)?;
    m.add_function(wrap_pyfunction!(py::is_running, m)?)?;
    m.add_function(wrap_pyfunction!(py::stop_requested, m)?)?;
    m.add_function(wrap_pyfunction!(py::status, m)?)?;
    m.add_function(wrap_pyfunction!(py::step, m)?)?;
    m.add_function(wrap_pyfunction!(py::serve_forever, m)?)?;
    m.add_function(wrap_pyfunction!(py::report_progress, m)?)?;
    m.add_class::<py_capture::OutputCapture>()?;
    m.add_class::<py_client::PyClient>()?;
    m.add_class::<py_client::ExecResult>()?;
    error::add_to_module(m)?;
    Ok(())
}
