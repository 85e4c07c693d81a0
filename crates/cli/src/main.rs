//! `bld-remote`: the command line beside Blender (start, exec, status, ls, install, mcp, ...). This file
//! wires the process to the command: signals, how to find the installed Python package, the exit status.
//! The subcommands live in cli/ (arguments, the start supervisor, install, queries) over bld-remote-core's
//! client and instance descriptors; the MCP server in mcp/. Runs on the main thread. Nothing here is ever
//! loaded into Blender's process.

mod blender;
mod cli;
mod mcp;
mod package;
mod signals;

use bld_remote_core::{client, instances, server};

fn main() {
    let interrupted = signals::Interrupted::install();
    let is_interrupted = || interrupted.take();
    let host = cli::Host {
        package_dir: &package::find,
        interrupted: &is_interrupted,
        terminate: &signals::terminate,
    };
    let code = cli::run(std::env::args().collect(), &host);
    std::process::exit(code);
}
