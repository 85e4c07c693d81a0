//! `bld-remote`: the command line. Parsed with clap; every subcommand is plain Rust over [`crate::client`],
//! [`crate::instances`] and [`crate::blender`]. [`Host`] is all it needs from the process it runs in
//! (src/main.rs): where the installed Python package is, whether a signal arrived, and how to send SIGTERM.
//!
//! Exit status: 0 success; 1 failure (the remote code raised, Blender not found, port busy, start failed);
//! 2 usage error; 3 no service reachable (refused, lost, no instance, several instances); 4 timeout;
//! 130 interrupted. `start` exits with Blender's own status once Blender ran.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};

use crate::blender;
use crate::client::{exec_output, Client, ClientError};
use crate::instances;

pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_UNREACHABLE: i32 = 3;
pub const EXIT_TIMEOUT: i32 = 4;
pub const EXIT_INTERRUPTED: i32 = 130;

/// The default service port (blender-remote's).
pub use bld_remote_core::config::DEFAULT_PORT;

/// What the CLI needs from the process it runs in.
pub struct Host<'a> {
    /// Finds the installed `bld_remote` package folder (holds `__init__.py` and the native module);
    /// asked only by the commands that load it into Blender.
    pub package_dir: &'a (dyn Fn() -> Result<PathBuf, String> + Sync),
    /// True once SIGINT/SIGTERM/SIGHUP arrived (polled at least every 100 ms while waiting).
    pub interrupted: &'a (dyn Fn() -> bool + Sync),
    /// Send SIGTERM (Windows: terminate) to a process; false when that failed.
    pub terminate: &'a (dyn Fn(u32) -> bool + Sync),
}

#[derive(Parser, Debug)]
#[command(
    name = "bld-remote",
    bin_name = "bld-remote",
    version,
    about = "Start Blender serving bld_remote, run code in it, find running instances.",
    after_help = "Exit status: 0 ok, 1 failure, 2 usage, 3 no service reachable, 4 timeout, 130 interrupted; \
                  `start` exits with Blender's status.\nDocs: docs/CLI.md"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start Blender with the service running (headless with --background) and print the ready line.
    Start(StartArgs),
    /// Install the add-on into Blender's user add-ons, enable it and save the preferences.
    Install(InstallArgs),
    /// Disable the add-on, save the preferences and remove it from Blender's user add-ons.
    Uninstall(InstallArgs),
    /// Run Python in the running Blender; print its stdout and stderr.
    Exec(ExecArgs),
    /// Show the service's status.
    Status(StatusArgs),
    /// Stop the service (a headless Blender then exits).
    Shutdown(ShutdownArgs),
    /// List running instances (and delete descriptors of dead ones).
    Ls(LsArgs),
    /// Serve MCP (stdio by default, or Streamable HTTP with --http) for LLM clients, talking to Blender.
    Mcp(crate::mcp::McpArgs),
}

#[derive(Args, Debug)]
struct StartArgs {
    /// Run Blender headless (`blender --background`); the main thread serves until the service stops.
    #[arg(short = 'b', long)]
    background: bool,
    /// Port to listen on (0: a free one, named in the ready line). Default: `$BLD_REMOTE_MCP_PORT`, else 6688.
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on. Anything but loopback needs a token (`$BLD_REMOTE_TOKEN`).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The Blender executable (or a folder holding it). Default: $BLENDER, PATH, usual install locations.
    #[arg(long, value_name = "PATH")]
    blender: Option<PathBuf>,
    /// A .blend file to open.
    #[arg(long, value_name = "FILE.blend")]
    scene: Option<PathBuf>,
    /// Seconds to wait for the service to accept connections.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    ready_timeout: f64,
    /// Extra arguments for Blender, after `--`. A further `--` passes the rest to Python's sys.argv.
    #[arg(last = true, value_name = "BLENDER ARGS")]
    blender_args: Vec<String>,
}

#[derive(Args, Debug)]
struct InstallArgs {
    /// The Blender executable (or a folder holding it). Default: $BLENDER, PATH, usual install locations.
    #[arg(long, value_name = "PATH")]
    blender: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct Target {
    /// The service's port. Default: the only running instance (see `bld-remote ls`).
    #[arg(long)]
    port: Option<u16>,
    /// The service's address.
    #[arg(long)]
    host: Option<String>,
    /// Auth token, for services that require one. Default: `$BLD_REMOTE_TOKEN`.
    #[arg(long)]
    token: Option<String>,
    /// Give up waiting for the reply after this many seconds (default: wait as long as it takes).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["code", "file"])))]
struct ExecArgs {
    /// The code to run.
    #[arg(short = 'c', value_name = "CODE")]
    code: Option<String>,
    /// A Python file to run (`-`: read standard input).
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// Print the whole result as one JSON object (stdout, stderr, result, duration) instead.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
struct ShutdownArgs {
    /// Seconds to wait for the port to close (0: do not wait).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    wait: f64,
    #[command(flatten)]
    target: Target,
}

#[derive(Args, Debug)]
struct LsArgs {
    /// Print the live instances' descriptors as a JSON list.
    #[arg(long)]
    json: bool,
}

// --- output (never panics: a closed pipe must not become a PanicException) -------------------------------

fn out(bytes: &[u8]) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(bytes);
    let _ = o.flush();
}

fn outln(s: &str) {
    let mut line = String::with_capacity(s.len() + 1);
    line.push_str(s);
    line.push('\n');
    out(line.as_bytes());
}

fn err(bytes: &[u8]) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(bytes);
    let _ = e.flush();
}

fn errln(s: &str) {
    err(format!("bld-remote: {s}\n").as_bytes());
}

/// Parse and run. Returns the exit status.
pub fn run(argv: Vec<String>, host: &Host<'_>) -> i32 {
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            use std::io::IsTerminal;
            let tty = if e.use_stderr() {
                std::io::stderr().is_terminal()
            } else {
                std::io::stdout().is_terminal()
            };
            let styled = e.render();
            let rendered = if tty {
                styled.ansi().to_string()
            } else {
                styled.to_string()
            };
            if e.use_stderr() {
                err(rendered.as_bytes());
            } else {
                out(rendered.as_bytes());
            }
            return if e.use_stderr() { EXIT_USAGE } else { 0 };
        }
    };
    match cli.command {
        Cmd::Start(a) => start(a, host),
        Cmd::Install(a) => install(&a, host),
        Cmd::Uninstall(a) => uninstall(&a),
        Cmd::Exec(a) => exec(a, host),
        Cmd::Status(a) => status(&a, host),
        Cmd::Shutdown(a) => shutdown(&a, host),
        Cmd::Ls(a) => ls(&a),
        Cmd::Mcp(a) => crate::mcp::run(a, host.interrupted),
    }
}

// --- finding the service --------------------------------------------------------------------------------

fn client_for(t: &Target) -> Result<Client, (i32, String)> {
    let timeout = match t.timeout {
        None => None,
        Some(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
        Some(_) => {
            return Err((
                EXIT_USAGE,
                "--timeout must be a positive number of seconds".into(),
            ))
        }
    };
    let (h, p) = instances::pick(t.host.as_deref(), t.port).map_err(|e| (EXIT_UNREACHABLE, e))?;
    let token = instances::resolve_token(t.token.clone(), &h, p);
    Ok(Client::new(h, p, timeout, token))
}

/// [`client_for`], printing why there is no client; `Err` is the exit status.
fn client_or_report(t: &Target) -> Result<Client, i32> {
    client_for(t).map_err(|(rc, m)| {
        errln(&m);
        rc
    })
}

fn client_error_status(e: &ClientError) -> i32 {
    match e {
        ClientError::Connect { .. } | ClientError::Lost { .. } | ClientError::Protocol { .. } => {
            EXIT_UNREACHABLE
        }
        ClientError::Timeout { .. } => EXIT_TIMEOUT,
        ClientError::Remote { .. } => EXIT_FAILURE,
        ClientError::Interrupted => EXIT_INTERRUPTED,
    }
}

// --- exec / status / shutdown / ls ----------------------------------------------------------------------

fn exec(a: ExecArgs, host: &Host<'_>) -> i32 {
    let code = match (&a.code, &a.file) {
        (Some(c), _) => c.clone(),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut s = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                errln(&format!("cannot read code from standard input: {e}"));
                return EXIT_FAILURE;
            }
            s
        }
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(s) => s,
            Err(e) => {
                errln(&format!("cannot read {}: {e}", f.display()));
                return EXIT_FAILURE;
            }
        },
        (None, None) => {
            errln("give code with -c CODE, a FILE, or - for standard input");
            return EXIT_USAGE;
        }
    };
    let mut client = match client_or_report(&a.target) {
        Ok(c) => c,
        Err(rc) => return rc,
    };
    let mut params = Map::new();
    params.insert("code".into(), Value::String(code));
    match client.call_with("execute_code", params, host.interrupted) {
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

fn status(a: &StatusArgs, host: &Host<'_>) -> i32 {
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

fn shutdown(a: &ShutdownArgs, host: &Host<'_>) -> i32 {
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
    if a.wait > 0.0 {
        let deadline = Instant::now() + Duration::from_secs_f64(a.wait.min(86_400.0));
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

fn ls(a: &LsArgs) -> i32 {
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

// --- install / uninstall --------------------------------------------------------------------------------

const ADDON: &str = "bld_remote";

fn find_blender(explicit: Option<&Path>) -> Result<blender::Found, i32> {
    blender::find(explicit).map_err(|e| {
        errln(&e.to_string());
        EXIT_FAILURE
    })
}

fn copy_package(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let src = entry.path();
        if name == "__pycache__" {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_package(&src, &to.join(&name))?;
        } else {
            std::fs::copy(&src, to.join(&name))?;
        }
    }
    Ok(())
}

fn install(a: &InstallArgs, host: &Host<'_>) -> i32 {
    let package_dir = match (host.package_dir)() {
        Ok(d) => d,
        Err(e) => {
            errln(&e);
            return EXIT_FAILURE;
        }
    };
    let found = match find_blender(a.blender.as_deref()) {
        Ok(f) => f,
        Err(rc) => return rc,
    };
    let facts = match blender::facts(&found.path) {
        Ok(f) => f,
        Err(e) => {
            errln(&e);
            return EXIT_FAILURE;
        }
    };
    let addons = facts.user_scripts.join("addons");
    let target = addons.join(ADDON);
    let staging = addons.join(format!(".{ADDON}.installing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let copied = copy_package(&package_dir, &staging).and_then(|()| {
        if target.exists() {
            std::fs::remove_dir_all(&target)?;
        }
        std::fs::rename(&staging, &target)
    });
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&staging);
        errln(&format!(
            "cannot copy the add-on to {}: {e}",
            target.display()
        ));
        return EXIT_FAILURE;
    }
    match blender::set_enabled(&found.path, ADDON, true) {
        Ok(v) if v["ok"] == json!(true) && v["enabled"] == json!(true) => {}
        Ok(v) => {
            errln(&format!(
                "copied to {}, but Blender could not enable it: {v}",
                target.display()
            ));
            return EXIT_FAILURE;
        }
        Err(e) => {
            errln(&format!(
                "copied to {}, but enabling it failed: {e}",
                target.display()
            ));
            return EXIT_FAILURE;
        }
    }
    let (major, minor, _) = facts.version;
    outln(&format!(
        "installed bld_remote {} into Blender {} at {} (enabled; preferences saved in {})",
        env!("CARGO_PKG_VERSION"),
        facts.version_string,
        target.display(),
        facts.user_config.display()
    ));
    if (major, minor) >= (4, 2) {
        outln("note: installed as a legacy add-on (Blender 4.2+ still loads these); not as an extension");
    }
    outln("start it with BLD_REMOTE_MCP_START_NOW=1 in the environment, or from the add-on's preferences");
    0
}

fn uninstall(a: &InstallArgs) -> i32 {
    let found = match find_blender(a.blender.as_deref()) {
        Ok(f) => f,
        Err(rc) => return rc,
    };
    let facts = match blender::facts(&found.path) {
        Ok(f) => f,
        Err(e) => {
            errln(&e);
            return EXIT_FAILURE;
        }
    };
    let target = facts.user_scripts.join("addons").join(ADDON);
    let present = target.exists();
    match blender::set_enabled(&found.path, ADDON, false) {
        Ok(v) if v["ok"] == json!(true) => {}
        Ok(v) => {
            errln(&format!("Blender could not disable the add-on: {v}"));
            return EXIT_FAILURE;
        }
        Err(e) => {
            errln(&format!("disabling the add-on failed: {e}"));
            return EXIT_FAILURE;
        }
    }
    if present {
        if let Err(e) = std::fs::remove_dir_all(&target) {
            errln(&format!("cannot remove {}: {e}", target.display()));
            return EXIT_FAILURE;
        }
        outln(&format!("uninstalled bld_remote from {}", target.display()));
    } else {
        outln(&format!(
            "bld_remote was not installed in {} (nothing to remove)",
            target.display()
        ));
    }
    0
}

// --- start ----------------------------------------------------------------------------------------------

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

fn start(a: StartArgs, host: &Host<'_>) -> i32 {
    let env_port = std::env::var("BLD_REMOTE_MCP_PORT").unwrap_or_default();
    let port = match (a.port, env_port.trim()) {
        (Some(p), _) => p,
        (None, "") => DEFAULT_PORT,
        (None, v) => {
            if let Ok(p) = v.parse() {
                p
            } else {
                errln(&format!(
                    "BLD_REMOTE_MCP_PORT must be a port number (0-65535), got {v:?}"
                ));
                return EXIT_USAGE;
            }
        }
    };
    if !(a.ready_timeout > 0.0 && a.ready_timeout.is_finite()) {
        errln("--ready-timeout must be a positive number of seconds");
        return EXIT_USAGE;
    }
    let found = match find_blender(a.blender.as_deref()) {
        Ok(f) => f,
        Err(rc) => return rc,
    };
    let package_dir = match (host.package_dir)() {
        Ok(d) => d,
        Err(e) => {
            errln(&e);
            return EXIT_FAILURE;
        }
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
    let ready_timeout = Duration::from_secs_f64(a.ready_timeout);
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

    #[test]
    fn usage_errors_exit_2_and_help_exits_0() {
        let no = || false;
        let term = |_| false;
        let nowhere = || Err("no package".to_string());
        let host = Host {
            package_dir: &nowhere,
            interrupted: &no,
            terminate: &term,
        };
        let argv = |a: &[&str]| a.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        assert_eq!(run(argv(&["bld-remote", "frobnicate"]), &host), EXIT_USAGE);
        assert_eq!(run(argv(&["bld-remote", "exec"]), &host), EXIT_USAGE);
        assert_eq!(
            run(argv(&["bld-remote", "exec", "-c", "x", "f.py"]), &host),
            EXIT_USAGE
        );
        assert_eq!(run(argv(&["bld-remote", "--help"]), &host), 0);
    }
}
