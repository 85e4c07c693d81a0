//! The Client binding: `bld_remote.Client` (a pyclass over `bld_remote_core::client::Client`) and
//! `ExecResult`, what `Client.execute` returns.
//!
//! Runs on the calling Python thread; every network wait releases the GIL (`py.detach`), coming back only
//! every 100 ms to let Python run its signal handlers (Ctrl+C).

use std::time::Duration;

use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use serde_json::{Map, Value};

use bld_remote_core::client::{exec_output, Client, ClientError};
use bld_remote_core::config::DEFAULT_CLIENT_TIMEOUT;

use crate::convert::{dict_to_map, json_to_py, seconds_arg, whole_arg, Arg};
use crate::error::{client_error, BlenderConnectionError};
use crate::instances;

/// A connection to a running `bld_remote` service.
///
/// Thread-safe (calls are serialised); one connection, reused across calls and reopened after a failure.
#[pyclass(module = "bld_remote", name = "Client")]
pub struct PyClient {
    // host, port and timeout live outside the connection's lock: a thread holding the GIL must never wait
    // for that lock, since its holder (waiting on the network, GIL released) takes the GIL to poll signals.
    host: String,
    port: u16,
    timeout: Mutex<Option<Duration>>,
    inner: Mutex<Client>,
}

/// What `Client.execute` returns: ``stdout``, ``stderr``, ``result`` (the code's ``result`` variable, or
/// None), ``duration`` (seconds the code ran) and ``changes`` (what it changed in the scene, when asked for
/// with ``changes=True``; else None). Also readable as ``r["stdout"]``.
#[pyclass(module = "bld_remote", name = "ExecResult", frozen, get_all)]
pub struct ExecResult {
    stdout: String,
    stderr: String,
    result: Py<PyAny>,
    duration: f64,
    changes: Py<PyAny>,
}

#[pymethods]
impl ExecResult {
    fn __getitem__(&self, py: Python<'_>, key: &str) -> PyResult<Py<PyAny>> {
        Ok(match key {
            "stdout" => self.stdout.clone().into_pyobject(py)?.into_any().unbind(),
            "stderr" => self.stderr.clone().into_pyobject(py)?.into_any().unbind(),
            "result" => self.result.clone_ref(py),
            "duration" => self.duration.into_pyobject(py)?.into_any().unbind(),
            "changes" => self.changes.clone_ref(py),
            _ => return Err(pyo3::exceptions::PyKeyError::new_err(key.to_string())),
        })
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let cut = |s: &str| {
            if s.len() > 60 {
                let mut end = 60;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{:?}... ({} chars)", &s[..end], s.chars().count())
            } else {
                format!("{s:?}")
            }
        };
        let result = self
            .result
            .bind(py)
            .repr()
            .map_or_else(|_| "?".into(), |r| r.to_string());
        format!(
            "ExecResult(stdout={}, stderr={}, result={}, duration={:.6})",
            cut(&self.stdout),
            cut(&self.stderr),
            result,
            self.duration
        )
    }
}

fn seconds(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) => bld_remote_core::config::positive_seconds("timeout", t)
            .map(Some)
            .map_err(|e| {
                PyValueError::new_err(format!("{e} (or None to wait as long as it takes)"))
            }),
    }
}

/// An ``ExecResult`` from an ``execute_code``-shaped result (also a finished job's).
pub(crate) fn exec_result(py: Python<'_>, v: Value) -> PyResult<ExecResult> {
    let r = py.detach(|| exec_output(v));
    let convert = |v: &Option<Value>| -> PyResult<Py<PyAny>> {
        Ok(match v {
            Some(v) => json_to_py(py, v)?.unbind(),
            None => py.None(),
        })
    };
    Ok(ExecResult {
        result: convert(&r.result)?,
        changes: convert(&r.changes)?,
        stdout: r.stdout,
        stderr: r.stderr,
        duration: r.duration,
    })
}

impl PyClient {
    /// One request with the GIL released; Python signal handlers run every 100 ms (Ctrl+C works).
    pub(crate) fn request(
        &self,
        py: Python<'_>,
        command: &str,
        params: Map<String, Value>,
    ) -> PyResult<Value> {
        let signals = crate::error::PySignals::default();
        let interrupted = || signals.check();
        let timeout = *self.timeout.lock();
        let result = py.detach(|| {
            let mut client = self.inner.lock();
            client.set_timeout(timeout);
            client.call_with(command, params, &interrupted)
        });
        match result {
            Ok(v) => Ok(v),
            Err(ClientError::Interrupted) => Err(signals
                .take()
                .unwrap_or_else(|| client_error(py, ClientError::Interrupted))),
            Err(e) => Err(client_error(py, e)),
        }
    }

    /// Send one request without waiting for its reply (GIL released): its id, for `after_pending`.
    /// `quiet`: the service replies only to refuse it (`submit_code_job`).
    pub(crate) fn send(
        &self,
        py: Python<'_>,
        command: &str,
        params: Map<String, Value>,
        quiet: bool,
    ) -> PyResult<u64> {
        let signals = crate::error::PySignals::default();
        let interrupted = || signals.check();
        let timeout = *self.timeout.lock();
        let result = py.detach(|| {
            let mut client = self.inner.lock();
            client.set_timeout(timeout);
            if quiet {
                client.send_quiet_with(command, params, &interrupted)
            } else {
                client.send_with(command, params, &interrupted)
            }
        });
        result.map_err(|e| match e {
            ClientError::Interrupted => signals
                .take()
                .unwrap_or_else(|| client_error(py, ClientError::Interrupted)),
            e => client_error(py, e),
        })
    }

    /// Send a request after the pending one `first` (sent with `send`), then read both replies: one write
    /// and one wait instead of two round trips. Both outcomes are returned, the first's raw error kept.
    pub(crate) fn after_pending(
        &self,
        py: Python<'_>,
        first: u64,
        command: &str,
        params: Map<String, Value>,
    ) -> (Result<Value, Result<ClientError, PyErr>>, PyResult<Value>) {
        let signals = crate::error::PySignals::default();
        let interrupted = || signals.check();
        let timeout = *self.timeout.lock();
        let (a, b) = py.detach(|| {
            let mut client = self.inner.lock();
            client.set_timeout(timeout);
            let second = client.send_with(command, params, &interrupted);
            let a = client.receive_with(first, &interrupted);
            let b = second.and_then(|id| client.receive_with(id, &interrupted));
            (a, b)
        });
        let a = a.map_err(|e| match e {
            ClientError::Interrupted => Err(signals
                .take()
                .unwrap_or_else(|| client_error(py, ClientError::Interrupted))),
            e => Ok(e),
        });
        let b = b.map_err(|e| match e {
            ClientError::Interrupted => signals
                .take()
                .unwrap_or_else(|| client_error(py, ClientError::Interrupted)),
            e => client_error(py, e),
        });
        (a, b)
    }
}

#[pymethods]
impl PyClient {
    /// Connect lazily to ``host:port``. Without ``port``: the only running instance (``bld-remote ls``);
    /// several → ``BlenderConnectionError``, never a guess. ``timeout``: seconds per request (None: no
    /// limit); the service also drops a request still queued when it runs out. ``token``: for services that
    /// require one (default ``$BLD_REMOTE_TOKEN``, else the instance descriptor's). The token is never sent:
    /// each connection first makes the service prove it holds it (a challenge-response handshake), and a
    /// service that cannot is refused with ``BlenderConnectionError`` before anything is sent to it.
    #[new]
    #[pyo3(signature = (host=None, port=None, timeout=Arg::Default, token=None))]
    fn new(
        py: Python<'_>,
        host: Option<String>,
        port: Option<Bound<'_, PyAny>>,
        timeout: Arg<'_>,
        token: Option<String>,
    ) -> PyResult<Self> {
        // Checked where they enter, by name: the type here, the range in `config` (port 0-65535).
        let port = port
            .map(|p| whole_arg("port", &p))
            .transpose()?
            .map(|p| bld_remote_core::config::check_port("port", p))
            .transpose()
            .map_err(|e| PyValueError::new_err(e.0))?;
        let timeout = match timeout {
            Arg::Default => Some(DEFAULT_CLIENT_TIMEOUT.as_secs_f64()),
            Arg::Given(v) if v.is_none() => None,
            Arg::Given(v) => Some(seconds_arg("timeout", &v)?),
        };
        let timeout = seconds(timeout)?;
        let host_ref = host.as_deref();
        let (h, p) = if let Some(p) = port {
            (host_ref.unwrap_or("127.0.0.1").to_string(), p)
        } else {
            py.detach(|| instances::pick(host_ref, None))
                .map_err(BlenderConnectionError::new_err)?
        };
        let token = instances::resolve_token(token, &h, p);
        Ok(Self {
            host: h.clone(),
            port: p,
            timeout: Mutex::new(timeout),
            inner: Mutex::new(Client::new(h, p, timeout, token)),
        })
    }

    #[getter]
    fn host(&self) -> String {
        self.host.clone()
    }

    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    #[getter]
    fn get_timeout(&self) -> Option<f64> {
        self.timeout.lock().map(|t| t.as_secs_f64())
    }

    /// Applies from the next call on.
    #[setter]
    fn set_timeout(&self, timeout: Option<f64>) -> PyResult<()> {
        *self.timeout.lock() = seconds(timeout)?;
        Ok(())
    }

    /// Send any command; return its ``result``. Raises ``RemoteError`` for an error reply.
    #[pyo3(signature = (command, /, **params))]
    fn call(
        &self,
        py: Python<'_>,
        command: &str,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let v = self.request(py, command, dict_to_map(params))?;
        Ok(json_to_py(py, &v)?.unbind())
    }

    /// Run Python in Blender. Returns an ``ExecResult``; raises ``RemoteError`` (with ``traceback`` and the
    /// partial ``output``) when the code raises. ``changes=True``: also what the code changed in the scene
    /// (``ExecResult.changes``; Blender diffs two snapshots for it, about 0.15 ms on a small scene).
    #[pyo3(signature = (code, *, changes=false))]
    fn execute(&self, py: Python<'_>, code: &str, changes: bool) -> PyResult<ExecResult> {
        let params = bld_remote_core::client::exec_params(code, changes);
        let v = self.request(py, "execute_code", params)?;
        exec_result(py, v)
    }

    /// Submit code as a job that runs whether or not this client stays connected
    /// (``submit_code_job``); returns its ``Job`` at once, without waiting for the service: its id
    /// (``job-`` and 16 hex digits) is chosen here, and its first call (``result``, ``status``,
    /// ``cancel``) goes out right behind the submission, so ``submit(code).result()`` costs one round
    /// trip. A refusal (the queue or the job store full, the service stopping) is raised by that first
    /// call, with ``ran=False``. ``job_timeout``: seconds it may run before ``check_cancelled()`` raises.
    /// ``changes=True``: its result says what it changed in the scene, as ``execute`` does.
    #[pyo3(signature = (code, job_timeout=None, *, changes=false))]
    fn submit(
        slf: &Bound<'_, Self>,
        code: &str,
        job_timeout: Option<f64>,
        changes: bool,
    ) -> PyResult<crate::job::Job> {
        let py = slf.py();
        let mut params = bld_remote_core::client::exec_params(code, changes);
        if let Some(t) = job_timeout {
            let t = bld_remote_core::config::positive_seconds("job_timeout", t)
                .map_err(|e| PyValueError::new_err(e.0))?;
            params.insert("job_timeout_seconds".into(), Value::from(t.as_secs_f64()));
        }
        let id = bld_remote_core::client::new_job_id().map_err(|e| client_error(py, e))?;
        params.insert("job_id".into(), Value::from(id.as_str()));
        // Sent, not waited for: the job's first call (result, status, cancel) goes out right behind it and
        // reads both replies, so submit + result is one round trip. A refusal is raised by that call.
        // Quiet: the service replies only if it refuses the job; the next request's reply says it took it.
        let ack = slf.borrow().send(py, "submit_code_job", params, true)?;
        Ok(crate::job::Job::new(slf.clone().unbind(), id, Some(ack)))
    }

    /// ``get_scene_info``: the scene's name, every object, frame range...
    fn scene_info(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let v = self.request(py, "get_scene_info", Map::new())?;
        Ok(json_to_py(py, &v)?.unbind())
    }

    /// ``get_object_info``: location, rotation, scale, dimensions, materials, mesh counts.
    fn object_info(&self, py: Python<'_>, name: &str) -> PyResult<Py<PyAny>> {
        let mut params = Map::new();
        params.insert("name".into(), Value::String(name.to_string()));
        let v = self.request(py, "get_object_info", params)?;
        Ok(json_to_py(py, &v)?.unbind())
    }

    /// ``get_status`` (answered without waiting for Blender's main thread).
    fn status(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let v = self.request(py, "get_status", Map::new())?;
        Ok(json_to_py(py, &v)?.unbind())
    }

    /// ``ping``: True when the service answers.
    fn ping(&self, py: Python<'_>) -> PyResult<bool> {
        self.request(py, "ping", Map::new()).map(|_| true)
    }

    /// ``server_shutdown``: the service stops (a headless Blender then exits). Closes this connection.
    fn shutdown(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let v = self.request(py, "server_shutdown", Map::new())?;
        self.close(py);
        Ok(json_to_py(py, &v)?.unbind())
    }

    /// Close the connection (the next call reconnects). Waits for a call in progress on another thread.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.lock().close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "Client(host={:?}, port={}, timeout={})",
            self.host,
            self.port,
            self.timeout
                .lock()
                .map_or_else(|| "None".into(), |t| t.as_secs_f64().to_string())
        )
    }
}
