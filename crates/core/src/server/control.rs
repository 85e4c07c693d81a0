//! Control commands, answered on the connection's reader thread without waiting for Blender's main
//! thread: `ping`, `get_status`, the integration probes, `put/get/remove_persist_data`, `server_shutdown`
//! and `cancel`.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::Shared;
use crate::jobs::{not_run, JobState, Phase};
use crate::protocol::{self, Outcome, Request};

fn str_param<'a>(params: &'a Map<String, Value>, name: &str) -> Result<&'a str, Outcome> {
    match params.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Outcome::error(format!("'{name}' must be a string"))),
        None => Err(Outcome::error(format!("missing parameter '{name}'"))),
    }
}

/// `cancel` of one job: the reply to the `cancel` request, and the reply the cancelled job gets right now
/// (its later outcome, if any, is discarded).
fn cancel(state: &JobState) -> (Outcome, Option<Outcome>) {
    if state.cancel() {
        return (
            Outcome::Success(
                json!({"cancelled": true, "state": Phase::Queued.name(), "ran": false}),
            ),
            Some(not_run(
                "cancelled: the request was not run and never will be",
            )),
        );
    }
    match state.phase() {
        Phase::Running => {
            let mut extra = Map::new();
            extra.insert("ran".into(), Value::from("unknown"));
            extra.insert("state".into(), Value::from(Phase::Running.name()));
            extra.insert("cancelled".into(), Value::Bool(true));
            (
                Outcome::Success(json!({
                    "cancelled": true,
                    "state": Phase::Running.name(),
                    "ran": "unknown",
                    "message": "the request is already running in Blender and cannot be stopped; \
                                its result will be discarded",
                })),
                Some(Outcome::error_with(
                    "cancelled while running: it may still be running; its result will be discarded",
                    extra,
                )),
            )
        }
        phase => (
            Outcome::Success(json!({"cancelled": false, "state": phase.name()})),
            None,
        ),
    }
}

/// Commands answered on the network thread: they never wait for Blender's main thread. A `cancel` may
/// also settle a job now (`settle_out`: its seq and the reply it gets).
pub(super) fn control(
    shared: &Arc<Shared>,
    req: &mut Request,
    by_id: &HashMap<String, (u64, Arc<JobState>)>,
    settle_out: &mut Option<(u64, Outcome)>,
) -> Option<Outcome> {
    if req.legacy {
        return None;
    }
    let p = &mut req.params;
    let outcome = match req.command.as_str() {
        "ping" => Outcome::Success(json!({"pong": true, "message": "pong"})),
        "get_status" => Outcome::Success(shared.status()),
        "get_polyhaven_status"
        | "get_hyper3d_status"
        | "get_sketchfab_status"
        | "get_hunyuan3d_status" => {
            let what = req
                .command
                .trim_start_matches("get_")
                .trim_end_matches("_status");
            Outcome::Success(json!({
                "enabled": false,
                "message": format!("{what} integration is not available in bld_remote"),
            }))
        }
        "put_persist_data" => match str_param(p, "key") {
            Ok(key) => {
                let key = key.to_string();
                // Moved, not copied: the request is answered here and dropped.
                let data = p.remove("data").unwrap_or(Value::Null);
                match shared.persist().put(key.clone(), data) {
                    Ok(()) => {
                        Outcome::Success(Value::String(format!("Data stored with key: {key}")))
                    }
                    Err(e) => Outcome::error(e.to_string()),
                }
            }
            Err(e) => e,
        },
        // Found: answered by `persist_get_reply` (the shared value is written into the reply, uncopied).
        "get_persist_data" => match str_param(p, "key") {
            Ok(_) => Outcome::Success(json!({
                "data": p.remove("default").unwrap_or(Value::Null),
                "found": false,
            })),
            Err(e) => e,
        },
        "remove_persist_data" => match str_param(p, "key") {
            Ok(key) => Outcome::Success(json!({"removed": shared.persist().remove(key)})),
            Err(e) => e,
        },
        "server_shutdown" => {
            shared.request_stop();
            Outcome::Success(json!({"message": "Server shutting down"}))
        }
        "cancel" => match p.get("id") {
            Some(id @ (Value::Number(_) | Value::String(_))) => match by_id.get(&id_key(id)) {
                Some((seq, state)) => {
                    let (outcome, settle) = cancel(state);
                    if let Some(reply) = settle {
                        *settle_out = Some((*seq, reply));
                    }
                    outcome
                }
                None => Outcome::Success(json!({"cancelled": false, "state": "unknown"})),
            },
            _ => Outcome::error("cancel needs 'id': the id of a request sent on this connection"),
        },
        _ => return super::job_commands::job_command(shared, req),
    };
    Some(outcome)
}

/// `get_persist_data` of a stored key: the reply's bytes, serialised straight from the shared stored value
/// (no copy of it is made, and the store's lock is not held while writing). `None` for anything else
/// (other commands, a missing key, a bad `key`), which [`control`] answers.
pub(super) fn persist_get_reply(
    shared: &Shared,
    req: &Request,
    id: Option<&Value>,
) -> Option<Vec<u8>> {
    if req.legacy || req.command != "get_persist_data" {
        return None;
    }
    let Some(Value::String(key)) = req.params.get("key") else {
        return None;
    };
    let value = shared.persist().get(key)?;
    let mut out = Vec::with_capacity(64);
    protocol::begin_success_reply(&mut out, id);
    out.extend_from_slice(b"{\"data\":");
    protocol::write_json(&mut out, &value);
    out.extend_from_slice(b",\"found\":true}}\n");
    Some(out)
}

/// The key of a request id in a connection's table of jobs (`cancel` finds jobs by it).
pub(super) fn id_key(id: &Value) -> String {
    id.to_string()
}
