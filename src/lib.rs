//! `bld_remote`: drive a running Blender over TCP. The native module `bld_remote._core` is this crate's
//! cdylib; the pure-Rust core (protocol, jobs, server) is usable and tested without Python.
//! This file is only the manifest of modules and exports.

pub mod alloc;
pub mod blender;
pub mod cli;
pub mod client;
mod error;
pub mod instances;
pub mod jobs;
pub mod mcp;
pub mod protocol;
mod py;
mod py_capture;
mod py_client;
pub mod server;

use pyo3::prelude::*;

/// Large buffers (64 MiB requests and replies) as huge-page mappings that grow without copying: see
/// src/alloc.rs.
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;

/// The native half of the `bld_remote` package. Use the Python API in `bld_remote`, not this directly.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
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
    m.add_function(wrap_pyfunction!(py_client::cli_main, m)?)?;
    error::add_to_module(m)?;
    Ok(())
}
