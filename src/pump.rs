//! The main-thread pump: `step` (driven by the add-on's timer or keeper in the GUI), `serve_forever` (the
//! headless loop behind `bld_remote.keep_alive()`), running one job through the Python handler, turning
//! the handler's return value or exception into an outcome, and `report_progress` for the running job.
//!
//! Runs on Blender's main thread, which holds the GIL; every wait for a job releases it (`py.detach`).
//! `report_progress` alone may be called from any thread (Blender calls some render handlers off the
//! main thread).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use serde_json::{Map, Number, Value};

use bld_remote_core::jobs::{Job, Msg, ProgressSink};
use bld_remote_core::protocol::Outcome;
use bld_remote_core::server::Shared;

use crate::convert::{json_to_py, py_to_json_reported, seconds_arg, whole_arg, Arg, Report};
use crate::service::{current, in_job, set_in_job, stop, SERVICE};
use crate::signals::SignalForwarder;

/// The running job's progress listener, for `report_progress`. A global, not a thread-local: Blender calls
/// some render handlers from its render threads, while the job still runs on the main thread.
static PROGRESS: Mutex<Option<ProgressSink>> = Mutex::new(None);

/// Run up to `max_jobs` pending jobs on this (the main) thread. Waits up to `timeout` seconds for the
/// first one, with the GIL released. Performs a requested stop before returning. Returns jobs run.
#[pyfunction]
#[pyo3(
    signature = (max_jobs=Arg::Default, timeout=Arg::Default, budget=None),
    text_signature = "(max_jobs=64, timeout=0.0, budget=None)"
)]
pub fn step(
    py: Python<'_>,
    max_jobs: Arg<'_>,
    timeout: Arg<'_>,
    budget: Option<Bound<'_, PyAny>>,
) -> PyResult<usize> {
    // Checked where they enter, by name, before anything else: a bad number is an error, never a panic.
    let max_jobs = match max_jobs {
        Arg::Default => 64,
        Arg::Given(v) => whole_arg("max_jobs", &v)?,
    };
    let max_jobs = u32::try_from(max_jobs)
        .map_err(|_| {
            PyValueError::new_err(format!(
                "max_jobs must be a whole number from 0 to {}, got {max_jobs}",
                u32::MAX
            ))
        })?
        .try_into()
        .unwrap_or(usize::MAX);
    let timeout = match timeout {
        Arg::Default => 0.0,
        Arg::Given(v) => seconds_arg("timeout", &v)?,
    };
    let budget = budget.map(|b| seconds_arg("budget", &b)).transpose()?;
    let value_error = |e: bld_remote_core::config::ConfigError| PyValueError::new_err(e.0);
    let first_wait =
        bld_remote_core::config::non_negative_seconds("timeout", timeout).map_err(value_error)?;
    let budget = budget
        .map(|b| bld_remote_core::config::positive_seconds("budget", b))
        .transpose()
        .map_err(value_error)?;
    let Some((shared, handler)) = current() else {
        return Ok(0);
    };
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
    Ok(ran)
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
    if shared.stop_requested() && !in_job() {
        let ours = SERVICE
            .lock()
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s.server.shared(), shared));
        if ours {
            stop(py);
        }
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
            let outer = set_in_job(true);
            let outer_progress = std::mem::replace(&mut *PROGRESS.lock(), job.progress_sink());
            let outer_state = crate::cancel::swap(Some(Arc::clone(&job.state)));
            let r = handler.call1(py, (job.command.as_str(), params));
            set_in_job(outer);
            *PROGRESS.lock() = outer_progress;
            crate::cancel::swap(outer_state);
            match r {
                Ok(obj) => handler_result(obj.bind(py)),
                Err(e) => exception_outcome(py, &e),
            }
        }
        Err(e) => exception_outcome(py, &e),
    };
    shared.finish(job, outcome);
}

/// The handler returns `(True, result)` or `(False, {"message": ..., extra fields...})`. The conversion's
/// [`Report`] is never dropped: warnings go into the reply as `warnings`; a part that could not be
/// converted makes the reply an error that still says the command ran (`"ran": true`) and carries the
/// output captured so far.
fn handler_result(obj: &Bound<'_, PyAny>) -> Outcome {
    let mut report = Report::default();
    let Ok(tuple) = obj.cast::<PyTuple>() else {
        let v = py_to_json_reported(obj, &mut report);
        return reported(v, &report);
    };
    if tuple.len() != 2 {
        let v = py_to_json_reported(obj, &mut report);
        return reported(v, &report);
    }
    let ok = tuple
        .get_item(0)
        .and_then(|o| o.is_truthy())
        .unwrap_or(false);
    let payload = tuple
        .get_item(1)
        .map_or(Value::Null, |p| py_to_json_reported(&p, &mut report));
    if ok {
        return reported(payload, &report);
    }
    match payload {
        Value::Object(mut m) => {
            let message = match m.remove("message") {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => "command failed".into(),
            };
            let problems: Vec<String> = report
                .errors()
                .into_iter()
                .chain(report.warnings())
                .collect();
            if !problems.is_empty() {
                m.insert("warnings".into(), Value::from(problems));
            }
            Outcome::error_with(message, m)
        }
        Value::String(s) => Outcome::error(s),
        other => Outcome::error(other.to_string()),
    }
}

/// A command's successful result with its conversion report: `warnings` added to an object result; an
/// error reply (`"ran": true`, the captured `output`, `errors`, `warnings`) when a part was unconvertible.
fn reported(result: Value, report: &Report) -> Outcome {
    let warnings = report.warnings();
    let errors = report.errors();
    if !errors.is_empty() {
        let mut extra = Map::new();
        extra.insert("ran".into(), Value::Bool(true));
        if let Value::Object(mut m) = result {
            let mut output = Map::new();
            for k in ["stdout", "stderr"] {
                if let Some(text) = m.remove(k) {
                    output.insert(k.into(), text);
                }
            }
            if !output.is_empty() {
                extra.insert("output".into(), Value::Object(output));
            }
        }
        let message = format!(
            "the command ran, but its result could not be converted to JSON: {}",
            errors.join("; ")
        );
        extra.insert("errors".into(), Value::from(errors));
        if !warnings.is_empty() {
            extra.insert("warnings".into(), Value::from(warnings));
        }
        return Outcome::error_with(message, extra);
    }
    match result {
        Value::Object(mut m) if !warnings.is_empty() => {
            m.insert("warnings".into(), Value::from(warnings));
            Outcome::Success(Value::Object(m))
        }
        other => {
            if !warnings.is_empty() {
                // A bare (non-object) result has no place for them: say it in Blender's log at least.
                eprintln!(
                    "bld_remote [WARNING] result converted with losses: {}",
                    warnings.join("; ")
                );
            }
            Outcome::Success(other)
        }
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
