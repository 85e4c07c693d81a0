//! The one place where pyo3 meets the pure-Rust core: the functions of `bld_remote._core`, the main-thread
//! pump that runs jobs through the Python handler, and JSON <-> Python conversion.
//!
//! Every function here runs on the thread that calls it from Python; the pump functions must be called on
//! Blender's main thread. Anything that waits releases the GIL (`py.detach`).

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple,
};
use serde_json::{Map, Number, Value};

use crate::jobs::{Job, Msg, ProgressSink};
use crate::protocol::Outcome;
use crate::py_capture::OutputCapture;
use crate::server::{Config, Server, Shared, StartError};

/// Deepest Python structure converted to JSON; deeper parts become their `repr`.
const MAX_CONVERT_DEPTH: usize = 200;

struct Service {
    server: Server,
    handler: Py<PyAny>,
    /// This service's instance descriptor (see `instances`), removed when it stops.
    descriptor: Option<std::path::PathBuf>,
}

/// The running job's progress listener, for `report_progress`. A global, not a thread-local: Blender calls
/// some render handlers from its render threads, while the job still runs on the main thread.
static PROGRESS: Mutex<Option<ProgressSink>> = Mutex::new(None);

static SERVICE: std::sync::LazyLock<Mutex<Option<Service>>> =
    std::sync::LazyLock::new(|| Mutex::new(None));

thread_local! {
    /// True while this thread is inside a job: a `stop()` from the job's own code is deferred until it
    /// has replied, since stopping joins threads that wait for that reply.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

fn current() -> Option<(Arc<Shared>, Py<PyAny>)> {
    Python::attach(|py| {
        SERVICE
            .lock()
            .as_ref()
            .map(|s| (Arc::clone(s.server.shared()), s.handler.clone_ref(py)))
    })
}

fn start_error(e: StartError) -> PyErr {
    match e {
        StartError::Bind { .. } => PyOSError::new_err(e.to_string()),
        StartError::Config(m) => PyValueError::new_err(m),
    }
}

/// Start the service. Returns the bound `(host, port)`.
#[pyfunction]
#[pyo3(signature = (host, port, handler, commands, mode, token=None, info=None, max_request_bytes=None,
    max_connections=None, queue_capacity=None, idle_timeout=None, default_timeout=None,
    request_read_timeout=None, max_depth=None))]
#[allow(clippy::too_many_arguments)]
pub fn start(
    py: Python<'_>,
    host: String,
    port: u16,
    handler: Py<PyAny>,
    commands: Vec<String>,
    mode: String,
    token: Option<String>,
    info: Option<Bound<'_, PyDict>>,
    max_request_bytes: Option<usize>,
    max_connections: Option<usize>,
    queue_capacity: Option<usize>,
    idle_timeout: Option<f64>,
    default_timeout: Option<f64>,
    request_read_timeout: Option<f64>,
    max_depth: Option<usize>,
) -> PyResult<(String, u16)> {
    let mut guard = SERVICE.lock();
    if guard.is_some() {
        return Err(PyRuntimeError::new_err(
            "the bld_remote service is already running; stop it first",
        ));
    }
    // Timeouts: None keeps the default; 0 turns the limit off (where that is allowed).
    let seconds = |v: Option<f64>,
                   default: Option<Duration>,
                   name: &str|
     -> PyResult<Option<Duration>> {
        match v {
            None => Ok(default),
            Some(0.0) => Ok(None),
            Some(s) if s > 0.0 && s.is_finite() && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
            Some(_) => Err(PyValueError::new_err(format!(
                "{name} must be a positive number of seconds (or 0 for no limit)"
            ))),
        }
    };
    let info = match info {
        Some(d) => match py_to_json(d.as_any(), 0) {
            Value::Object(m) => m,
            _ => Map::new(),
        },
        None => Map::new(),
    };
    let defaults = Config::default();
    let config = Config {
        host,
        port,
        token: token.filter(|t| !t.is_empty()),
        max_request_bytes: max_request_bytes.unwrap_or(defaults.max_request_bytes),
        max_connections: max_connections.unwrap_or(defaults.max_connections).max(1),
        queue_capacity: queue_capacity.unwrap_or(defaults.queue_capacity).max(1),
        idle_timeout: seconds(idle_timeout, defaults.idle_timeout, "idle_timeout")?,
        default_timeout: seconds(default_timeout, defaults.default_timeout, "default_timeout")?,
        request_read_timeout: seconds(
            request_read_timeout,
            Some(defaults.request_read_timeout),
            "request_read_timeout",
        )?
        // 0 = no limit: a day is as good as none, and keeps the reader's arithmetic simple.
        .unwrap_or(Duration::from_secs(86_400)),
        max_depth: max_depth.unwrap_or(defaults.max_depth),
        mode,
        main_thread_commands: commands,
        info,
        ..defaults
    };
    let server = py.detach(|| Server::start(config)).map_err(start_error)?;
    let addr = server.local_addr();
    let descriptor = write_descriptor(&server);
    *guard = Some(Service {
        server,
        handler,
        descriptor,
    });
    Ok((addr.ip().to_string(), addr.port()))
}

/// Announce the service in the runtime dir for `bld-remote` and `Client()`. A failure to write only costs
/// discoverability, so it is reported on stderr and the service runs anyway.
fn write_descriptor(server: &Server) -> Option<std::path::PathBuf> {
    let config = server.shared().config();
    let addr = server.local_addr();
    let d = crate::instances::Descriptor::for_this_process(
        &addr.ip().to_string(),
        addr.port(),
        &config.mode,
        config.token.as_deref(),
        &config.info,
    );
    match crate::instances::write(&d) {
        Ok(path) => Some(path),
        Err(e) => {
            eprintln!(
                "bld_remote [WARNING] cannot write the instance descriptor in {}: {e}",
                crate::instances::runtime_dir().display()
            );
            None
        }
    }
}

/// Stop the service and join its threads. Called from inside a job, the stop happens right after that job
/// replies. Returns whether a service was running.
#[pyfunction]
pub fn stop(py: Python<'_>) -> bool {
    if IN_JOB.with(Cell::get) {
        let shared = SERVICE
            .lock()
            .as_ref()
            .map(|s| Arc::clone(s.server.shared()));
        return match shared {
            Some(s) => {
                s.request_stop();
                true
            }
            None => false,
        };
    }
    let taken = SERVICE.lock().take();
    match taken {
        Some(Service {
            mut server,
            handler,
            descriptor,
        }) => {
            py.detach(|| server.stop());
            drop(server);
            drop(handler);
            if let Some(path) = descriptor {
                crate::instances::remove(&path);
            }
            true
        }
        None => false,
    }
}

/// Ask for a stop from anywhere (a signal handler, another thread): the pump performs it.
#[pyfunction]
pub fn request_stop() -> bool {
    let shared = SERVICE
        .lock()
        .as_ref()
        .map(|s| Arc::clone(s.server.shared()));
    shared.is_some_and(|s| {
        s.request_stop();
        true
    })
}

#[pyfunction]
pub fn is_running() -> bool {
    SERVICE
        .lock()
        .as_ref()
        .is_some_and(|s| !s.server.shared().is_stopping())
}

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
    let shared = SERVICE
        .lock()
        .as_ref()
        .map(|s| Arc::clone(s.server.shared()));
    match shared {
        Some(s) => Ok(Some(json_to_py(py, &s.status())?.unbind())),
        None => Ok(None),
    }
}

/// Run up to `max_jobs` pending jobs on this (the main) thread. Waits up to `timeout` seconds for the
/// first one, with the GIL released. Performs a requested stop before returning. Returns jobs run.
#[pyfunction]
#[pyo3(signature = (max_jobs=64, timeout=0.0, budget=None))]
pub fn step(py: Python<'_>, max_jobs: usize, timeout: f64, budget: Option<f64>) -> usize {
    let Some((shared, handler)) = current() else {
        return 0;
    };
    let first_wait = Duration::from_secs_f64(if timeout.is_finite() {
        timeout.max(0.0)
    } else {
        0.0
    });
    let budget = budget
        .filter(|b| b.is_finite() && *b > 0.0)
        .map(Duration::from_secs_f64);
    let began = Instant::now();
    let mut ran = 0;
    while ran < max_jobs && !shared.stop_requested() {
        if budget.is_some_and(|b| began.elapsed() >= b) {
            break;
        }
        let wait = if ran == 0 { first_wait } else { Duration::ZERO };
        let msg = if wait.is_zero() {
            shared.next_message(Some(Duration::ZERO))
        } else {
            py.detach(|| shared.next_message(Some(wait)))
        };
        match msg {
            Some(Msg::Job(job)) => {
                run_job(py, &shared, &handler, job);
                ran += 1;
            }
            Some(Msg::Wake) | None => break,
        }
    }
    finish_requested_stop(py, &shared);
    ran
}

/// The headless pump: block on the job channel with the GIL released, run each job the moment it arrives,
/// and return when the service stops.
///
/// Signals: Python runs signal handlers only between bytecodes, so a thread blocked in Rust would never see
/// SIGTERM. The pump creates a socket pair and calls `install_wakeup(fd)` with its write end (the Python side
/// passes it to `signal.set_wakeup_fd`); the C-level signal handler writes a byte there, a forwarder thread
/// turns it into a wake-up, and the pump returns to Python long enough to run the handlers. Idle, it sleeps
/// with zero wake-ups. `install_wakeup(-1)` is called before returning. Without `install_wakeup` (or off
/// Unix, or if it raises) the pump wakes every 100 ms instead.
#[pyfunction]
#[pyo3(signature = (install_wakeup=None))]
pub fn serve_forever(py: Python<'_>, install_wakeup: Option<Bound<'_, PyAny>>) -> PyResult<()> {
    let Some((shared, handler)) = current() else {
        return Err(PyRuntimeError::new_err(
            "the bld_remote service is not running; call start_mcp_service() first",
        ));
    };
    let forwarder = SignalForwarder::start(py, install_wakeup.as_ref(), &shared);
    let result = (|| -> PyResult<()> {
        loop {
            py.check_signals()?;
            if shared.stop_requested() || shared.is_stopping() {
                return Ok(());
            }
            let timeout = if forwarder.is_active() {
                None
            } else {
                Some(Duration::from_millis(100))
            };
            match py.detach(|| shared.next_message(timeout)) {
                Some(Msg::Job(job)) => run_job(py, &shared, &handler, job),
                Some(Msg::Wake) | None => {}
            }
        }
    })();
    forwarder.close(py, install_wakeup.as_ref());
    finish_requested_stop(py, &shared);
    result
}

fn finish_requested_stop(py: Python<'_>, shared: &Arc<Shared>) {
    if shared.stop_requested() && !IN_JOB.with(Cell::get) {
        let ours = SERVICE
            .lock()
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s.server.shared(), shared));
        if ours {
            stop(py);
        }
    }
}

/// Turns bytes written by Python's signal wake-up fd into pump wake-ups (Unix).
struct SignalForwarder {
    #[cfg(unix)]
    inner: Option<(
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
        std::thread::JoinHandle<()>,
    )>,
}

impl SignalForwarder {
    #[cfg(unix)]
    fn start(py: Python<'_>, install: Option<&Bound<'_, PyAny>>, shared: &Arc<Shared>) -> Self {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let none = Self { inner: None };
        let Some(install) = install else { return none };
        let Ok((mut reader, writer)) = std::os::unix::net::UnixStream::pair() else {
            return none;
        };
        // set_wakeup_fd wants a non-blocking fd: a signal must never block on a full buffer.
        if writer.set_nonblocking(true).is_err() {
            return none;
        }
        let Ok(keep_reader) = reader.try_clone() else {
            return none;
        };
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("bld_remote-signals".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => s.wake_pump(),
                    }
                }
            });
        let Ok(handle) = spawned else { return none };
        let forwarder = Self {
            inner: Some((keep_reader, writer, handle)),
        };
        let fd = forwarder
            .inner
            .as_ref()
            .map_or(-1, |(_, w, _)| w.as_raw_fd());
        if install.call1((fd,)).is_err() {
            // Not the main thread, or no signal module: fall back to polling.
            forwarder.close(py, None);
            return Self { inner: None };
        }
        forwarder
    }

    #[cfg(not(unix))]
    fn start(_py: Python<'_>, _install: Option<&Bound<'_, PyAny>>, _shared: &Arc<Shared>) -> Self {
        Self {}
    }

    fn is_active(&self) -> bool {
        #[cfg(unix)]
        {
            self.inner.is_some()
        }
        #[cfg(not(unix))]
        {
            false
        }
    }

    /// Uninstall (before the fd closes), end the forwarder's blocking read, and join it.
    fn close(mut self, py: Python<'_>, install: Option<&Bound<'_, PyAny>>) {
        #[cfg(unix)]
        if let Some((reader, writer, handle)) = self.inner.take() {
            if let Some(install) = install {
                let _ = install.call1((-1,));
            }
            let _ = reader.shutdown(std::net::Shutdown::Both);
            py.detach(|| {
                let _ = handle.join();
            });
            drop(writer);
        }
        #[cfg(not(unix))]
        let _ = (py, install, &mut self);
    }
}

/// Report progress of the job running now: sent to its client as `{"id": N, "progress": {"progress",
/// "total", "message"}}` before the reply. Returns False when nobody listens (no job running, or a plain
/// request without id) or the report was dropped. Never blocks; callable from any thread.
#[pyfunction]
#[pyo3(signature = (progress, total=None, message=None))]
pub fn report_progress(progress: f64, total: Option<f64>, message: Option<String>) -> bool {
    let Some(sink) = PROGRESS.lock().clone() else {
        return false;
    };
    let mut v = Map::new();
    v.insert(
        "progress".into(),
        Number::from_f64(progress).map_or(Value::Null, Value::Number),
    );
    if let Some(t) = total.and_then(Number::from_f64) {
        v.insert("total".into(), Value::Number(t));
    }
    if let Some(m) = message {
        v.insert("message".into(), Value::String(m));
    }
    sink.report(Value::Object(v))
}

/// Run one job through the Python handler on this thread and hand its outcome back.
fn run_job(py: Python<'_>, shared: &Arc<Shared>, handler: &Py<PyAny>, mut job: Job) {
    if let Err(outcome) = shared.begin(&job) {
        job.refuse(outcome);
        return;
    }
    let params = std::mem::take(&mut job.params);
    let outcome = match json_to_py(py, &Value::Object(params)) {
        Ok(params) => {
            // Save and restore: client code may call step() itself, running a nested job.
            let outer = IN_JOB.with(|c| c.replace(true));
            let outer_progress = std::mem::replace(&mut *PROGRESS.lock(), job.progress_sink());
            let r = handler.call1(py, (job.command.as_str(), params));
            IN_JOB.with(|c| c.set(outer));
            *PROGRESS.lock() = outer_progress;
            match r {
                Ok(obj) => handler_result(obj.bind(py)),
                Err(e) => exception_outcome(py, &e),
            }
        }
        Err(e) => exception_outcome(py, &e),
    };
    shared.finish(job, outcome);
}

/// The handler returns `(True, result)` or `(False, {"message": ..., extra fields...})`.
fn handler_result(obj: &Bound<'_, PyAny>) -> Outcome {
    let Ok(tuple) = obj.cast::<PyTuple>() else {
        return Outcome::Success(py_to_json(obj, 0));
    };
    if tuple.len() != 2 {
        return Outcome::Success(py_to_json(obj, 0));
    }
    let ok = tuple
        .get_item(0)
        .and_then(|o| o.is_truthy())
        .unwrap_or(false);
    let payload = tuple.get_item(1).map_or(Value::Null, |p| py_to_json(&p, 0));
    if ok {
        return Outcome::Success(payload);
    }
    match payload {
        Value::Object(mut m) => {
            let message = match m.remove("message") {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => "command failed".into(),
            };
            Outcome::error_with(message, m)
        }
        Value::String(s) => Outcome::error(s),
        other => Outcome::error(other.to_string()),
    }
}

/// A Python exception that escaped the handler (it should not): keep type, message and traceback.
fn exception_outcome(py: Python<'_>, e: &PyErr) -> Outcome {
    let type_name = e
        .get_type(py)
        .name()
        .map_or_else(|_| "Exception".into(), |n| n.to_string());
    let message = e.value(py).str().map(|s| s.to_string()).unwrap_or_default();
    let mut extra = Map::new();
    extra.insert("exception".into(), Value::String(type_name.clone()));
    let tb = e.traceback(py).and_then(|tb| tb.format().ok());
    if let Some(tb) = tb {
        extra.insert(
            "traceback".into(),
            Value::String(format!("{tb}{type_name}: {message}")),
        );
    }
    Outcome::error_with(format!("{type_name}: {message}"), extra)
}

/// JSON → Python (dict, list, str, int, float, bool, None).
pub fn json_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, item) in m {
                d.set_item(k, json_to_py(py, item)?)?;
            }
            d.into_any()
        }
    })
}

/// Python → JSON, total: anything it does not know becomes its `str()`, so a reply can always be sent.
pub fn py_to_json(obj: &Bound<'_, PyAny>, depth: usize) -> Value {
    if depth > MAX_CONVERT_DEPTH {
        return Value::String(repr(obj));
    }
    if obj.is_none() {
        return Value::Null;
    }
    if let Ok(capture) = obj.cast::<OutputCapture>() {
        // execute_code's stdout/stderr: the captured text moves into the reply, uncopied.
        return match capture.try_borrow_mut() {
            Ok(mut c) => Value::String(c.take()),
            Err(_) => Value::String(repr(obj)),
        };
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Value::Bool(b.is_true());
    }
    if obj.cast::<PyInt>().is_ok() {
        if let Ok(i) = obj.extract::<i64>() {
            return Value::from(i);
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Value::from(u);
        }
        return Value::String(repr(obj));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value()).map_or(Value::Null, Value::Number);
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Value::String(s.to_string_lossy().into_owned());
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut m = Map::new();
        for (k, v) in d.iter() {
            let key = match k.cast::<PyString>() {
                Ok(s) => s.to_string_lossy().into_owned(),
                Err(_) => k
                    .str()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            m.insert(key, py_to_json(&v, depth + 1));
        }
        return Value::Object(m);
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return Value::Array(l.iter().map(|v| py_to_json(&v, depth + 1)).collect());
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return Value::Array(t.iter().map(|v| py_to_json(&v, depth + 1)).collect());
    }
    if obj.cast::<PySet>().is_ok() || obj.cast::<PyFrozenSet>().is_ok() {
        if let Ok(it) = obj.try_iter() {
            return Value::Array(
                it.filter_map(Result::ok)
                    .map(|v| py_to_json(&v, depth + 1))
                    .collect(),
            );
        }
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_bytes()));
    }
    Value::String(
        obj.str()
            .map_or_else(|_| repr(obj), |s| s.to_string_lossy().into_owned()),
    )
}

fn repr(obj: &Bound<'_, PyAny>) -> String {
    obj.repr().map_or_else(
        |_| "<unrepresentable>".into(),
        |s| s.to_string_lossy().into_owned(),
    )
}
