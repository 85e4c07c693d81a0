//! The job commands, with blender-remote's names and shapes (docs/COMPAT.md): `submit_code_job`,
//! `get_job_status`, `get_job_result`, `cancel_job`, `list_jobs`, `get_queue_status`. Answered on the
//! connection's reader thread, never behind Blender work; a submitted job goes to the main thread's queue
//! and its outcome to the service's job store (`crate::store`), not to the connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::reader::{InFlight, ToWriter};
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

pub(super) fn unknown(id: &str) -> Outcome {
    Outcome::Success(json!({
        "job_id": id,
        "found": false,
        "message": format!(
            "unknown job id {id:?}: never submitted here, or its result expired (results are kept for a \
             while after the job ends, and lost when Blender exits)"
        ),
    }))
}

use crate::store::{found, ResultNow};

/// `get_job_result` with a wait, answered without blocking the connection's reader: the reply now when
/// the job has ended (or is unknown); else the request is handed to the writer as in flight, and the store
/// sends it the result when the job ends (or the writer answers with the snapshot at the wait's end).
/// `None` for anything else, bad parameters included (the plain path answers those).
pub(super) fn result_wait(
    shared: &Arc<Shared>,
    req: &Request,
    done_tx: &crossbeam_channel::Sender<crate::jobs::Completion>,
) -> Option<ToWriter> {
    if req.command != "get_job_result" {
        return None;
    }
    let p = &req.params;
    let (Ok(id), Ok(Some(wait))) = (job_id(p), seconds_param(p, "wait_timeout_seconds", true))
    else {
        return None;
    };
    let deadline = Instant::now()
        .checked_add(wait)
        .filter(|_| !wait.is_zero())?;
    let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
    let ready = |outcome: Outcome| ToWriter::Ready {
        framed: req.id.is_some(),
        bytes: crate::protocol::encode_reply(req.id.as_ref(), &outcome),
        settle: None,
        request: true,
    };
    Some(match shared.store.result_or_wait(id, seq, done_tx) {
        ResultNow::Ready(Some(r)) => ready(found(r)),
        ResultNow::Ready(None) => ready(unknown(id)),
        ResultNow::Waiting => ToWriter::Job(InFlight {
            seq,
            id: req.id.clone(),
            shape: Shape::Plain,
            deadline: Some(deadline),
            state: Arc::new(crate::jobs::JobState::default()),
            job_wait: Some((Arc::clone(&shared.store), id.to_string())),
        }),
    })
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

/// Longest job id a client may choose.
const MAX_CLIENT_JOB_ID: usize = 64;

/// The id a client chose for its job (`job_id` in `submit_code_job`), if any: 1 to 64 of `A-Z a-z 0-9 . _ :
/// -`, and not of the service's own form `bld-job-N`. Choosing it lets a client send the submission and
/// its `get_job_result` in one go, and find the job again after losing the connection.
fn client_job_id(p: &Map<String, Value>) -> Result<Option<String>, Outcome> {
    let bad = |v: &Value| {
        Outcome::error(format!(
            "'job_id' (optional, chosen by the client) must be 1 to {MAX_CLIENT_JOB_ID} letters, digits or \
             . _ : -, not of the service's own form bld-job-N; got {v}"
        ))
    };
    match p.get("job_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s))
            if (1..=MAX_CLIENT_JOB_ID).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
                && !s
                    .strip_prefix("bld-job-")
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            Ok(Some(s.clone()))
        }
        Some(v) => Err(bad(v)),
    }
}

fn submit(shared: &Arc<Shared>, p: &mut Map<String, Value>, framed: bool) -> Outcome {
    let job_timeout = match seconds_param(p, "job_timeout_seconds", false) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let chosen_id = match client_job_id(p) {
        Ok(id) => id,
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
    let mut params = std::mem::take(p);
    params.remove("job_id");
    let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
    let (job, snapshot) = match shared.store.create(
        seq,
        chosen_id,
        "execute_code".into(),
        params,
        job_timeout,
        base64,
    ) {
        Ok(made) => made,
        Err(crate::store::StoreFull::IdInUse(id)) => {
            // Not run; and the id names a job that exists (perhaps this very submission, sent again).
            let mut o =
                crate::jobs::not_run(&crate::store::StoreFull::IdInUse(id.clone()).to_string());
            if let Outcome::Error { extra, .. } = &mut o {
                extra.insert("job_id".into(), Value::from(id));
                extra.insert("id_in_use".into(), Value::Bool(true));
            }
            return o;
        }
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
