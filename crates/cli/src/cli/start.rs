//! `bld-remote start`: the supervisor. Launches Blender (its own process group) with the service
//! bootstrapped, relays Blender's stdout, holds the service's ready line back until the port accepts
//! connections, and turns a stop signal into a graceful stop: `server_shutdown` (headless) or
//! `quit_blender` (GUI) through the service, else SIGTERM; a second signal or 30 s more kill it. Exits with
//! Blender's status. Runs on the main thread (supervise) plus one `bld-remote-relay` thread (stdout),
//! joined before returning.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bld_remote_core::config::{port_from, positive_seconds, ProcessEnv, DEFAULT_PORT};
use serde_json::{json, Map};

use super::args::StartArgs;
use super::{errln, find_blender, out, package_dir, Host, EXIT_FAILURE, EXIT_USAGE};
use crate::blender;
use crate::client::{Client, ClientError};
use crate::instances;

const READY_PREFIX: &str = "bld_remote listening on ";

/// `bld_remote listening on HOST:PORT (pid N)` → (host, port, pid).
pub fn parse_ready(line: &str) -> Option<(String, u16, u32)> {
    let rest = &line[line.find(READY_PREFIX)? + READY_PREFIX.len()..];
    let (addr, tail) = rest.split_once(" (pid ")?;
    let pid: u32 = tail.trim_end().strip_suffix(')')?.parse().ok()?;
    let (h, p) = addr.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Some((h.to_string(), p.parse().ok()?, pid))
}

enum Relay {
    Ready { host: String, port: u16, pid: u32 },
}

/// Copy Blender's stdout to ours. The service's own ready line is held back until its port really accepts a
/// connection, then printed once: after it, a client can connect.
fn relay(stdout: impl Read, ready: mpsc::Sender<Relay>) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut announced = false;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !announced {
            if let Some((h, p, pid)) = parse_ready(&String::from_utf8_lossy(&line)) {
                announced = true;
                let mut probe = Client::new(h.clone(), p, Some(Duration::from_secs(5)), None);
                let deadline = Instant::now() + Duration::from_secs(10);
                while probe
                    .ping()
                    .is_err_and(|e| !matches!(e, ClientError::Remote { .. }))
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                out(&line);
                let _ = ready.send(Relay::Ready {
                    host: h,
                    port: p,
                    pid,
                });
                continue;
            }
        }
        out(&line);
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    if let Some(c) = status.code() {
        return c;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return 128 + sig;
        }
    }
    EXIT_FAILURE
}

fn port_busy(host: &str, port: u16) -> Option<String> {
    if port == 0 {
        return None;
    }
    match TcpListener::bind((host, port)) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(format!(
            "port {port} on {host} is already in use (another bld_remote? `bld-remote ls` lists them). \
             Choose another with --port N, or --port 0 for a free one"
        )),
        // Other bind errors (e.g. a host name that is not local) are for the service to report.
        _ => None,
    }
}

pub(super) fn start(a: StartArgs, host: &Host<'_>) -> i32 {
    // `--port`, else BLD_REMOTE_MCP_PORT (read as every bld_remote reads it), else the default. A bad value
    // in the environment is a usage error, as a bad `--port` is.
    let port = match a.port {
        Some(p) => p,
        None => match port_from(&ProcessEnv) {
            Ok(p) => p.unwrap_or(DEFAULT_PORT),
            Err(e) => {
                errln(&e.to_string());
                return EXIT_USAGE;
            }
        },
    };
    if let Err(e) = positive_seconds("--ready-timeout", a.ready_timeout) {
        errln(&e.0);
        return EXIT_USAGE;
    }
    let found = match find_blender(a.blender.as_deref()) {
        Ok(f) => f,
        Err(rc) => return rc,
    };
    let package_dir = match package_dir(host) {
        Ok(d) => d,
        Err(rc) => return rc,
    };
    if let Some(scene) = &a.scene {
        if !scene.is_file() {
            errln(&format!("--scene {}: no such file", scene.display()));
            return EXIT_FAILURE;
        }
    }
    if let Some(m) = port_busy(&a.host, port) {
        errln(&m);
        return EXIT_FAILURE;
    }

    let (before, after) = match a.blender_args.iter().position(|s| s == "--") {
        Some(i) => (&a.blender_args[..i], Some(&a.blender_args[i + 1..])),
        None => (&a.blender_args[..], None),
    };
    let mut cmd = blender::command(&found.path);
    if a.background {
        cmd.arg("--background");
    }
    cmd.args(before);
    if let Some(scene) = &a.scene {
        cmd.arg(scene);
    }
    cmd.arg("--python-expr")
        .arg(blender::bootstrap_expr(&package_dir, &a.host, port));
    if let Some(after) = after {
        cmd.arg("--").args(after);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    #[cfg(unix)]
    {
        // Its own process group: a terminal's Ctrl+C reaches only us, and we shut Blender down in order.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            errln(&format!("cannot start {}: {e}", found.path.display()));
            return EXIT_FAILURE;
        }
    };
    let (tx, rx) = mpsc::channel();
    let relay_thread = child.stdout.take().and_then(|stdout| {
        std::thread::Builder::new()
            .name("bld-remote-relay".into())
            .spawn(move || relay(stdout, tx))
            .ok()
    });
    let rc = supervise(&mut child, &rx, &a, host);
    if let Some(t) = relay_thread {
        let _ = t.join();
    }
    rc
}

/// Wait for Blender, forwarding a stop request; returns the exit status for `start`.
fn supervise(child: &mut Child, rx: &mpsc::Receiver<Relay>, a: &StartArgs, host: &Host<'_>) -> i32 {
    let started = Instant::now();
    // Checked in `start` (a usage error there); the fallback is never reached.
    let ready_timeout =
        positive_seconds("--ready-timeout", a.ready_timeout).unwrap_or(Duration::from_secs(120));
    let mut ready: Option<(String, u16, u32)> = None;
    // When a stop was asked for: the time after which Blender is killed outright.
    let mut stopping: Option<Instant> = None;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let rc = exit_code(status);
                if ready.is_none() && stopping.is_none() {
                    errln(&format!(
                        "Blender exited (status {rc}) before the service was ready; its messages are above"
                    ));
                    return if rc == 0 { EXIT_FAILURE } else { rc };
                }
                return rc;
            }
            Ok(None) => {}
            Err(e) => {
                errln(&format!("cannot wait for Blender: {e}"));
                let _ = child.kill();
                let _ = child.wait();
                return EXIT_FAILURE;
            }
        }
        if let Ok(Relay::Ready { host, port, pid }) = rx.recv_timeout(Duration::from_millis(100)) {
            ready = Some((host, port, pid));
        }
        if (host.interrupted)() {
            if stopping.is_some() {
                // A second signal: no more patience.
                errln("second interrupt: killing Blender");
                let _ = child.kill();
            } else {
                stopping = Some(Instant::now() + Duration::from_secs(30));
                request_stop(child.id(), ready.as_ref(), a.background, host);
            }
        }
        if ready.is_none() && stopping.is_none() && started.elapsed() > ready_timeout {
            errln(&format!(
                "the service did not become ready within {:.0} s; stopping Blender",
                a.ready_timeout
            ));
            let _ = child.kill();
            let _ = child.wait();
            return EXIT_FAILURE;
        }
        if stopping.is_some_and(|t| Instant::now() > t) {
            errln("Blender did not exit within 30 s of the stop request: killing it");
            let _ = child.kill();
            stopping = Some(Instant::now() + Duration::from_secs(3600));
        }
    }
}

/// Ask Blender to shut down gracefully: through the service when it is up (in-flight requests are answered
/// first), else with SIGTERM.
fn request_stop(pid: u32, ready: Option<&(String, u16, u32)>, background: bool, host: &Host<'_>) {
    if let Some((h, p, _)) = ready {
        let token = instances::resolve_token(None, h, *p);
        let mut c = Client::new(h.clone(), *p, Some(Duration::from_secs(10)), token);
        let asked = if background {
            c.call("server_shutdown", Map::new()).is_ok()
        } else {
            // The GUI stays open when only the service stops: ask Blender itself to quit.
            let mut params = Map::new();
            params.insert(
                "code".into(),
                json!("import bpy\nbpy.ops.wm.quit_blender()"),
            );
            c.call("execute_code", params).is_ok()
        };
        if asked {
            return;
        }
    }
    let _ = (host.terminate)(pid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        assert_eq!(
            parse_ready("bld_remote listening on 127.0.0.1:6688 (pid 42)\n"),
            Some(("127.0.0.1".into(), 6688, 42))
        );
        assert_eq!(
            parse_ready("bld_remote listening on [::1]:7 (pid 1)"),
            Some(("::1".into(), 7, 1))
        );
        assert_eq!(parse_ready("Blender 3.4.1"), None);
    }
}
