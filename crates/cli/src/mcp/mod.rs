//! `bld-remote mcp`: an MCP server (official Rust SDK `rmcp`) that lets LLM clients drive a running Blender
//! through the bld_remote service. This file owns the command's options and [`run`]: it builds the tokio
//! runtime and serves one transport: stdio (default; stdout carries nothing but MCP, logs go to stderr) or
//! Streamable HTTP (`--http`, see [`http`]). The tools themselves are in [`tools`]; the connection to
//! Blender in [`conn`]; image downscaling in [`image`]; the resources and their change notifications in
//! [`resources`].
//!
//! Threads: the binary's main thread blocks in [`run`] (polling the signal flag every 100 ms); the transport,
//! the tools and the connection run as tasks on two tokio workers named `bld-remote-mcp`, all stopped by
//! the runtime's shutdown before [`run`] returns. Never runs inside Blender.
//!
//! Each tool is one request to the service over [`conn::Backend`] (framed mode, one kept connection per
//! instance; the instance is chosen per call from the `instance` argument, see [`conn::Backend::choose`]):
//! progress lines from the service become MCP progress notifications, an MCP cancellation becomes the
//! service's `cancel` (a request still queued never runs; a running one has its result discarded), and a
//! service that is down or goes away becomes a tool error that says so; the next call reconnects.

// Doc comments in this module are user-facing text too (clap help, JSON-schema descriptions the model reads).
#![allow(clippy::doc_markdown)]

mod conn;
mod export;
mod http;
mod image;
mod look;
mod lookup;
mod resources;
mod schemas;
mod tasks;
mod tools;

use std::sync::Arc;
use std::time::Duration;

use bld_remote_core::config::{port_from, ProcessEnv};
use clap::Args;
use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

use conn::{Backend, Target};
use tools::BlenderMcp;

/// Default budget for one image in a tool result (PNG bytes, before base64).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 1024 * 1024;

/// `bld-remote mcp` options.
#[derive(Args, Debug, Clone)]
pub struct McpArgs {
    /// Pin the server to the bld_remote service on this port (default: $BLD_REMOTE_MCP_PORT). Unpinned,
    /// each tool call goes to the running instance (`bld-remote ls`) its `instance` argument names, or to
    /// the only one (else 6688); several and none named is a tool error listing them.
    #[arg(long)]
    pub port: Option<u16>,
    /// The bld_remote service's address.
    #[arg(long)]
    pub host: Option<String>,
    /// Auth token of the bld_remote service, if it requires one. Default: $BLD_REMOTE_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// Offer and call only the read-only tools (inspect, render, look up; no code, no writes), whatever the
    /// token may do. Each instance is reached with its descriptor's read token when it has one, so the
    /// service refuses writes as well.
    #[arg(long)]
    pub read_only: bool,
    /// Seconds a request to Blender may take before the tool call fails (queued requests are then dropped).
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// Serve MCP over Streamable HTTP at ADDR (e.g. 127.0.0.1:8000, endpoint /mcp) instead of stdio.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Bearer token HTTP clients must send (`Authorization: Bearer ...`). Default: $BLD_REMOTE_MCP_HTTP_TOKEN.
    /// Required when --http binds anything but loopback.
    #[arg(long, value_name = "TOKEN")]
    pub http_token: Option<String>,
    /// Extra browser Origin allowed over HTTP (scheme://host[:port|:*]); loopback origins always are.
    #[arg(long, value_name = "ORIGIN")]
    pub allow_origin: Vec<String>,
    /// Extra Host header value allowed over HTTP (loopback names always are).
    #[arg(long, value_name = "HOST")]
    pub allow_host: Vec<String>,
    /// Seconds an HTTP client gets to send a request's headers, counted from its connection or from its
    /// first byte after a reply; a client that sends half a request and stalls is then disconnected.
    #[arg(long, default_value_t = http::DEFAULT_HEADER_TIMEOUT_SECS, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_header_timeout: u64,
    /// Seconds an HTTP keep-alive connection may sit idle between requests before it is closed.
    #[arg(long, default_value_t = http::DEFAULT_IDLE_TIMEOUT_SECS, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub http_idle_timeout: u64,
    /// Most HTTP connections open at once; more are answered 503 and closed.
    #[arg(long, default_value_t = http::DEFAULT_MAX_CONNECTIONS, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub http_max_connections: u64,
    /// Largest image (PNG bytes) put in a tool result; larger renders and screenshots are scaled down.
    #[arg(long, default_value_t = DEFAULT_MAX_IMAGE_BYTES, value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub max_image_bytes: u64,
}

/// Why `bld-remote mcp` stopped other than by its client leaving or a signal; the reason is already on
/// stderr. The command line turns it into an exit status (this module knows none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// A bad option or environment variable.
    Usage,
    /// The runtime or the transport failed.
    Error,
}

/// Run the server until the client disconnects (stdio) or `interrupted()` turns true.
pub fn run(args: McpArgs, interrupted: &(dyn Fn() -> bool + Sync)) -> Result<(), Failed> {
    let timeout = match bld_remote_core::config::positive_seconds("--timeout", args.timeout) {
        Ok(t) => t,
        Err(e) => {
            conn::log(&e.0);
            return Err(Failed::Usage);
        }
    };
    // Without --port, every connection reads BLD_REMOTE_MCP_PORT: a bad value is a usage error now, not a
    // tool error on every call later.
    if args.port.is_none() {
        if let Err(e) = port_from(&ProcessEnv) {
            conn::log(&e.to_string());
            return Err(Failed::Usage);
        }
    }
    // Explicit only here; each connection resolves the rest (env, then the instance descriptor).
    let token = args.token.clone().filter(|t| !t.is_empty());
    let backend = Arc::new(Backend::new(
        Target {
            host: args.host.clone(),
            port: args.port,
            token,
            read_only: args.read_only,
        },
        timeout,
    ));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bld-remote-mcp")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            conn::log(&format!("cannot start the async runtime: {e}"));
            return Err(Failed::Error);
        }
    };
    // 1 KiB to 1 GiB (clap checked it): fits a usize on every platform Blender runs on.
    let max_image = usize::try_from(args.max_image_bytes).unwrap_or(usize::MAX);
    let shutdown = CancellationToken::new();
    let status = runtime.block_on(async {
        let serve = async {
            match &args.http {
                None => serve_stdio(Arc::clone(&backend), max_image, shutdown.clone()).await,
                Some(addr) => {
                    http::serve(
                        &args,
                        addr,
                        Arc::clone(&backend),
                        max_image,
                        shutdown.clone(),
                    )
                    .await
                }
            }
        };
        tokio::pin!(serve);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                r = &mut serve => break r,
                _ = tick.tick() => {
                    if !shutdown.is_cancelled() && interrupted() {
                        conn::log("signal received: shutting down");
                        shutdown.cancel();
                    }
                }
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    match status {
        Ok(()) => Ok(()),
        Err(e) => {
            conn::log(&e);
            Err(Failed::Error)
        }
    }
}

async fn serve_stdio(
    backend: Arc<Backend>,
    max_image: usize,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let server = BlenderMcp::new(backend, max_image);
    let running = server
        .serve_with_ct(rmcp::transport::stdio(), shutdown.child_token())
        .await
        .map_err(|e| format!("MCP session failed to start: {e}"))?;
    running
        .waiting()
        .await
        .map_err(|e| format!("MCP session ended with an error: {e}"))?;
    Ok(())
}
