//! `bld_remote._core`: the native module that Blender's process loads, and nothing more. It joins the
//! pure-Rust service (crates/core: protocol, jobs, server, client) to Python. The command line and the MCP
//! server are a separate binary (crates/cli) and are never linked here.
//!
//! This file is only the manifest of modules and exports; it runs once, on the importing thread.
//!
//! | module     | owns                                                           | thread                  |
//! |------------|----------------------------------------------------------------|-------------------------|
//! | `service`  | start/stop/status of the one service, its descriptor, options  | the calling Python one  |
//! | `pump`     | `step`, `serve_forever`, running a job, handler results         | Blender's main thread   |
//! | `signals`  | `SignalGuard`: SIGTERM/SIGINT stop the headless pump (native)  | the pump's; its own thread |
//! | `convert`  | JSON <-> Python                                                 | whoever holds the GIL   |
//! | `capture`  | `OutputCapture`, execute_code's stdout/stderr                  | Blender's main thread   |
//! | `client`   | the `Client` binding and `ExecResult`                          | the calling Python one  |
//! | `job`      | `Job`, what `Client.submit` returns                            | the calling Python one  |
//! | `cancel`   | `check_cancelled()` for the running job's code                 | Blender's main thread   |
//! | `persist`  | `bld_remote.persist` inside Blender, over the service's store  | the calling Python one  |
//! | `pool`     | `PoolClient`: a pool's members and its map (`bld_remote.Pool`)  | the calling Python one  |
//! | `scene_events` | `scene_generation`: objects etc. added/removed (`get_status`) | main thread; network |
//! | `error`    | Rust errors -> Python exceptions (the only place)              | the calling Python one  |

mod cancel;
mod capture;
mod client;
mod convert;
mod error;
mod job;
mod persist;
mod pool;
mod pump;
mod scene_events;
mod service;
#[cfg(unix)]
mod signals;

use bld_remote_core::{config, instances};
use pyo3::prelude::*;

/// The native half of the `bld_remote` package. Use the Python API in `bld_remote`, not this directly.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", config::VERSION)?;
    m.add("DEFAULT_PORT", config::DEFAULT_PORT)?;
    m.add("DEFAULT_HOST", config::DEFAULT_HOST)?;
    m.add_function(wrap_pyfunction!(service::start, m)?)?;
    m.add_function(wrap_pyfunction!(service::stop, m)?)?;
    m.add_function(wrap_pyfunction!(service::request_stop, m)?)?;
    m.add_function(wrap_pyfunction!(service::is_running, m)?)?;
    m.add_function(wrap_pyfunction!(service::stop_requested, m)?)?;
    m.add_function(wrap_pyfunction!(service::status, m)?)?;
    m.add_function(wrap_pyfunction!(service::token, m)?)?;
    m.add_function(wrap_pyfunction!(service::read_token, m)?)?;
    m.add_function(wrap_pyfunction!(service::startup_options, m)?)?;
    m.add_function(wrap_pyfunction!(service::py_in_job, m)?)?;
    m.add_function(wrap_pyfunction!(pump::step, m)?)?;
    m.add_function(wrap_pyfunction!(pump::serve_forever, m)?)?;
    m.add_function(wrap_pyfunction!(pump::report_progress, m)?)?;
    m.add_function(wrap_pyfunction!(cancel::check_cancelled, m)?)?;
    m.add_function(wrap_pyfunction!(persist::persist_put, m)?)?;
    m.add_function(wrap_pyfunction!(persist::persist_get, m)?)?;
    m.add_function(wrap_pyfunction!(persist::persist_remove, m)?)?;
    m.add_function(wrap_pyfunction!(persist::persist_keys, m)?)?;
    m.add_function(wrap_pyfunction!(cancel::cancel_requested, m)?)?;
    m.add_function(wrap_pyfunction!(scene_events::note_datablock_counts, m)?)?;
    m.add_function(wrap_pyfunction!(scene_events::bump_scene_generation, m)?)?;
    m.add_function(wrap_pyfunction!(scene_events::scene_generation, m)?)?;
    m.add_class::<capture::OutputCapture>()?;
    m.add_class::<client::PyClient>()?;
    m.add_class::<client::ExecResult>()?;
    m.add_class::<job::Job>()?;
    m.add_class::<pool::PoolClient>()?;
    error::add_to_module(m)?;
    Ok(())
}
