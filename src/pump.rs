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
use crate::service::{
    current, current_addr, finish_retired, in_job, is_current, set_in_job, stop, wake_current,
};
#[cfg(unix)]
use crate::signals::SignalGuard;

/// The running job's progress listener, for `report_progress`. A global, not a thread-local: Blender calls
/// some render handlers from its render threads, while the job still runs on the main thread.
static PROGRESS: Mutex<Option<ProgressSink>> = Mutex::new(None);

/// What a nested pump says: a job cannot run another job on the same thread (its own reply, and the
/// service's `running_job`, would be wrong), and `keep_alive()` inside one would never return to it.
const NESTED: &str = "cannot run inside a request: this code is itself a job of the bld_remote pump \
     (on this thread), and a pump inside it would run other jobs before this one replies. Return from the \
     request instead; queued requests run right after it";

/// Run up to `max_jobs` pending jobs on this (the main) thread. Waits up to `timeout` seconds for the
/// first one, with the GIL released. Performs a requested stop before returning. Returns jobs run.
/// Refused (`RuntimeError`) from inside a job.
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
    if in_job() {
        return Err(PyRuntimeError::new_err(format!("step() {NESTED}")));
    }
    let began = Instant::now();
    let mut ran = 0;
    // The service is looked up for every job: a job may have stopped it, or restarted it on a new one.
    while let Some((shared, handler)) = current() {
        if ran >= max_jobs
            || shared.stop_requested()
            || budget.is_some_and(|b| began.elapsed() >= b)
        {
            break;
        }
        let wait = if ran == 0 { first_wait } else { Duration::ZERO };
        let msg = if wait.is_zero() {
            shared.next_message(Some(Duration::ZERO))
        } else {
            py.detach(|| shared.next_message(Some(wait)))
        };
        let Some(Msg::Job(job)) = msg else { break };
        run_job(py, &shared, &handler, job);
        ran += 1;
        // A job that stopped or restarted the service (disabling the add-on, say) ends the step, so that
        // whoever drives it (the GUI's timer pump or keeper, keep_alive) looks at the new state first.
        if finish_retired(py) {
            break;
        }
    }
    if let Some((shared, _)) = current() {
        finish_requested_stop(py, &shared);
    }
    let _ = finish_retired(py);
    Ok(ran)
}

/// The headless pump: block on the job channel with the GIL released, run each job the moment it arrives,
/// and return when the service stops (a restart from inside a job keeps it serving the new service).
///
/// Signals (`handle_signals`, what `keep_alive()` passes on the main thread): a `SignalGuard` owns SIGTERM
/// and SIGINT while the pump runs (see `signals`): their native handler wakes the pump through a socket
/// pair of its own, so nothing Python code does to `signal.set_wakeup_fd` matters, and after every job and
/// wake-up the handler is put back if a job replaced it. Idle, the pump sleeps with zero wake-ups. Python
/// handlers that a job installed still run (`check_signals`) while they are in force. Without the guard
/// (off Unix, or `handle_signals` false) the pump wakes every 100 ms to let Python's handlers run.
#[pyfunction]
#[pyo3(signature = (handle_signals=true))]
pub fn serve_forever(py: Python<'_>, handle_signals: bool) -> PyResult<()> {
    if in_job() {
        return Err(PyRuntimeError::new_err(format!("keep_alive() {NESTED}")));
    }
    if current().is_none() {
        return Err(PyRuntimeError::new_err(
            "the bld_remote service is not running; call start_mcp_service() first",
        ));
    }
    #[cfg(unix)]
    let guard = if handle_signals {
        SignalGuard::install(wake_current)
    } else {
        None
    };
    #[cfg(not(unix))]
    let _ = handle_signals;
    let result = (|| -> PyResult<()> {
        loop {
            py.check_signals()?;
            let Some((shared, handler)) = current() else {
                return Ok(());
            };
            #[cfg(unix)]
            if let Some(g) = guard.as_ref() {
                crate::signals::reassert();
                if g.take_received().is_some() {
                    shared.request_stop();
                }
            }
            if shared.stop_requested() || shared.is_stopping() {
                finish_requested_stop(py, &shared);
                return Ok(());
            }
            #[cfg(unix)]
            let timeout = if guard.is_some() {
                None
            } else {
                Some(Duration::from_millis(100))
            };
            #[cfg(not(unix))]
            let timeout = Some(Duration::from_millis(100));
            match py.detach(|| shared.next_message(timeout)) {
                Some(Msg::Job(job)) => {
                    run_job(py, &shared, &handler, job);
                    let _ = finish_retired(py);
                }
                Some(Msg::Wake) | None => {}
            }
        }
    })();
    #[cfg(unix)]
    if let Some(g) = guard {
        g.close(py);
    }
    let _ = finish_retired(py);
    result
}

fn finish_requested_stop(py: Python<'_>, shared: &Arc<Shared>) {
    if shared.stop_requested() && !in_job() && is_current(shared) {
        stop(py);
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
            // Nested pumps are refused (`NESTED`), so there is no outer job; restored all the same.
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
    // Before the reply leaves: its client may signal us the moment it has it (see `signals::reassert`).
    #[cfg(unix)]
    crate::signals::reassert();
    let outcome = if shared.is_stopping() || shared.stop_requested() {
        mark_service_stopping(outcome, current_addr())
    } else {
        outcome
    };
    shared.finish(job, outcome);
}

/// The job stopped the service it ran in (`stop_mcp_service()`, its add-on disabled, factory settings):
/// say so in its reply, which is the last on this connection. A success keeps its result, with
/// `service_stopping: true` and a `service_message` added to it (a result that is not an object is put
/// under `value`); an error gets the same two fields. `restarted_on`: where the service that replaced it in
/// the same request listens.
fn mark_service_stopping(outcome: Outcome, restarted_on: Option<std::net::SocketAddr>) -> Outcome {
    let message = match restarted_on {
        Some(addr) => format!(
            "the service this request ran in stopped during it; this connection closes after this reply. \
             A new service listens on {addr}"
        ),
        None => "the service is stopping: this request stopped it (or unloaded its add-on); this \
                 connection closes after this reply and nothing listens any more"
            .to_string(),
    };
    let mark = |m: &mut Map<String, Value>| {
        m.insert("service_stopping".into(), Value::Bool(true));
        m.insert("service_message".into(), Value::String(message.clone()));
        if let Some(addr) = restarted_on {
            m.insert("restarted_on".into(), Value::String(addr.to_string()));
        }
    };
    match outcome {
        Outcome::Success(Value::Object(mut m)) => {
            mark(&mut m);
            Outcome::Success(Value::Object(m))
        }
        Outcome::Success(other) => {
            let mut m = Map::new();
            m.insert("value".into(), other);
            mark(&mut m);
            Outcome::Success(Value::Object(m))
        }
        Outcome::Error { message, mut extra } => {
            mark(&mut extra);
            Outcome::Error { message, extra }
        }
    }
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
            // execute_code's report of what the code changed: it ran, so it did change that.
            if let Some(changes) = m.remove("changes") {
                extra.insert("changes".into(), changes);
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
