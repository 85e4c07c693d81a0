//! What a read-only token may do: an allow-list of the commands that only read, checked on the
//! connection's reader thread right after the token check, before anything is queued for Blender's main
//! thread. A command not on the list (a new one included, until someone declares it read-only here) is
//! refused with `forbidden: read-only token (...)`, `ran: false`, and the connection stays open. Pure Rust.
//! See docs/PROTOCOL.md, *Roles*.

use serde_json::{Map, Value};

use crate::auth::{self, Rights};
use crate::protocol::{Outcome, Request};

/// The commands a read-only token may send. Every one of them only reads: Blender data (answered on the
/// main thread), the service's state, the persist store and the job store.
pub const READ_COMMANDS: &[&str] = &[
    // answered on the network threads
    "ping",
    "get_status",
    auth::CHALLENGE,
    auth::AUTHENTICATE,
    "get_persist_data",
    "get_job_status",
    "get_job_result",
    "list_jobs",
    "get_queue_status",
    // blender-mcp's start-up probes (answered "disabled")
    "get_polyhaven_status",
    "get_hyper3d_status",
    "get_sketchfab_status",
    "get_hunyuan3d_status",
    // `cancel` stops only this connection's own requests (by id): it changes nothing else
    "cancel",
    // answered on Blender's main thread
    "get_scene_info",
    "get_object_info",
    "get_material_info",
    "get_collection_info",
    "list_datablocks",
    "look",
    "render_image",
    "get_viewport_screenshot",
    "lookup_bpy_api",
];

/// Commands that write an image file and take the path to write as a parameter: with read rights the
/// path may not be chosen (a read-only token must not overwrite files); they write a fresh temporary
/// file, or return the bytes inline, instead.
const FILE_PARAMS: &[(&str, &[&str])] = &[
    ("render_image", &["filepath"]),
    ("get_viewport_screenshot", &["filepath"]),
    ("look", &["filepath", "output_path"]),
];

/// Whether `command` is on the read-only allow-list.
pub fn is_read_command(command: &str) -> bool {
    READ_COMMANDS.contains(&command)
}

/// `None` when `rights` allow the request; else the refusal to send (nothing ran).
pub fn refusal(rights: Rights, request: &Request) -> Option<Outcome> {
    if rights == Rights::Full {
        return None;
    }
    if request.legacy {
        return Some(forbidden(
            "a request without \"type\" runs Python code; this token may only read".into(),
        ));
    }
    let command = request.command.as_str();
    if !is_read_command(command) {
        return Some(forbidden(format!(
            "{command:?} is not allowed; this token may only read: {}",
            READ_COMMANDS
                .iter()
                .filter(|c| !matches!(**c, auth::CHALLENGE | auth::AUTHENTICATE | "cancel"))
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for (cmd, names) in FILE_PARAMS {
        if *cmd != command {
            continue;
        }
        for name in *names {
            if request.params.get(*name).is_some_and(|v| !v.is_null()) {
                return Some(forbidden(format!(
                    "{command} may not choose the file to write ('{name}') with this token; leave '{name}' \
                     out to get a temporary file or the image inline"
                )));
            }
        }
    }
    None
}

fn forbidden(why: String) -> Outcome {
    let mut extra = Map::new();
    extra.insert("ran".into(), Value::Bool(false));
    extra.insert("forbidden".into(), Value::Bool(true));
    extra.insert("role".into(), Value::from(Rights::Read.name()));
    Outcome::error_with(format!("forbidden: read-only token ({why})"), extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(command: &str, params: Value, legacy: bool) -> Request {
        Request {
            id: None,
            command: command.into(),
            params: match params {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            token: None,
            timeout: None,
            legacy,
        }
    }

    fn message(o: Option<Outcome>) -> String {
        match o {
            Some(Outcome::Error { message, .. }) => message,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn reads_pass_everything_else_is_forbidden() {
        for c in READ_COMMANDS {
            assert!(
                refusal(Rights::Read, &req(c, json!({}), false)).is_none(),
                "{c}"
            );
        }
        for c in [
            "execute_code",
            "submit_code_job",
            "cancel_job",
            "put_persist_data",
            "remove_persist_data",
            "export_scene",
            "server_shutdown",
            "no_such_command",
        ] {
            let m = message(refusal(Rights::Read, &req(c, json!({}), false)));
            assert!(m.starts_with("forbidden: read-only token ("), "{m}");
            assert!(m.contains(c), "{m}");
            assert!(refusal(Rights::Full, &req(c, json!({}), false)).is_none());
        }
        let m = message(refusal(Rights::Read, &req("", json!({"code": "1"}), true)));
        assert!(m.contains("without \"type\""), "{m}");
    }

    #[test]
    fn a_read_token_may_not_choose_where_a_file_is_written() {
        let r = req(
            "render_image",
            json!({"filepath": "/home/me/.bashrc"}),
            false,
        );
        assert!(message(refusal(Rights::Read, &r)).contains("'filepath'"));
        let ok = req(
            "render_image",
            json!({"filepath": null, "inline": true}),
            false,
        );
        assert!(refusal(Rights::Read, &ok).is_none());
        assert!(refusal(Rights::Full, &r).is_none());
    }
}
