//! The command line's shape: clap's structs for `bld-remote` and each subcommand (flags, defaults, help
//! text). Only data: parsing happens in [`super::run`], on the main thread. The help text printed here is
//! part of the interface (scripts read `--help`), so wording changes are behaviour changes.

use std::path::PathBuf;

use bld_remote_core::config::DEFAULT_HOST;
use clap::{Args, Parser, Subcommand};

/// Most instances one `start --instances` runs (each Blender takes about 250 MB and a core's worth of work).
pub(super) const MAX_INSTANCES: u16 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "bld-remote",
    bin_name = "bld-remote",
    version,
    about = "Start Blender serving bld_remote, run code in it, find running instances.",
    after_help = "Exit status: 0 ok, 1 failure, 2 usage, 3 no service reachable, 4 timeout, 130 interrupted; \
                  `start` exits with Blender's status.\nDocs: docs/CLI.md"
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) command: Cmd,
}

#[derive(Subcommand, Debug)]
pub(super) enum Cmd {
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
    /// Jobs that outlive the connection: submit code, then ask for its status or result, cancel it, list.
    Job(JobArgs),
    /// Run a Python file once per item of a JSON list, over every running instance (a local pool).
    Map(MapArgs),
    /// Serve MCP (stdio by default, or Streamable HTTP with --http) for LLM clients, talking to Blender.
    Mcp(crate::mcp::McpArgs),
}

#[derive(Args, Debug)]
pub(super) struct StartArgs {
    /// Run Blender headless (`blender --background`); the main thread serves until the service stops.
    #[arg(short = 'b', long)]
    pub(super) background: bool,
    /// Port to listen on (0: a free one, named in the ready line). Default: `$BLD_REMOTE_MCP_PORT`, else 6688.
    #[arg(long)]
    pub(super) port: Option<u16>,
    /// Address to listen on. Anything but loopback needs a token (`$BLD_REMOTE_TOKEN`).
    #[arg(long, default_value = DEFAULT_HOST)]
    pub(super) host: String,
    /// The Blender executable (or a folder holding it). Default: $BLENDER, PATH, usual install locations.
    #[arg(long, value_name = "PATH")]
    pub(super) blender: Option<PathBuf>,
    /// A .blend file to open.
    #[arg(long, value_name = "FILE.blend")]
    pub(super) scene: Option<PathBuf>,
    /// Seconds to wait for the service to accept connections.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    pub(super) ready_timeout: f64,
    /// Start N headless Blenders (needs --background), each on its own free port with its own descriptor;
    /// one ready line each. One that dies is restarted on the same port (see --max-restarts).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_INSTANCES)))]
    pub(super) instances: Option<u16>,
    /// With --instances: how many times each instance is restarted after dying, before it is left down.
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub(super) max_restarts: u32,
    /// The service token for Blender (`auto`: each instance generates its own, kept in its owner-only
    /// descriptor). Default: `$BLD_REMOTE_TOKEN`.
    #[arg(long, value_name = "TOKEN|auto")]
    pub(super) token: Option<String>,
    /// A second token that may only read (scene info, renders, status; `auto`: each instance generates
    /// its own, kept in its descriptor). Must differ from --token. Default: `$BLD_REMOTE_READ_TOKEN`.
    #[arg(long, value_name = "TOKEN|auto")]
    pub(super) read_token: Option<String>,
    /// Stop Blender (every instance) when the process that started this command exits (Pool.start uses it).
    #[arg(long)]
    pub(super) stop_with_parent: bool,
    /// Extra arguments for Blender, after `--`. A further `--` passes the rest to Python's sys.argv.
    #[arg(last = true, value_name = "BLENDER ARGS")]
    pub(super) blender_args: Vec<String>,
}

#[derive(Args, Debug)]
pub(super) struct InstallArgs {
    /// The Blender executable (or a folder holding it). Default: $BLENDER, PATH, usual install locations.
    #[arg(long, value_name = "PATH")]
    pub(super) blender: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub(super) struct Target {
    /// The service's port. Default: the only running instance (see `bld-remote ls`).
    #[arg(long)]
    pub(super) port: Option<u16>,
    /// The service's address.
    #[arg(long)]
    pub(super) host: Option<String>,
    /// Auth token, for services that require one. Default: `$BLD_REMOTE_TOKEN`.
    #[arg(long)]
    pub(super) token: Option<String>,
    /// Give up waiting for the reply after this many seconds (default: wait as long as it takes).
    #[arg(long, value_name = "SECONDS")]
    pub(super) timeout: Option<f64>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["code", "file"])))]
pub(super) struct ExecArgs {
    /// The code to run.
    #[arg(short = 'c', value_name = "CODE")]
    pub(super) code: Option<String>,
    /// A Python file to run (`-`: read standard input).
    #[arg(value_name = "FILE")]
    pub(super) file: Option<PathBuf>,
    /// Print the whole result as one JSON object (stdout, stderr, result, duration) instead.
    #[arg(long)]
    pub(super) json: bool,
    #[command(flatten)]
    pub(super) target: Target,
}

#[derive(Args, Debug)]
pub(super) struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub(super) json: bool,
    #[command(flatten)]
    pub(super) target: Target,
}

#[derive(Args, Debug)]
pub(super) struct ShutdownArgs {
    /// Seconds to wait for the port to close (0: do not wait).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub(super) wait: f64,
    #[command(flatten)]
    pub(super) target: Target,
}

#[derive(Args, Debug)]
pub(super) struct LsArgs {
    /// Print the live instances' descriptors as a JSON list.
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Args, Debug)]
pub(super) struct JobArgs {
    #[command(subcommand)]
    pub(super) command: JobCmd,
}

#[derive(Subcommand, Debug)]
pub(super) enum JobCmd {
    /// Submit code as a job and print its id (it runs whether or not anyone waits).
    #[command(group(clap::ArgGroup::new("source").required(true).args(["code", "file"])))]
    Submit {
        /// The code to run.
        #[arg(short = 'c', value_name = "CODE")]
        code: Option<String>,
        /// A Python file to run (`-`: read standard input).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Seconds the job may run before `check_cancelled()` raises in it.
        #[arg(long, value_name = "SECONDS")]
        job_timeout: Option<f64>,
        /// Print the whole snapshot as JSON instead of the id.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print a job's status as JSON (exit 1 if the id is unknown).
    Status {
        /// The job's id (`bld-job-N`).
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print a job's output (exit 0 completed, 1 failed or cancelled, 4 not done within --wait).
    Result {
        /// The job's id (`bld-job-N`).
        id: String,
        /// Seconds to wait for it to end (default: as long as it takes).
        #[arg(long, value_name = "SECONDS")]
        wait: Option<f64>,
        /// Print the whole snapshot with the result as JSON instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Ask a job to stop: a queued one never runs, a running one stops at its next `check_cancelled()`.
    Cancel {
        /// The job's id (`bld-job-N`).
        id: String,
        /// Why (kept in the job's metadata).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List the jobs the service keeps, as JSON.
    List {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug)]
pub(super) struct MapArgs {
    /// The Python to run once per item: `item` is bound to it; its `result` variable is the item's value.
    /// `-`: read standard input.
    #[arg(value_name = "FILE.py")]
    pub(super) file: PathBuf,
    /// The items: a JSON array, or one JSON value per line. `-`: read standard input.
    #[arg(long, value_name = "ITEMS.json")]
    pub(super) items: PathBuf,
    /// An instance to use (repeat for several). Default: every running instance (`bld-remote ls`).
    #[arg(long = "port", value_name = "PORT")]
    pub(super) ports: Vec<u16>,
    /// The instances' address (with --port), or only the instances on it.
    #[arg(long)]
    pub(super) host: Option<String>,
    /// Auth token for every instance. Default: `$BLD_REMOTE_TOKEN`, else each instance's descriptor.
    #[arg(long)]
    pub(super) token: Option<String>,
    /// Seconds each item may take (default: as long as it takes).
    #[arg(long, value_name = "SECONDS")]
    pub(super) timeout: Option<f64>,
    /// Extra attempts for an item whose Blender died while it ran, or that timed out. Only for code that
    /// is safe to run twice: without it such an item is reported "outcome unknown" and never sent again.
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub(super) retries: u32,
    /// Print one JSON array at the end instead of one JSON line per item as they complete (in item order).
    #[arg(long)]
    pub(super) array: bool,
    /// No progress on stderr (neither the bar on a terminal nor the plain lines otherwise).
    #[arg(short, long)]
    pub(super) quiet: bool,
}
