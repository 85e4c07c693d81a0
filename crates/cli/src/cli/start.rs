//! `bld-remote start`: the supervisor. Launches Blender (its own process group) with the service
//! bootstrapped, relays Blender's stdout, holds the service's ready line back until the port accepts
//! connections, and turns a stop signal into a graceful stop: `server_shutdown` (headless) or
//! `quit_blender` (GUI) through the service, else SIGTERM; a second signal or 30 s more kill it. Exits with
//! Blender's status.
//!
//! With `--instances N` (headless only) it supervises a local pool: N Blenders, each on its own free port
//! with its own descriptor (and, with `--token auto`, its own token), one ready line each
//! (`bld_remote listening on HOST:PORT (pid P) instance=K/N restarts=R`). An instance that dies is
//! restarted on the same port (up to `--max-restarts` times), announced by a new ready line, so a client
//! that owns the pool only has to reconnect; its stale descriptor is removed. A stop signal stops them all
//! (rc 0 when every one exits cleanly) and leaves no process and no descriptor behind.
//!
//! Runs on the main thread (supervise; every Blender is spawned from it, see
//! `blender::stop_with_spawner`) plus one `bld-remote-relay` thread per Blender (its stdout), each joined.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bld_remote_core::config::{port_from, positive_seconds, ProcessEnv, DEFAULT_PORT};
use serde_json::{json, Map};

use super::args::StartArgs;
use super::{errln, find_blender, out, outln, package_dir, Host, EXIT_FAILURE, EXIT_USAGE};
use crate::blender;
use crate::client::{Client, ClientError};
use crate::instances;

mod pool;

const READY_PREFIX: &str = "bld_remote listening on ";

/// `bld_remote listening on HOST:PORT (pid N)` → (host, port, pid).
pub fn parse_ready(line: &str) -> Option<(String, u16, u32)> {
    let rest = &line[line.find(READY_PREFIX)? + READY_PREFIX.len()..];
    let (addr, tail) = rest.split_once(" (pid ")?;
    // Fields may follow the closing parenthesis (`instance=K/N restarts=R` from a pool supervisor).
    let pid: u32 = tail.split_once(')')?.0.parse().ok()?;
    let (h, p) = addr.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Some((h.to_string(), p.parse().ok()?, pid))
}

enum Relay {
    Ready { host: String, port: u16, pid: u32 },
}

/// Copy Blender's stdout to ours. The service's own ready line is held back until its port really accepts a
/// connection, then printed once: after it, a client can connect.
/// Which pool instance a relay serves: (K, N, restarts so far). Its lines are prefixed `[K] `, and the
/// service's ready line is replaced by the pool's.
type SlotTag = (usize, usize, u32);

fn relay(stdout: impl Read, ready: mpsc::Sender<(usize, Relay)>, slot: Option<SlotTag>) {
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
                match slot {
                    Some((k, n, restarts)) => outln(&format!(
                        "{READY_PREFIX}{} (pid {pid}) instance={k}/{n} restarts={restarts}",
                        addr_text(&h, p)
                    )),
                    None => out(&line),
                }
                let _ = ready.send((
                    slot.map_or(0, |s| s.0 - 1),
                    Relay::Ready {
                        host: h,
                        port: p,
                        pid,
                    },
                ));
                continue;
            }
        }
        match slot {
            Some((k, ..)) => {
                let mut tagged = format!("[{k}] ").into_bytes();
                tagged.extend_from_slice(&line);
                out(&tagged);
            }
            None => out(&line),
        }
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
    // Note who started us now, before anything can go wrong with them.
    let _ = parent_gone(&a);
    // `--port`, else BLD_REMOTE_MCP_PORT (read as every bld_remote reads it), else the default. A bad value
    // in the environment is a usage error, as a bad `--port` is.
    if a.instances.is_some() {
        if !a.background {
            errln("--instances starts headless Blenders: add --background");
            return EXIT_USAGE;
        }
        if a.port.is_some_and(|p| p != 0) {
            errln("--instances gives each instance a free port of its own: leave --port out");
            return EXIT_USAGE;
        }
    }
    let port = match a.port {
        _ if a.instances.is_some() => 0,
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
    {
        use bld_remote_core::config::{check_tokens, env, Source};
        let token = a.token.clone().or_else(|| ProcessEnv.get(env::TOKEN));
        let read = a
            .read_token
            .clone()
            .or_else(|| ProcessEnv.get(env::READ_TOKEN));
        if let Err(e) = check_tokens(token.as_deref(), read.as_deref()) {
            errln(&format!("{e} (--read-token, --token)"));
            return EXIT_USAGE;
        }
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

    if let Some(n) = a.instances {
        return pool::start_pool(&a, usize::from(n), &found.path, &package_dir, host);
    }
    let mut cmd = blender_command(&a, &found.path, &package_dir, port);
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
            .spawn(move || relay(stdout, tx, None))
            .ok()
    });
    let rc = supervise(&mut child, &rx, &a, host);
    if let Some(t) = relay_thread {
        let _ = t.join();
    }
    rc
}

/// `--token`, unless it is `auto` (which asks each Blender to generate its own: read from its descriptor).
fn explicit_token(a: &StartArgs) -> Option<String> {
    a.token
        .clone()
        .filter(|t| !t.trim().eq_ignore_ascii_case("auto"))
}

fn addr_text(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `--stop-with-parent`: the process that started us is gone (we were re-parented).
fn parent_gone(a: &StartArgs) -> bool {
    #[cfg(unix)]
    {
        use std::sync::OnceLock;
        static FIRST: OnceLock<u32> = OnceLock::new();
        if !a.stop_with_parent {
            return false;
        }
        let now = std::os::unix::process::parent_id();
        *FIRST.get_or_init(|| now) != now
    }
    #[cfg(not(unix))]
    {
        let _ = a;
        false
    }
}

/// The Blender command line for one service on `port`: headless or not, the scene, the bootstrap, the
/// token, extra arguments; its own process group, stdout piped to the relay.
fn blender_command(a: &StartArgs, blender_path: &Path, package_dir: &Path, port: u16) -> Command {
    let (before, after) = match a.blender_args.iter().position(|s| s == "--") {
        Some(i) => (&a.blender_args[..i], Some(&a.blender_args[i + 1..])),
        None => (&a.blender_args[..], None),
    };
    let mut cmd = blender::command(blender_path);
    if a.background {
        cmd.arg("--background");
    }
    cmd.args(before);
    if let Some(scene) = &a.scene {
        cmd.arg(scene);
    }
    cmd.arg("--python-expr")
        .arg(blender::bootstrap_expr(package_dir, &a.host, port));
    if let Some(after) = after {
        cmd.arg("--").args(after);
    }
    if let Some(token) = &a.token {
        // Read by the service as every bld_remote reads it; `auto`: a fresh token per Blender.
        cmd.env(bld_remote_core::config::env::TOKEN, token);
    }
    if let Some(read_token) = &a.read_token {
        cmd.env(bld_remote_core::config::env::READ_TOKEN, read_token);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    #[cfg(unix)]
    {
        // Its own process group: a terminal's Ctrl+C reaches only us, and we shut Blender down in order.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    blender::stop_with_spawner(&mut cmd);
    cmd
}

/// Wait for Blender, forwarding a stop request; returns the exit status for `start`.
fn supervise(
    child: &mut Child,
    rx: &mpsc::Receiver<(usize, Relay)>,
    a: &StartArgs,
    host: &Host<'_>,
) -> i32 {
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
        if let Ok((_, Relay::Ready { host, port, pid })) =
            rx.recv_timeout(Duration::from_millis(100))
        {
            ready = Some((host, port, pid));
        }
        if (host.interrupted)() || parent_gone(a) {
            if stopping.is_some() {
                // A second signal: no more patience.
                errln("second interrupt: killing Blender");
                let _ = child.kill();
            } else {
                stopping = Some(Instant::now() + Duration::from_secs(30));
                let _ = request_stop(child.id(), ready.as_ref(), a, host);
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
/// Returns false when it fell back to SIGTERM (a Blender that is not serving yet then dies of it: rc 143).
fn request_stop(
    pid: u32,
    ready: Option<&(String, u16, u32)>,
    a: &StartArgs,
    host: &Host<'_>,
) -> bool {
    let background = a.background;
    if let Some((h, p, _)) = ready {
        let token = instances::resolve_token(explicit_token(a), h, *p);
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
            // Lost: the quit began and Blender closed the connection before its reply got out. The outcome
            // is unknown, so no second stop is sent; the supervisor's deadline still kills a Blender that
            // did not quit.
            match c.call("execute_code", params) {
                Ok(_) | Err(ClientError::Lost { .. }) => true,
                Err(_) => false,
            }
        };
        if asked {
            return true;
        }
    }
    let _ = (host.terminate)(pid);
    false
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
