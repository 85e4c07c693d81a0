//! `bld-remote mcp --http ADDR`: MCP over Streamable HTTP at `http://ADDR/mcp`, served by rmcp's
//! `StreamableHttpService` on hyper (HTTP/1.1). In front of it, our own checks: the path, and the bearer
//! token when one is configured. rmcp itself validates `Host` (loopback names, plus `--allow-host`, against
//! DNS rebinding) and `Origin` (loopback origins plus `--allow-origin`; a request with another Origin is
//! refused with 403; one without Origin, as non-browser clients send, passes).
//!
//! Protocol eras: rmcp serves the 2025-11-25 lifecycle (initialize, `Mcp-Session-Id` sessions) and the
//! stateless 2026-07-28 revision (per-request metadata, no session) on the same endpoint; each request is
//! routed by the protocol version it declares.
//!
//! Runs on the tokio runtime of `bld-remote mcp`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

use super::conn::{log, Backend};
use super::tools::BlenderMcp;
use super::McpArgs;

/// The endpoint path.
pub const PATH: &str = "/mcp";

type Body = BoxBody<Bytes, Infallible>;

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `Authorization: Bearer <token>` matches (case-insensitive scheme, constant-time comparison).
fn bearer_ok(req: &Request<Incoming>, token: &str) -> bool {
    let Some(v) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = v.trim().splitn(2, ' ');
    let scheme = parts.next().unwrap_or("");
    let given = parts.next().unwrap_or("").trim();
    scheme.eq_ignore_ascii_case("bearer")
        && crate::server::constant_time_eq(given.as_bytes(), token.as_bytes())
}

type Mcp = StreamableHttpService<BlenderMcp, LocalSessionManager>;

/// One HTTP request: our checks (path, bearer token), then rmcp's service (Host, Origin, MCP).
async fn handle(
    req: Request<Incoming>,
    mut service: Mcp,
    token: Option<Arc<str>>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if path != PATH && path != "/mcp/" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found: the MCP endpoint is /mcp",
        ));
    }
    if let Some(t) = token.as_deref() {
        if !bearer_ok(&req, t) {
            let mut r = plain(
                StatusCode::UNAUTHORIZED,
                "unauthorized: send Authorization: Bearer <token>",
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer realm=\"bld_remote\""),
            );
            return Ok(r);
        }
    }
    service.call(req).await
}

/// Serve until `shutdown` is cancelled.
pub async fn serve(
    args: &McpArgs,
    addr: &str,
    backend: Arc<Backend>,
    max_image: usize,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let bind: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("--http {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("--http {addr}: resolves to no address"))?;
    let token = args
        .http_token
        .clone()
        .or_else(|| std::env::var("BLD_REMOTE_MCP_HTTP_TOKEN").ok())
        .filter(|t| !t.is_empty());
    if !bind.ip().is_loopback() && token.is_none() {
        return Err(format!(
            "refusing to serve MCP on {bind} without a token: anyone who can reach it could run code in \
             Blender. Set --http-token (or $BLD_REMOTE_MCP_HTTP_TOKEN), or bind 127.0.0.1"
        ));
    }
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {bind}: {e}"))?;

    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if !bind.ip().is_unspecified() {
        hosts.push(bind.ip().to_string());
    }
    hosts.extend(args.allow_host.iter().cloned());
    let mut origins: Vec<String> = vec![
        "http://localhost:*".into(),
        "http://127.0.0.1:*".into(),
        "http://[::1]:*".into(),
    ];
    origins.extend(args.allow_origin.iter().cloned());
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_allowed_origins(origins)
        .enforce_origin_validation()
        .with_cancellation_token(shutdown.child_token());
    let service = StreamableHttpService::new(
        move || Ok(BlenderMcp::new(Arc::clone(&backend), max_image)),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    // The ready line for people and scripts (stderr: stdout stays unused, as in stdio mode).
    log(&format!(
        "serving MCP over Streamable HTTP at http://{local}{PATH}{}",
        if token.is_some() {
            " (bearer token required)"
        } else {
            ""
        }
    ));
    let token: Option<Arc<str>> = token.map(Arc::from);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    log(&format!("accept failed: {e}"));
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let token = token.clone();
        let conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
                handle(req, service.clone(), token.clone())
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = conn_shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn).await;
                }
            }
        });
    }
    Ok(())
}
