//! `bld_remote.Job`: a job submitted with `Client.submit` (`submit_code_job`), which runs in Blender
//! whether or not this client stays connected. `status()`, `result(timeout)` and `cancel()` ask the
//! service's job store; reading a result never re-runs the code and does not consume it.
//!
//! Runs on the calling Python thread; every wait goes through the client (GIL released).

use std::time::Instant;

use parking_lot::Mutex;
use pyo3::prelude::*;
use serde_json::{Map, Value};

use bld_remote_core::client::ClientError;

use crate::client::{exec_result, ExecResult, PyClient};
use crate::convert::json_to_py;
use crate::error::{client_error, JobCancelled, OutcomeUnknown};

/// A job running (or done) in Blender, by id. Keeps its client.
#[pyclass(module = "bld_remote", name = "Job", frozen)]
pub struct Job {
    client: Py<PyClient>,
    id: String,
    /// The submission's request id while its reply is unread (`Client.submit` does not wait for it).
    ack: Mutex<Option<u64>>,
}

impl Job {
    pub fn new(client: Py<PyClient>, id: String, ack: Option<u64>) -> Self {
        Self {
            client,
            id,
            ack: Mutex::new(ack),
        }
    }

    fn ask(&self, py: Python<'_>, command: &str, extra: Map<String, Value>) -> PyResult<Value> {
        let mut params = extra;
        params.insert("job_id".into(), Value::from(self.id.as_str()));
        let ack = self.ack.lock().take();
        let client = self.client.bind(py).borrow();
        let v = match ack {
            None => client.request(py, command, params)?,
            Some(ack) => {
                // This request rides right behind the submission; its reply is read after the
                // submission's, which must be a success for it to mean anything.
                let (submitted, answer) = client.after_pending(py, ack, command, params);
                match submitted {
                    Ok(_) => answer?,
                    Err(Err(signal)) => return Err(signal),
                    Err(Ok(ClientError::Lost { addr, detail })) => {
                        return Err(OutcomeUnknown::new_err(format!(
                            "job {}: the connection to {addr} broke before the service acknowledged its \
                             submission ({detail}); it may or may not have been received: status() asks \
                             the service again (LookupError: it was not)",
                            self.id
                        )))
                    }
                    Err(Ok(e)) => return Err(client_error(py, e)),
                }
            }
        };
        if v.get("found") == Some(&Value::Bool(false)) {
            return Err(pyo3::exceptions::PyLookupError::new_err(
                v.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown job id")
                    .to_string(),
            ));
        }
        Ok(v)
    }
}

fn remote(py: Python<'_>, v: &Value, message: String) -> PyErr {
    let mut reply = v.as_object().cloned().unwrap_or_default();
    reply.insert("message".into(), Value::from(message.as_str()));
    client_error(
        py,
        ClientError::Remote {
            message,
            exception: v
                .get("exception")
                .and_then(Value::as_str)
                .map(str::to_string),
            traceback: v
                .get("traceback")
                .and_then(Value::as_str)
                .map(str::to_string),
            reply,
        },
    )
}

#[pymethods]
impl Job {
    /// The job's id: chosen by ``Client.submit`` (``job-`` and 16 hex digits), or the service's
    /// ``bld-job-N`` for a job submitted by other means.
    #[getter]
    fn id(&self) -> &str {
        &self.id
    }

    /// The job's snapshot: ``status`` (queued, running, cancelling, completed, failed, cancelled, ``timed_out``),
    /// ``terminal``, timestamps... ``LookupError`` if the service does not know the id (its
    /// result expired, or Blender restarted).
    fn status(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let v = self.ask(py, "get_job_status", Map::new())?;
        Ok(json_to_py(py, &v)?.unbind())
    }

    /// Wait up to ``timeout`` seconds (None: as long as it takes) for the job to end, and return its
    /// ``ExecResult``. Raises ``RemoteError`` if its code raised, ``JobCancelled`` if it was cancelled,
    /// ``BlenderTimeoutError`` if it ran past its job timeout (``ran=True``) or is still not done after
    /// ``timeout`` (``ran=None``: it goes on; call ``result`` again).
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<ExecResult> {
        let limit = match timeout {
            None => None,
            Some(t) => Some(
                bld_remote_core::config::non_negative_seconds("timeout", t)
                    .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.0))?,
            ),
        };
        let deadline = limit.and_then(|l| Instant::now().checked_add(l));
        let (v, terminal) =
            bld_remote_core::client::wait_for_job(deadline, |p| self.ask(py, "get_job_result", p))?;
        let status = v.get("status").and_then(Value::as_str).unwrap_or("");
        let error = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match status {
            "completed" if v.get("error").is_some_and(Value::is_string) => {
                Err(remote(py, &v, error))
            }
            "completed" => exec_result(py, v.get("result").cloned().unwrap_or(Value::Null)),
            "failed" => Err(remote(py, &v, error)),
            "cancelled" => Err(JobCancelled::new_err(format!(
                "job {} was cancelled{}",
                self.id,
                if error.is_empty() {
                    String::new()
                } else {
                    format!(": {error}")
                }
            ))),
            "timed_out" => Err(client_error(
                py,
                ClientError::Timeout {
                    addr: String::new(),
                    detail: format!("job {} ran past its job_timeout_seconds", self.id),
                    ran: Some(true),
                },
            )),
            _ => Err(client_error(
                py,
                ClientError::Timeout {
                    addr: String::new(),
                    detail: if terminal {
                        format!("job {} ended as {status}", self.id)
                    } else {
                        format!(
                            "job {} is still {status} after the wait; it goes on (call result() again)",
                            self.id
                        )
                    },
                    ran: None,
                },
            )),
        }
    }

    /// Ask for the job to stop: a queued job never runs; a running one stops at its next
    /// ``check_cancelled()``; an ended one keeps its status. Returns the snapshot.
    #[pyo3(signature = (reason=None))]
    fn cancel(&self, py: Python<'_>, reason: Option<String>) -> PyResult<Py<PyAny>> {
        let mut p = Map::new();
        if let Some(r) = reason {
            p.insert("reason".into(), Value::from(r));
        }
        let v = self.ask(py, "cancel_job", p)?;
        Ok(json_to_py(py, &v)?.unbind())
    }

    fn __repr__(&self) -> String {
        format!("Job({:?})", self.id)
    }
}
