//! `bld-remote`: the command line. [`run`] parses the arguments (clap, [`args`]) and hands each subcommand to
//! its file: [`start`] (the supervisor that launches Blender), [`install`] (install/uninstall the add-on),
//! [`queries`] (exec, status, shutdown, ls over bld-remote-core's client and instance descriptors), [`map`]
//! (a local pool's map over bld-remote-core's pool), and
//! `crate::mcp` (the MCP server). [`Host`] is all they need from the process (src/main.rs): where the
//! installed Python package is, whether a signal arrived, and how to send SIGTERM.
//!
//! Runs on the binary's main thread; `start` adds its stdout relays and `map` one worker per instance, all
//! joined before they return.
//!
//! Exit status: 0 success; 1 failure (the remote code raised, Blender not found, port busy, start failed);
//! 2 usage error; 3 no service reachable (refused, lost, no instance, several instances); 4 timeout;
//! 130 interrupted. `start` exits with Blender's own status once Blender ran.

mod args;
mod install;
mod job;
mod map;
mod queries;
mod start;

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::blender;
use args::{Cli, Cmd};

pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_UNREACHABLE: i32 = 3;
pub const EXIT_TIMEOUT: i32 = 4;
pub const EXIT_INTERRUPTED: i32 = 130;

/// What the CLI needs from the process it runs in.
pub struct Host<'a> {
    /// Finds the installed `bld_remote` package folder (holds `__init__.py` and the native module);
    /// asked only by the commands that load it into Blender.
    pub package_dir: &'a (dyn Fn() -> Result<PathBuf, String> + Sync),
    /// True once SIGINT/SIGTERM/SIGHUP arrived since the last call (polled at least every 100 ms while
    /// waiting).
    pub interrupted: &'a (dyn Fn() -> bool + Sync),
    /// Send SIGTERM (Windows: terminate) to a process; false when that failed.
    pub terminate: &'a (dyn Fn(u32) -> bool + Sync),
}

// --- output (never panics: a closed pipe must not end the command with a panic) --------------------------

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
        Cmd::Start(a) => start::start(a, host),
        Cmd::Install(a) => install::install(&a, host),
        Cmd::Uninstall(a) => install::uninstall(&a),
        Cmd::Exec(a) => queries::exec(a, host),
        Cmd::Status(a) => queries::status(&a, host),
        Cmd::Shutdown(a) => queries::shutdown(&a, host),
        Cmd::Ls(a) => queries::ls(&a),
        Cmd::Job(a) => job::job(a, host),
        Cmd::Map(a) => map::map(&a, host),
        Cmd::Mcp(a) => match crate::mcp::run(a, host.interrupted) {
            Ok(()) => 0,
            Err(crate::mcp::Failed::Usage) => EXIT_USAGE,
            Err(crate::mcp::Failed::Error) => EXIT_FAILURE,
        },
    }
}

// --- shared by start and install -------------------------------------------------------------------------

/// The Blender to run, or the exit status after saying why there is none.
fn find_blender(explicit: Option<&Path>) -> Result<blender::Found, i32> {
    blender::find(explicit).map_err(|e| {
        errln(&e.to_string());
        EXIT_FAILURE
    })
}

/// The installed `bld_remote` package folder, or the exit status after saying why it was not found.
fn package_dir(host: &Host<'_>) -> Result<PathBuf, i32> {
    (host.package_dir)().map_err(|e| {
        errln(&e);
        EXIT_FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
