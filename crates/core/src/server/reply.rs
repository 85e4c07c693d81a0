//! Reply shaping: how a job's outcome becomes the bytes a client expects (plain replies, `execute_code`'s
//! two views of its output, blender-remote's legacy `{"code": ...}` replies, screenshots inlined as
//! base64), and the `execute_code` parameters checked before a job is queued. Runs on connection threads:
//! `prepare_execute_code` on the reader, the rest on the writer, never on Blender's main thread.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::protocol::{self, Outcome, Reply};

/// How a job's outcome becomes the reply a client expects.
#[derive(Debug, Clone, Copy)]
pub(super) enum Shape {
    Plain,
    ExecuteCode {
        base64: bool,
    },
    /// blender-remote's `{"code": ...}` form: `{"response": "OK"|"FAILED", "message", "output"}`.
    Legacy,
    /// `get_viewport_screenshot`: the main thread writes the file; the image is read and base64-encoded
    /// here, on the network thread (unless the request says `"inline": false`).
    Screenshot {
        inline: bool,
    },
}

/// Validate `execute_code` params and decode base64 code here, off the main thread.
///
/// `changes` (what the code changed in the scene, docs/PROTOCOL.md) must be a bool when given. Left out,
/// it is on for framed requests (`framed`: the request has an `id`, so the client is one of ours) and off
/// for plain ones: the clients of the original protocol never asked for it, and one of them reads a reply
/// with a single `recv(8192)`, which a longer reply would break (COMPAT.md).
pub(super) fn prepare_execute_code(
    params: &mut Map<String, Value>,
    framed: bool,
) -> Result<Shape, String> {
    match params.get("changes") {
        Some(Value::Bool(_)) => {}
        None | Some(Value::Null) => {
            params.insert("changes".into(), Value::Bool(framed));
        }
        Some(other) => {
            return Err(format!(
                "changes must be true or false (report what the code changed in the scene), got {other}"
            ))
        }
    }
    let code_is_b64 = params.get("code_is_base64").is_some_and(truthy);
    let return_b64 = params.get("return_as_base64").is_some_and(truthy);
    match params.get("code") {
        Some(Value::String(code)) => {
            if code_is_b64 {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(code.trim())
                    .map_err(|e| format!("'code' is not valid base64: {e}"))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| "base64 'code' is not UTF-8 text".to_string())?;
                params.insert("code".into(), Value::String(text));
            }
        }
        Some(_) => return Err("'code' must be a string".into()),
        None => return Err("execute_code needs 'code' (a string of Python)".into()),
    }
    Ok(Shape::ExecuteCode { base64: return_b64 })
}

pub(super) fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"),
        _ => false,
    }
}

pub(super) fn shape_reply(id: Option<&Value>, shape: Shape, outcome: Outcome) -> Reply {
    let bytes = match (shape, outcome) {
        (
            Shape::Plain | Shape::ExecuteCode { .. } | Shape::Screenshot { .. },
            o @ Outcome::Error { .. },
        )
        | (Shape::Plain | Shape::Screenshot { inline: false }, o @ Outcome::Success(_)) => {
            protocol::encode_reply(id, &o)
        }
        (Shape::Screenshot { inline: true }, Outcome::Success(v)) => {
            protocol::encode_reply(id, &Outcome::Success(screenshot_result(v)))
        }
        (Shape::ExecuteCode { base64 }, Outcome::Success(v)) => {
            return execute_code_reply(id, v, base64);
        }
        (Shape::Legacy, Outcome::Success(v)) => return legacy_success_reply(id, v),
        (Shape::Legacy, Outcome::Error { message, extra }) => {
            let stdout = extra
                .get("output")
                .and_then(|o| o.get("stdout"))
                .cloned()
                .unwrap_or_else(|| Value::from(""));
            let mut r = json!({"response": "FAILED", "message": message, "output": stdout});
            if let Value::Object(m) = &mut r {
                if let Some(tb) = extra.get("traceback") {
                    m.insert("traceback".into(), tb.clone());
                }
                if let Some(id) = id {
                    m.insert("id".into(), id.clone());
                }
            }
            protocol::encode_value(&r)
        }
    };
    bytes.into()
}

/// The blender-remote reply to `{"code": ...}`: `{"id"?, "message", "output": <stdout>, "response": "OK"}`
/// (keys in the order `serde_json` writes them), the output written from its own buffer like
/// [`execute_code_reply`]'s.
fn legacy_success_reply(id: Option<&Value>, v: Value) -> Reply {
    let stdout = match v {
        Value::Object(mut m) => take_stdout(&mut m),
        _ => String::new(),
    };
    let mut reply = Reply::with_body(protocol::json_string_contents(stdout));
    let mut head = b"{".to_vec();
    if let Some(id) = id {
        head.extend_from_slice(b"\"id\":");
        protocol::write_json(&mut head, id);
        head.push(b',');
    }
    head.extend_from_slice(b"\"message\":\"Code executed successfully\",\"output\":\"");
    reply.push(head);
    reply.push_body();
    reply.push(b"\",\"response\":\"OK\"}\n".to_vec());
    reply
}

/// The captured output in a job's result, moved out (empty when absent).
fn take_stdout(m: &mut Map<String, Value>) -> String {
    match m.remove("stdout") {
        Some(Value::String(s)) => s,
        _ => String::new(),
    }
}

/// Largest screenshot file sent inline; bigger ones are only on disk (`filepath`).
const MAX_INLINE_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

/// Add the image file written by the main thread to the reply as base64 (`data`), off the main thread.
fn screenshot_result(v: Value) -> Value {
    let Value::Object(mut m) = v else { return v };
    let Some(path) = m.get("filepath").and_then(Value::as_str).map(str::to_owned) else {
        return Value::Object(m);
    };
    let read = std::fs::metadata(&path).and_then(|meta| {
        if meta.len() > MAX_INLINE_IMAGE_BYTES {
            Err(std::io::Error::other(format!(
                "{} bytes is more than the {MAX_INLINE_IMAGE_BYTES} sent inline",
                meta.len()
            )))
        } else {
            std::fs::read(&path)
        }
    });
    match read {
        Ok(bytes) => {
            m.insert(
                "data".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
            m.insert("encoding".into(), Value::from("base64"));
        }
        Err(e) => {
            m.insert(
                "data_error".into(),
                Value::String(format!("image not inlined: {e}")),
            );
        }
    }
    Value::Object(m)
}

/// `{"stdout", "stderr", "value"?, "duration"}` from the main thread → the reply clients read:
/// `{"executed": true, "result": <stdout>, "output": {"stdout", "stderr"}, "duration", "value"?}`.
/// Clients read the captured stdout both as `result` and as `output.stdout` (COMPAT.md): it is escaped
/// once (not at all when it is plain text) and the reply refers to it twice (`Reply` pieces, one vectored
/// write), never cloned as a `Value` nor copied (a reply can be tens of megabytes).
fn execute_code_reply(id: Option<&Value>, v: Value, base64: bool) -> Reply {
    let Value::Object(mut m) = v else {
        return protocol::encode_reply(id, &Outcome::Success(v)).into();
    };
    let stdout = take_stdout(&mut m);
    let stderr = m.remove("stderr").unwrap_or_else(|| Value::from(""));
    let encoded = base64.then(|| base64::engine::general_purpose::STANDARD.encode(&stdout));
    let mut reply = Reply::with_body(protocol::json_string_contents(stdout));
    let mut head = Vec::with_capacity(128);
    protocol::begin_success_reply(&mut head, id);
    head.extend_from_slice(b"{\"executed\":true,\"output\":{\"stdout\":\"");
    reply.push(head);
    reply.push_body();
    let mut rest = Vec::with_capacity(256);
    rest.push(b'"');
    protocol::write_field(&mut rest, "stderr", &stderr);
    rest.extend_from_slice(b"},\"result\":");
    if let Some(encoded) = encoded {
        protocol::write_str(&mut rest, &encoded);
        rest.extend_from_slice(b",\"result_is_base64\":true");
    } else {
        rest.push(b'"');
        reply.push(rest);
        reply.push_body();
        rest = vec![b'"'];
    }
    for (k, val) in &m {
        if !matches!(
            k.as_str(),
            "executed" | "result" | "output" | "result_is_base64"
        ) {
            protocol::write_field(&mut rest, k, val);
        }
    }
    rest.extend_from_slice(b"}}\n");
    reply.push(rest);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execute_code_reply_shapes() {
        let parse = |reply: Reply| -> Value {
            let bytes = reply.to_vec();
            assert_eq!(memchr::memchr_iter(b'\n', &bytes).count(), 1);
            assert_eq!(bytes.last(), Some(&b'\n'));
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        let r = parse(execute_code_reply(
            Some(&json!(4)),
            json!({"stdout": "h\"i\n", "stderr": "w", "value": {"a": [1]}, "duration": 0.1}),
            false,
        ));
        assert_eq!(
            r,
            json!({"id": 4, "status": "success", "result": {
                "executed": true, "result": "h\"i\n", "output": {"stdout": "h\"i\n", "stderr": "w"},
                "value": {"a": [1]}, "duration": 0.1,
            }})
        );
        let r = parse(execute_code_reply(
            None,
            json!({"stdout": "hi\n", "stderr": ""}),
            true,
        ));
        assert_eq!(r["result"]["result"], json!("aGkK"));
        assert_eq!(r["result"]["result_is_base64"], json!(true));
        assert_eq!(r["result"]["output"]["stdout"], json!("hi\n"));
        assert!(r.get("id").is_none());
    }

    #[test]
    fn screenshot_reply_gets_the_file_inline() {
        let path =
            std::env::temp_dir().join(format!("bld_remote_shot_test_{}.png", std::process::id()));
        std::fs::write(&path, b"\x89PNG").unwrap_or_default();
        let v = screenshot_result(json!({"filepath": path.to_string_lossy(), "width": 1}));
        let _ = std::fs::remove_file(&path);
        assert_eq!(v["data"], json!("iVBORw=="));
        assert_eq!(v["encoding"], json!("base64"));
        let v = screenshot_result(json!({"filepath": "/nonexistent/x.png"}));
        assert!(v["data_error"].is_string());
        assert!(v.get("data").is_none());
    }

    #[test]
    fn base64_code_is_decoded_off_the_main_thread() {
        let mut p = Map::new();
        p.insert("code".into(), json!("cHJpbnQoMSk="));
        p.insert("code_is_base64".into(), json!(true));
        assert!(prepare_execute_code(&mut p, true).is_ok());
        assert_eq!(p["code"], json!("print(1)"));
        p.insert("code".into(), json!("!!!"));
        assert!(prepare_execute_code(&mut p, true).is_err());
        let mut p = Map::new();
        assert!(prepare_execute_code(&mut p, true).is_err());
    }

    #[test]
    fn changes_default_on_for_framed_off_for_plain_and_must_be_a_bool() {
        for (framed, given, want) in [
            (true, None, Some(json!(true))),
            (false, None, Some(json!(false))),
            (true, Some(json!(null)), Some(json!(true))),
            (false, Some(json!(true)), Some(json!(true))),
            (true, Some(json!(false)), Some(json!(false))),
        ] {
            let mut p = Map::new();
            p.insert("code".into(), json!("pass"));
            if let Some(g) = given {
                p.insert("changes".into(), g);
            }
            assert!(prepare_execute_code(&mut p, framed).is_ok());
            assert_eq!(p.get("changes").cloned(), want);
        }
        for bad in [json!(1), json!("yes"), json!([]), json!({})] {
            let mut p = Map::new();
            p.insert("code".into(), json!("pass"));
            p.insert("changes".into(), bad);
            let e = prepare_execute_code(&mut p, true).unwrap_err();
            assert!(e.starts_with("changes must be true or false"), "{e}");
        }
    }
}
