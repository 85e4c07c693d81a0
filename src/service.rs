//! The running service as Python sees it: `start` (its configuration resolved by
//! `bld_remote_core::config::Config::from_env`: argument, else environment, else default), `stop`,
//! `request_stop`, `is_running`, `stop_requested`, `status`, `token`, `startup_options`, and the instance
//! descriptor announced while it runs. The one `SERVICE` slot and the "inside a job" flag live here.
//!
//! A stop called from inside a job (client code, or the add-on's `unregister()` run by a request) happens in
//! two halves: at once the service leaves the `SERVICE` slot, stops accepting (its port is free, its
//! descriptor removed) and refuses its queued jobs, so a `start()` in the same request binds afresh; the
//! rest (closing its connections, joining their threads) waits in `RETIRING` until the job has replied,
//! since those threads are writing that reply (`finish_retired`, called by the pump).
//!
//! Runs on the Python thread that calls it (Blender's main thread in practice). Starting and stopping wait
//! for the service's threads with the GIL released (`py.detach`); the service's own threads never take it.

use std::cell::Cell;
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use bld_remote_core::config::{self, ConfigError, ProcessEnv, Settings, StartupOptions};
use bld_remote_core::server::{Config, Server, Shared, StartError};

use crate::convert::{dict_to_map, json_to_py, seconds_arg, whole_arg};
use crate::instances;

/// The service this process runs (at most one), with the Python handler its jobs go to.
pub struct Service {
    pub server: Server,
    pub handler: Py<PyAny>,
    /// This service's instance descriptor (see `instances`), removed when it stops.
    descriptor: Option<std::path::PathBuf>,
}

pub static SERVICE: std::sync::LazyLock<Mutex<Option<Service>>> =
    std::sync::LazyLock::new(|| Mutex::new(None));

/// Services stopped from inside a job: no longer accepting, waiting for that job's reply to be written
/// before their connections are closed and joined (`finish_retired`).
static RETIRING: Mutex<Vec<Service>> = Mutex::new(Vec::new());

thread_local! {
    /// True while this thread is inside a job: a `stop()` from the job's own code is deferred until it
    /// has replied, since stopping joins threads that wait for that reply.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is running a job now.
pub fn in_job() -> bool {
    IN_JOB.with(Cell::get)
}

/// Whether the calling code runs inside a job of the pump (a request's code, or a handler it triggered).
#[pyfunction(name = "in_job")]
pub fn py_in_job() -> bool {
    in_job()
}

/// Mark this thread as inside (or outside) a job; returns the previous state, to restore after a nested
/// job (client code may call `step()` itself).
pub fn set_in_job(inside: bool) -> bool {
    IN_JOB.with(|c| c.replace(inside))
}

/// The running service's shared state and handler, taken out of the lock so a job can run without it.
pub fn current() -> Option<(Arc<Shared>, Py<PyAny>)> {
    Python::attach(|py| {
        SERVICE
            .lock()
            .as_ref()
            .map(|s| (Arc::clone(s.server.shared()), s.handler.clone_ref(py)))
    })
}

/// Wake the running service's pump (from any thread; never takes the GIL).
pub fn wake_current() {
    if let Some(s) = shared() {
        s.wake_pump();
    }
}

fn shared() -> Option<Arc<Shared>> {
    SERVICE
        .lock()
        .as_ref()
        .map(|s| Arc::clone(s.server.shared()))
}

fn start_error(e: StartError) -> PyErr {
    match e {
        StartError::Bind { .. } => PyOSError::new_err(e.to_string()),
        StartError::Config(m) => PyValueError::new_err(m),
    }
}

fn config_error(e: ConfigError) -> PyErr {
    PyValueError::new_err(e.0)
}

/// Start the service on native threads and return the bound `(host, port)`. Every setting left as None
/// comes from its `BLD_REMOTE_*` variable, else the default. `token="auto"` (given or from the
/// environment) is a fresh random token, and so is `read_token="auto"` (`BLD_REMOTE_READ_TOKEN`). Already running: None when the address asked for is the one
/// served (port and host not given, 0 or the same), else `RuntimeError`. A service stopped from inside
/// the running job is no longer running here (see `stop`), so a start in the same job binds afresh.
#[pyfunction]
#[pyo3(signature = (handler, commands, mode, *, host=None, port=None, token=None, read_token=None, info=None,
    max_request_bytes=None, max_connections=None, queue_capacity=None, idle_timeout=None,
    default_timeout=None, request_read_timeout=None, max_depth=None, persist_max_value_bytes=None,
    persist_max_total_bytes=None, persist_max_keys=None, max_jobs=None, max_job_result_bytes=None,
    job_result_ttl=None))]
#[allow(clippy::too_many_arguments)]
pub fn start(
    py: Python<'_>,
    handler: Py<PyAny>,
    commands: Vec<String>,
    mode: String,
    host: Option<String>,
    port: Option<Bound<'_, PyAny>>,
    token: Option<String>,
    read_token: Option<String>,
    info: Option<Bound<'_, PyDict>>,
    max_request_bytes: Option<Bound<'_, PyAny>>,
    max_connections: Option<Bound<'_, PyAny>>,
    queue_capacity: Option<Bound<'_, PyAny>>,
    idle_timeout: Option<Bound<'_, PyAny>>,
    default_timeout: Option<Bound<'_, PyAny>>,
    request_read_timeout: Option<Bound<'_, PyAny>>,
    max_depth: Option<Bound<'_, PyAny>>,
    persist_max_value_bytes: Option<Bound<'_, PyAny>>,
    persist_max_total_bytes: Option<Bound<'_, PyAny>>,
    persist_max_keys: Option<Bound<'_, PyAny>>,
    max_jobs: Option<Bound<'_, PyAny>>,
    max_job_result_bytes: Option<Bound<'_, PyAny>>,
    job_result_ttl: Option<Bound<'_, PyAny>>,
) -> PyResult<Option<(String, u16)>> {
    // Every number is checked where it enters, by name: its type here, its range in `config`.
    let count =
        |name: &str, v: Option<Bound<'_, PyAny>>| v.map(|v| whole_arg(name, &v)).transpose();
    let secs =
        |name: &str, v: Option<Bound<'_, PyAny>>| v.map(|v| seconds_arg(name, &v)).transpose();
    let port = count("port", port)?
        .map(|p| config::check_port("port", p))
        .transpose()
        .map_err(config_error)?;
    let settings = Settings {
        host,
        port,
        token,
        read_token,
        max_request_bytes: count("max_request_bytes", max_request_bytes)?,
        max_connections: count("max_connections", max_connections)?,
        queue_capacity: count("queue_capacity", queue_capacity)?,
        max_depth: count("max_depth", max_depth)?,
        idle_timeout: secs("idle_timeout", idle_timeout)?,
        default_timeout: secs("default_timeout", default_timeout)?,
        request_read_timeout: secs("request_read_timeout", request_read_timeout)?,
        persist_max_value_bytes: count("persist_max_value_bytes", persist_max_value_bytes)?,
        persist_max_total_bytes: count("persist_max_total_bytes", persist_max_total_bytes)?,
        persist_max_keys: count("persist_max_keys", persist_max_keys)?,
        max_jobs: count("max_jobs", max_jobs)?,
        max_job_result_bytes: count("max_job_result_bytes", max_job_result_bytes)?,
        job_result_ttl: secs("job_result_ttl", job_result_ttl)?,
        ..Settings::default()
    };
    let resolved = Config::from_env(&settings).map_err(config_error)?;
    if let Some(s) = SERVICE.lock().as_ref() {
        let addr = s.server.local_addr();
        let host = addr.ip().to_string();
        // Not given (None) matches whatever is served: "start it if it is not running".
        let same_port =
            settings.port.is_none() || resolved.port == 0 || resolved.port == addr.port();
        let same_host = settings.host.is_none() || resolved.host == host;
        if same_port && same_host {
            return Ok(None);
        }
        return Err(PyRuntimeError::new_err(format!(
            "bld_remote is already serving on {host}:{}; stop_mcp_service() first",
            addr.port()
        )));
    }
    let auto = |t: Option<String>| match t {
        Some(t) if t.trim().eq_ignore_ascii_case("auto") => random_token(py).map(Some),
        other => Ok(other),
    };
    let token = auto(resolved.token.clone())?;
    let read_token = auto(resolved.read_token.clone())?;
    let config = Config {
        token,
        read_token,
        mode,
        main_thread_commands: commands,
        info: dict_to_map(info.as_ref()),
        live_info: crate::scene_events::live_info(),
        ..resolved
    };
    let mut guard = SERVICE.lock();
    if guard.is_some() {
        // Another thread started one while the token was made.
        return Err(PyRuntimeError::new_err(
            "the bld_remote service is already running; stop it first",
        ));
    }
    let server = py.detach(|| Server::start(config)).map_err(start_error)?;
    let addr = server.local_addr();
    let descriptor = write_descriptor(&server);
    *guard = Some(Service {
        server,
        handler,
        descriptor,
    });
    Ok(Some((addr.ip().to_string(), addr.port())))
}

/// A token for `token="auto"`: Python's `secrets` (the OS's CSPRNG), as before, with no crate for it.
fn random_token(py: Python<'_>) -> PyResult<String> {
    py.import("secrets")?
        .call_method1("token_urlsafe", (32,))?
        .extract()
}

/// The token the running service requires (None when it requires none, or is not running).
#[pyfunction]
pub fn token() -> Option<String> {
    SERVICE
        .lock()
        .as_ref()
        .filter(|s| !s.server.shared().is_stopping())
        .and_then(|s| s.server.shared().config().token.clone())
}

/// The read-only token of the running service (None when it has none, or is not running).
#[pyfunction]
pub fn read_token() -> Option<String> {
    SERVICE
        .lock()
        .as_ref()
        .filter(|s| !s.server.shared().is_stopping())
        .and_then(|s| s.server.shared().config().read_token.clone())
}

/// The add-on's start-up options from the environment (`config::StartupOptions::from_env`): a dict with
/// `host`, `port` (`BLD_REMOTE_MCP_PORT`), `start_now` (`BLD_REMOTE_MCP_START_NOW`) and `log_level`
/// (`BLD_REMOTE_LOG_LEVEL`), and `port_from_env`: whether `port` came from the variable (the add-on's own
/// port setting yields to it only then). A bad value raises `ValueError` naming the variable.
#[pyfunction]
pub fn startup_options(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let o = StartupOptions::from_env().map_err(config_error)?;
    let from_env = config::port_from(&ProcessEnv)
        .map_err(config_error)?
        .is_some();
    let d = PyDict::new(py);
    d.set_item("host", o.host)?;
    d.set_item("port", o.port)?;
    d.set_item("port_from_env", from_env)?;
    d.set_item("start_now", o.start_now)?;
    d.set_item("log_level", o.log_level)?;
    Ok(d)
}

/// Announce the service in the runtime dir for `bld-remote` and `Client()`. A failure to write only costs
/// discoverability, so it is reported on stderr and the service runs anyway.
fn write_descriptor(server: &Server) -> Option<std::path::PathBuf> {
    let config = server.shared().config();
    let addr = server.local_addr();
    let d = instances::Descriptor::for_this_process(
        &addr.ip().to_string(),
        addr.port(),
        &config.mode,
        config.token.as_deref(),
        &config.info,
    )
    .with_read_token(config.read_token.as_deref());
    match instances::write(&d) {
        Ok(path) => Some(path),
        Err(e) => {
            eprintln!(
                "bld_remote [WARNING] cannot write the instance descriptor in {}: {e}",
                instances::runtime_dir().display()
            );
            None
        }
    }
}

/// Stop the service and join its threads. Called from inside a job, the service stops accepting at once
/// (the port is free, `is_running()` is false, a `start()` may follow) and its connections are closed right
/// after that job replies. Returns whether a service was running.
#[pyfunction]
pub fn stop(py: Python<'_>) -> bool {
    let taken = SERVICE.lock().take();
    let Some(mut service) = taken else {
        return false;
    };
    if let Some(path) = service.descriptor.take() {
        instances::remove(&path);
    }
    if in_job() {
        py.detach(|| service.server.stop_accepting());
        RETIRING.lock().push(service);
    } else {
        py.detach(|| service.server.stop());
        drop(service);
    }
    true
}

/// Finish the stops begun inside a job (see the module docs): called by the pump once the job has replied.
/// Returns whether there were any (the job stopped, or restarted, the service).
pub fn finish_retired(py: Python<'_>) -> bool {
    if in_job() {
        return false;
    }
    let retiring = std::mem::take(&mut *RETIRING.lock());
    let any = !retiring.is_empty();
    for mut service in retiring {
        py.detach(|| service.server.stop());
        drop(service);
    }
    any
}

/// Whether `shared` is the running service's (not one stopped, or replaced, since).
pub fn is_current(shared: &Arc<Shared>) -> bool {
    SERVICE
        .lock()
        .as_ref()
        .is_some_and(|s| Arc::ptr_eq(s.server.shared(), shared))
}

/// Where the running service listens, if one runs.
pub fn current_addr() -> Option<std::net::SocketAddr> {
    SERVICE.lock().as_ref().map(|s| s.server.local_addr())
}

/// Ask for a stop from anywhere (a signal handler, another thread): the pump performs it.
#[pyfunction]
pub fn request_stop() -> bool {
    let shared = shared();
    shared.is_some_and(|s| {
        s.request_stop();
        true
    })
}

/// True while the service accepts connections (false once a stop has begun).
#[pyfunction]
pub fn is_running() -> bool {
    SERVICE
        .lock()
        .as_ref()
        .is_some_and(|s| !s.server.shared().is_stopping())
}

/// True once a stop was asked for (`request_stop`, `server_shutdown`, a signal) and not yet performed.
#[pyfunction]
pub fn stop_requested() -> bool {
    SERVICE
        .lock()
        .as_ref()
        .is_some_and(|s| s.server.shared().stop_requested())
}

/// The service's status as a dict, or None when it is not running.
#[pyfunction]
pub fn status(py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
    let shared = shared();
    match shared {
        Some(s) => Ok(Some(json_to_py(py, &s.status())?.unbind())),
        None => Ok(None),
    }
}
