//! A request: one frame (as split by the decoder) parsed into its command, params, id, token and
//! timeout, or a `BadRequest` that keeps its id when it has one. Runs on each connection's reader thread.

use std::time::Duration;

use serde_json::{Map, Value};

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Present in framed mode: echoed in the reply; several requests may be in flight.
    pub id: Option<Value>,
    /// The command (`type` on the wire). For the legacy blender-remote form this is `execute_code`.
    pub command: String,
    pub params: Map<String, Value>,
    pub token: Option<String>,
    /// Seconds; the deadline starts when the request is read.
    /// The request's own deadline, range-checked here (`config::positive_seconds`).
    pub timeout: Option<Duration>,
    /// The legacy blender-remote form `{"code": ..., "message": ...}` with its own reply shape.
    pub legacy: bool,
}

/// A request that could be split from the stream but not understood. The stream stays usable.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    pub id: Option<Value>,
    pub message: String,
}

/// Parse one complete frame (as split by [`Decoder`]) into a request.
pub fn parse_request(frame: &[u8]) -> Result<Request, BadRequest> {
    let value: Value = serde_json::from_slice(frame).map_err(|e| BadRequest {
        id: None,
        message: format!("malformed JSON: {e}"),
    })?;
    let Value::Object(mut obj) = value else {
        return Err(BadRequest {
            id: None,
            message: "a request must be a JSON object".into(),
        });
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::Number(_) | Value::String(_))) => Some(v),
        Some(_) => {
            return Err(BadRequest {
                id: None,
                message: "'id' must be a number or a string".into(),
            });
        }
    };
    let bad = |message: String| BadRequest {
        id: id.clone(),
        message,
    };
    let token = match obj.remove("token") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(bad("'token' must be a string".into())),
    };
    let timeout = match obj.remove("timeout") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => {
            match crate::config::positive_seconds("'timeout'", n.as_f64().unwrap_or(f64::NAN)) {
                Ok(t) => Some(t),
                Err(e) => return Err(bad(e.0)),
            }
        }
        Some(_) => {
            return Err(bad(
                "'timeout' must be a positive number of seconds, not a string or other value"
                    .into(),
            ))
        }
    };
    match obj.remove("type") {
        Some(Value::String(command)) => {
            let params = match obj.remove("params") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(p)) => p,
                Some(_) => return Err(bad("'params' must be a JSON object".into())),
            };
            Ok(Request {
                id,
                command,
                params,
                token,
                timeout,
                legacy: false,
            })
        }
        Some(_) => Err(bad("'type' must be a string naming a command".into())),
        None => {
            // blender-remote's legacy form: {"code": "...", "message": "..."}.
            match obj.remove("code") {
                Some(Value::String(code)) => {
                    let mut params = Map::new();
                    params.insert("code".into(), Value::String(code));
                    Ok(Request {
                        id,
                        command: "execute_code".into(),
                        params,
                        token,
                        timeout,
                        legacy: true,
                    })
                }
                Some(_) => Err(bad("'code' must be a string".into())),
                None => Err(bad(
                    "request has no 'type' (expected {\"type\": \"<command>\", \"params\": {...}})"
                        .into(),
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_requests_ids_params_and_legacy_form() {
        let r = parse_request(br#"{"type":"get_object_info","params":{"name":"Cube"},"id":3}"#);
        let r = r.unwrap();
        assert_eq!(r.command, "get_object_info");
        assert_eq!(r.id, Some(json!(3)));
        assert_eq!(r.params["name"], json!("Cube"));
        assert!(!r.legacy);

        let r = parse_request(br#"{"type":"ping"}"#).unwrap();
        assert!(r.params.is_empty() && r.id.is_none());

        let r = parse_request(br#"{"code":"print(1)","message":"hi"}"#).unwrap();
        assert!(r.legacy);
        assert_eq!(r.command, "execute_code");
        assert_eq!(r.params["code"], json!("print(1)"));
    }

    #[test]
    fn bad_requests_keep_their_id_when_they_have_one() {
        let e = parse_request(br#"{"id":"a","type":5}"#).err();
        assert_eq!(e.as_ref().and_then(|e| e.id.clone()), Some(json!("a")));
        assert!(parse_request(br#"{"params":{}}"#).is_err());
        assert!(parse_request(br#"{"type":"x","params":[1]}"#).is_err());
        assert!(parse_request(br#"{"type":"x","timeout":-1}"#).is_err());
        // Numbers that would overflow a Duration are bad requests that keep their id, never a panic.
        for t in [
            "1e20",
            "18446744073709551616",
            "1e308",
            "0",
            "-0.0",
            "\"5\"",
            "true",
            "[1]",
        ] {
            let frame = format!(r#"{{"id":7,"type":"x","timeout":{t}}}"#);
            let e = parse_request(frame.as_bytes()).err();
            assert_eq!(e.as_ref().and_then(|e| e.id.clone()), Some(json!(7)), "{t}");
            assert!(e.is_some_and(|e| e.message.contains("'timeout'")), "{t}");
        }
        let r = parse_request(br#"{"type":"x","timeout":2.5}"#).unwrap();
        assert_eq!(r.timeout, Some(Duration::from_millis(2500)));
        let e = parse_request(br#"{"type": tru}"#).err();
        assert!(e.is_some_and(|e| e.message.starts_with("malformed JSON")));
        let e = parse_request(b"{\"type\":\"\xff\"}").err();
        assert!(e.is_some_and(|e| e.message.starts_with("malformed JSON")));
    }
}
