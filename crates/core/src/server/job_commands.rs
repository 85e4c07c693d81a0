//! The job commands, with blender-remote's names and shapes (docs/COMPAT.md): `submit_code_job`,
//! `get_job_status`, `get_job_result`, `cancel_job`, `list_jobs`, `get_queue_status`. Answered on the
//! connection's reader thread, never behind Blender work; a submitted job goes to the main thread's queue
//! and its outcome to the service's job store (`crate::store`), not to the connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::reply::{prepare_execute_code, Shape};
use super::Shared;
use crate::config::{non_negative_seconds, positive_seconds};
use crate::jobs::{not_run, SubmitError};
use crate::protocol::{Outcome, Request};

fn seconds_param(
    params: &Map<String, Value>,
    name: &str,
    zero_ok: bool,
) -> Result<Option<Duration>, Outcome> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let s = n.as_f64().unwrap_or(f64::NAN);
            let checked = if zero_ok {
                non_negative_seconds(name, s)
            } else {
                positive_seconds(name, s)
            };
            checked
                .map(Some)
                .map_err(|e| Outcome::error(format!("{e}")))
        }
        Some(other) => Err(Outcome::error(format!(
            "{name} must be a number of seconds, got {other}"
        ))),
    }
}

fn job_id(params: &Map<String, Value>) -> Result<&str, Outcome> {
    match params.get("job_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(other) => Err(Outcome::error(format!(
            "'job_id' must be a job id string such as \"bld-job-1\", got {other}"
        ))),
        None => Err(Outcome::error(
            "missing parameter 'job_id' (the id that submit_code_job returned)",
        )),
    }
}

fn unknown(id: &str) -> Outcome {
    Outcome::Success(json!({
        "job_id": id,
        "found": false,
        "message": format!(
            "unknown job id {id:?}: never submitted here, or its result expired (results are kept for a \
             while after the job ends, and lost when Blender exits)"
        ),
    }))
}

fn found(mut snapshot: Map<String, Value>) -> Outcome {
    snapshot.insert("found".into(), Value::Bool(true));
    Outcome::Success(Value::Object(snapshot))
}

/// A job command's reply, or `None` when `req` is not one.
pub(super) fn job_command(shared: &Arc<Shared>, req: &mut Request) -> Option<Outcome> {
    let framed = req.id.is_some();
    let p = &mut req.params;
    let store = &shared.store;
    let outcome = match req.command.as_str() {
        "submit_code_job" => submit(shared, p, framed),
        "get_job_status" => match job_id(p) {
            Ok(id) => store.status(id).map_or_else(|| unknown(id), found),
            Err(e) => e,
        },
        "get_job_result" => match (job_id(p), seconds_param(p, "wait_timeout_seconds", true)) {
            (Ok(id), Ok(wait)) => store.result(id, wait).map_or_else(|| unknown(id), found),
            (Err(e), _) | (_, Err(e)) => e,
        },
        "cancel_job" => match (job_id(p), p.get("reason")) {
            (Ok(id), None | Some(Value::Null | Value::String(_))) => {
                let reason = p.get("reason").and_then(Value::as_str);
                store.cancel(id, reason).map_or_else(|| unknown(id), found)
            }
            (Ok(_), Some(other)) => {
                Outcome::error(format!("'reason' must be a string, got {other}"))
            }
            (Err(e), _) => e,
        },
        "list_jobs" => {
            let jobs = store.list();
            Outcome::Success(json!({"count": jobs.len(), "jobs": jobs}))
        }
        "get_queue_status" => {
            let running = shared.status().get("running_job").cloned();
            Outcome::Success(json!({
                "queue_length": shared.queue_len(),
                "queue_capacity": shared.queue.capacity(),
                "running_job": running.unwrap_or(Value::Null),
                "job_store": store.summary(),
            }))
        }
        _ => return None,
    };
    Some(outcome)
}

fn submit(shared: &Arc<Shared>, p: &mut Map<String, Value>, framed: bool) -> Outcome {
    let job_timeout = match seconds_param(p, "job_timeout_seconds", false) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let base64 = match prepare_execute_code(p, framed) {
        Ok(Shape::ExecuteCode { base64 }) => base64,
        Ok(_) => false,
        Err(message) => return Outcome::error(message),
    };
    if !shared
        .config
        .main_thread_commands
        .iter()
        .any(|c| c == "execute_code")
    {
        return Outcome::error("this service runs no code (execute_code is not registered)");
    }
    let params = std::mem::take(p);
    let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
    let (job, snapshot) =
        match shared
            .store
            .create(seq, "execute_code".into(), params, job_timeout, base64)
        {
            Ok(made) => made,
            Err(full) => return crate::jobs::not_run(&full.to_string()),
        };
    let submitted = {
        let stopping = shared.gate.read();
        if *stopping {
            Err((SubmitError::Stopped, job))
        } else {
            shared.queue.submit(job)
        }
    };
    match submitted {
        Ok(()) => found(snapshot),
        Err((why, job)) => {
            let message = match why {
                SubmitError::Stopped => "the service is stopping; the job was not run".to_string(),
                _ => format!(
                    "busy: {} requests are already queued for Blender's main thread; the job was not \
                     run; try again later",
                    shared.queue.capacity()
                ),
            };
            // Its record ends `failed`, with this reason and `ran: false`.
            job.refuse(not_run(&message));
            not_run(&message)
        }
    }
}
