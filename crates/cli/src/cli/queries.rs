//! `bld-remote exec`, `status`, `shutdown` and `ls`: one-shot questions to a running service, over
//! bld-remote-core's blocking [`Client`] and its instance descriptors. Runs on the main thread; every wait
//! polls [`Host::interrupted`] so a Ctrl+C ends it with status 130. With a token, the client proves the
//! service first (bld-remote-core's handshake) and never sends the token: an unverified service is status 5.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::args::{ExecArgs, LsArgs, ShutdownArgs, StatusArgs, Target};
use super::{
    err, errln, out, outln, Host, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_UNREACHABLE,
    EXIT_USAGE,
};
use bld_remote_core::config::{non_negative_seconds, positive_seconds};

use crate::client::{exec_output, exec_params, Client, ClientError};
use crate::instances;

/// Exit status when the service could not prove that it holds the token (a port squatter, a wrong token,
/// a service older than the handshake): nothing was sent to it.
pub(super) const EXIT_UNVERIFIED: i32 = 5;

// --- finding the service --------------------------------------------------------------------------------

fn client_for(t: &Target) -> Result<Client, (i32, String)> {
    let timeout = match t.timeout {
        None => None,
        Some(s) => Some(positive_seconds("--timeout", s).map_err(|e| (EXIT_USAGE, e.0))?),
    };
    let (h, p) = instances::pick(t.host.as_deref(), t.port).map_err(|e| (EXIT_UNREACHABLE, e))?;
    let token = instances::resolve_token(t.token.clone(), &h, p);
    Ok(Client::new(h, p, timeout, token))
}

/// [`client_for`], printing why there is no client; `Err` is the exit status.
pub(super) fn client_or_report(t: &Target) -> Result<Client, i32> {
    client_for(t).map_err(|(rc, m)| {
        errln(&m);
        rc
    })
}

pub(super) fn client_error_status(e: &ClientError) -> i32 {
    match e {
        ClientError::Connect { .. } | ClientError::Lost { .. } | ClientError::Protocol { .. } => {
            EXIT_UNREACHABLE
        }
        ClientError::Timeout { .. } => EXIT_TIMEOUT,
        ClientError::Remote { .. } => EXIT_FAILURE,
        ClientError::Unverified { .. } => EXIT_UNVERIFIED,
        ClientError::Interrupted => EXIT_INTERRUPTED,
    }
}

pub(super) fn exec(a: ExecArgs, host: &Host<'_>) -> i32 {
    let code = match super::job::read_code(a.code.clone(), a.file.clone()) {
        Ok(c) => c,
        Err(rc) => return rc,
    };
    let mut client = match client_or_report(&a.target) {
        Ok(c) => c,
        Err(rc) => return rc,
    };
    // `exec` prints output and the result, not what changed: Blender need not diff the scene.
    match client.call_with("execute_code", exec_params(&code, false), host.interrupted) {
        Ok(r) => {
            let r = exec_output(r);
            if a.json {
                let v = json!({"stdout": r.stdout, "stderr": r.stderr, "result": r.result,
                               "duration": r.duration});
                outln(&v.to_string());
            } else {
                out(r.stdout.as_bytes());
                err(r.stderr.as_bytes());
            }
            0
        }
        Err(ClientError::Remote {
            message,
            traceback,
            reply,
            ..
        }) => {
            let output = reply.get("output");
            let text = |k: &str| {
                output
                    .and_then(|o| o.get(k))
                    .and_then(Value::as_str)
                    .unwrap_or("")
            };
            if a.json {
                let v = json!({"stdout": text("stdout"), "stderr": text("stderr"), "error": message,
                               "exception": reply.get("exception"), "traceback": traceback});
                outln(&v.to_string());
            } else {
                out(text("stdout").as_bytes());
                err(text("stderr").as_bytes());
                match traceback {
                    Some(tb) if !tb.is_empty() => {
                        err(tb.as_bytes());
                        if !tb.ends_with('\n') {
                            err(b"\n");
                        }
                    }
                    _ => errln(&message),
                }
            }
            EXIT_FAILURE
        }
        Err(e) => {
            errln(&e.to_string());
            client_error_status(&e)
        }
    }
}

pub(super) fn status(a: &StatusArgs, host: &Host<'_>) -> i32 {
    let mut client = match client_or_report(&a.target) {
        Ok(c) => c,
        Err(rc) => return rc,
    };
    match client.call_with("get_status", Map::new(), host.interrupted) {
        Ok(v) => {
            if a.json {
                outln(&v.to_string());
            } else if let Value::Object(m) = &v {
                let mut text = String::new();
                for (k, val) in m {
                    let shown = match val {
                        Value::String(s) => s.clone(),
                        Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    let _ = writeln!(text, "{k:<18} {shown}");
                }
                out(text.as_bytes());
            } else {
                outln(&v.to_string());
            }
            0
        }
        Err(e) => {
            errln(&e.to_string());
            client_error_status(&e)
        }
    }
}

pub(super) fn shutdown(a: &ShutdownArgs, host: &Host<'_>) -> i32 {
    let wait = match non_negative_seconds("--wait", a.wait) {
        Ok(w) => w,
        Err(e) => {
            errln(&e.0);
            return EXIT_USAGE;
        }
    };
    let mut client = match client_or_report(&a.target) {
        Ok(c) => c,
        Err(rc) => return rc,
    };
    let pid = client
        .call_with("get_status", Map::new(), host.interrupted)
        .ok()
        .and_then(|s| s.get("pid").and_then(Value::as_u64));
    if let Err(e) = client.call_with("server_shutdown", Map::new(), host.interrupted) {
        errln(&e.to_string());
        return client_error_status(&e);
    }
    client.close();
    let addr = client.addr_text();
    let who = pid.map_or_else(String::new, |p| format!(" (pid {p})"));
    if !wait.is_zero() {
        let deadline = Instant::now() + wait;
        loop {
            let mut probe = Client::new(
                client.host(),
                client.port(),
                Some(Duration::from_millis(500)),
                None,
            );
            match probe.ping() {
                Err(ClientError::Connect { .. } | ClientError::Lost { .. }) => break,
                _ if Instant::now() >= deadline => {
                    errln(&format!(
                        "asked {addr}{who} to shut down, but it still answers after {:.0} s",
                        a.wait
                    ));
                    return EXIT_TIMEOUT;
                }
                _ if (host.interrupted)() => return EXIT_INTERRUPTED,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    outln(&format!("bld_remote on {addr}{who} shut down"));
    0
}

pub(super) fn ls(a: &LsArgs) -> i32 {
    let (alive, stale) = instances::live(true);
    for (path, why) in &stale {
        err(format!(
            "bld-remote: removed stale descriptor {} ({why})\n",
            path.display()
        )
        .as_bytes());
    }
    if a.json {
        let shown: Vec<instances::Descriptor> = alive
            .iter()
            .cloned()
            .map(|mut d| {
                d.token = None;
                d
            })
            .collect();
        outln(&serde_json::to_string(&shown).unwrap_or_else(|_| "[]".into()));
        return 0;
    }
    if alive.is_empty() {
        outln("no running bld_remote instances");
        return 0;
    }
    let mut text = format!(
        "{:<8} {:<22} {:<11} {:<10} {:<21} {}\n",
        "PID", "ADDRESS", "MODE", "BLENDER", "STARTED", "FILE"
    );
    for d in &alive {
        let _ = writeln!(
            text,
            "{:<8} {:<22} {:<11} {:<10} {:<21} {}",
            d.pid,
            d.addr_text(),
            d.mode,
            d.blender_version.as_deref().unwrap_or("-"),
            d.started,
            d.blend_file.as_deref().unwrap_or("-"),
        );
    }
    out(text.as_bytes());
    0
}
