//! `bld-remote job submit|status|result|cancel|list`: jobs that outlive the connection (the service's job
//! store, `submit_code_job` and friends). Runs on the main thread; waits poll [`Host::interrupted`].

use std::io::Read;
use std::time::Instant;

use serde_json::{Map, Value};

use super::args::{JobArgs, JobCmd};
use super::queries::{client_error_status, client_or_report};
use super::{err, errln, out, outln, Host, EXIT_FAILURE, EXIT_TIMEOUT, EXIT_USAGE};
use bld_remote_core::config::{non_negative_seconds, positive_seconds};

use crate::client::{exec_output, wait_for_job, Client};

/// The code of `exec` and `job submit`: `-c CODE`, a FILE, or `-` for standard input.
pub(super) fn read_code(
    code: Option<String>,
    file: Option<std::path::PathBuf>,
) -> Result<String, i32> {
    match (code, file) {
        (Some(c), _) => Ok(c),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| {
                errln(&format!("cannot read code from standard input: {e}"));
                EXIT_FAILURE
            })?;
            Ok(s)
        }
        (None, Some(f)) => std::fs::read_to_string(&f).map_err(|e| {
            errln(&format!("cannot read {}: {e}", f.display()));
            EXIT_FAILURE
        }),
        (None, None) => {
            errln("give code with -c CODE, a FILE, or - for standard input");
            Err(EXIT_USAGE)
        }
    }
}

fn ask(
    client: &mut Client,
    command: &str,
    params: Map<String, Value>,
    host: &Host<'_>,
) -> Result<Value, i32> {
    match client.call_with(command, params, host.interrupted) {
        Ok(v) if v.get("found") == Some(&Value::Bool(false)) => {
            errln(
                v.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown job id"),
            );
            Err(EXIT_FAILURE)
        }
        Ok(v) => Ok(v),
        Err(e) => {
            errln(&e.to_string());
            Err(client_error_status(&e))
        }
    }
}

fn with_id(id: &str) -> Map<String, Value> {
    let mut p = Map::new();
    p.insert("job_id".into(), Value::from(id));
    p
}

pub(super) fn job(a: JobArgs, host: &Host<'_>) -> i32 {
    match run(a, host) {
        Ok(rc) | Err(rc) => rc,
    }
}

fn run(a: JobArgs, host: &Host<'_>) -> Result<i32, i32> {
    match a.command {
        JobCmd::Submit {
            code,
            file,
            job_timeout,
            json,
            target,
        } => {
            let timeout = job_timeout
                .map(|t| positive_seconds("--job-timeout", t))
                .transpose()
                .map_err(|e| {
                    errln(&e.0);
                    EXIT_USAGE
                })?;
            let code = read_code(code, file)?;
            let mut client = client_or_report(&target)?;
            let mut p = Map::new();
            p.insert("code".into(), Value::String(code));
            if let Some(t) = timeout {
                p.insert("job_timeout_seconds".into(), Value::from(t.as_secs_f64()));
            }
            let v = ask(&mut client, "submit_code_job", p, host)?;
            if json {
                outln(&v.to_string());
            } else {
                outln(v.get("job_id").and_then(Value::as_str).unwrap_or(""));
            }
            Ok(0)
        }
        JobCmd::Status { id, target } => {
            let mut client = client_or_report(&target)?;
            let v = ask(&mut client, "get_job_status", with_id(&id), host)?;
            outln(&v.to_string());
            Ok(0)
        }
        JobCmd::Cancel { id, reason, target } => {
            let mut client = client_or_report(&target)?;
            let mut p = with_id(&id);
            if let Some(r) = reason {
                p.insert("reason".into(), Value::from(r));
            }
            let v = ask(&mut client, "cancel_job", p, host)?;
            outln(&v.to_string());
            Ok(0)
        }
        JobCmd::List { target } => {
            let mut client = client_or_report(&target)?;
            let v = ask(&mut client, "list_jobs", Map::new(), host)?;
            outln(&v.to_string());
            Ok(0)
        }
        JobCmd::Result {
            id,
            wait,
            json,
            target,
        } => {
            let wait = wait
                .map(|w| non_negative_seconds("--wait", w))
                .transpose()
                .map_err(|e| {
                    errln(&e.0);
                    EXIT_USAGE
                })?;
            let deadline = wait.and_then(|w| Instant::now().checked_add(w));
            let mut client = client_or_report(&target)?;
            let (v, terminal) = wait_for_job(deadline, |mut p| {
                p.insert("job_id".into(), Value::from(id.as_str()));
                ask(&mut client, "get_job_result", p, host)
            })?;
            Ok(report(&v, json, terminal))
        }
    }
}

/// Print a result; the exit status says how the job ended.
fn report(v: &Value, json: bool, terminal: bool) -> i32 {
    let status = v.get("status").and_then(Value::as_str).unwrap_or("");
    if json {
        outln(&v.to_string());
    } else if status == "completed" && v.get("error").is_some_and(Value::is_null) {
        let r = exec_output(v.get("result").cloned().unwrap_or(Value::Null));
        out(r.stdout.as_bytes());
        err(r.stderr.as_bytes());
    } else if terminal {
        if let Some(o) = v.get("output") {
            out(o
                .get("stdout")
                .and_then(Value::as_str)
                .unwrap_or("")
                .as_bytes());
            err(o
                .get("stderr")
                .and_then(Value::as_str)
                .unwrap_or("")
                .as_bytes());
        }
        let tb = v.get("traceback").and_then(Value::as_str).unwrap_or("");
        if tb.is_empty() {
            let e = v.get("error").and_then(Value::as_str).unwrap_or(status);
            errln(&format!("job {status}: {e}"));
        } else {
            err(tb.as_bytes());
        }
    } else {
        errln(&format!(
            "job {} is still {status}; it goes on (ask again with `bld-remote job result`)",
            v.get("job_id").and_then(Value::as_str).unwrap_or("?")
        ));
    }
    match (terminal, status) {
        (false, _) => EXIT_TIMEOUT,
        (true, "completed") if v.get("error").is_some_and(Value::is_null) => 0,
        _ => EXIT_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exit_status_follows_how_the_job_ended() {
        let done = json!({"status": "completed", "terminal": true, "error": null,
                          "result": {"output": {"stdout": "", "stderr": ""}}});
        assert_eq!(report(&done, true, true), 0);
        let failed = json!({"status": "failed", "terminal": true, "error": "boom"});
        assert_eq!(report(&failed, true, true), EXIT_FAILURE);
        let running = json!({"status": "running", "terminal": false});
        assert_eq!(report(&running, true, false), EXIT_TIMEOUT);
    }
}
