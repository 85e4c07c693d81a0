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
//! Bounds (nginx's, in spirit: `client_header_timeout`, `keepalive_timeout`, a connection limit), enforced
//! by a watchdog in each connection's task that reads the connection's [`Activity`]:
//! - a client must send a request's headers within `--http-header-timeout` (10 s) of connecting, or of its
//!   first byte after a reply; a half-sent request is then dropped (the socket closes, nothing is answered);
//! - an idle keep-alive connection (no request in flight, nothing sent) closes after `--http-idle-timeout`
//!   (60 s);
//! - at most `--http-max-connections` (64) are open at once; more are answered `503` and closed.
//!
//! A request in flight (its reply still streaming, e.g. a long render's progress over SSE) is never cut by
//! these. hyper's own `header_read_timeout` is not used: its timer also runs while a connection idles, so
//! the two timeouts could not differ.
//!
//! Runs on the tokio runtime of `bld-remote mcp`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

use super::conn::{log, Backend};
use super::tools::BlenderMcp;
use super::McpArgs;

/// The endpoint path.
pub const PATH: &str = "/mcp";

/// Default `--http-header-timeout`: seconds to send a request's headers.
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
/// Default `--http-idle-timeout`: seconds a keep-alive connection may idle between requests.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
/// Default `--http-max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 64;
/// How long a refused connection's `503` may take to write before the socket is dropped anyway.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What one connection's watchdog needs to know: when the client last sent anything, whether a request's
/// headers are under way (and since when), and how many requests are in flight.
struct Activity {
    state: Mutex<ActivityState>,
}

struct ActivityState {
    /// Since when the headers of the next request are awaited: set at accept and at the first byte read
    /// while no request is in flight; cleared when hyper hands a request over.
    head_since: Option<Instant>,
    /// When the connection last went idle (a reply finished) or read a byte.
    last: Instant,
    in_flight: usize,
}

/// The watchdog's verdict on a connection at a given moment.
enum Verdict {
    /// Fine; look again at this instant.
    CheckAt(Instant),
    HeaderTimeout,
    Idle,
}

impl Activity {
    fn new() -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            state: Mutex::new(ActivityState {
                head_since: Some(now),
                last: now,
                in_flight: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        // A poisoned lock only means a panic elsewhere mid-update of plain numbers: keep using them.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_bytes(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        s.last = now;
        if s.in_flight == 0 && s.head_since.is_none() {
            s.head_since = Some(now);
        }
    }

    fn request_began(self: &Arc<Self>) -> InFlight {
        let mut s = self.lock();
        s.in_flight += 1;
        s.head_since = None;
        InFlight(Arc::clone(self))
    }

    fn verdict(&self, now: Instant, header: Duration, idle: Duration) -> Verdict {
        let s = self.lock();
        if s.in_flight > 0 {
            return Verdict::CheckAt(now + header.min(idle));
        }
        let (deadline, expired) = match s.head_since {
            Some(since) => (since + header, Verdict::HeaderTimeout),
            None => (s.last + idle, Verdict::Idle),
        };
        if now >= deadline {
            expired
        } else {
            Verdict::CheckAt(deadline)
        }
    }
}

/// One request in flight, from its headers to the end (or drop) of its reply's body.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight -= 1;
        s.last = Instant::now();
    }
}

/// A reply body that keeps its request counted as in flight until hyper is done with it.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's socket, noting every read in the connection's [`Activity`].
struct Watched {
    inner: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read_bytes();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Counts open connections; one slot per connection task, given back when the task ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(Arc::clone(open)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Beyond the connection cap: a `503` (HTTP/1.1 clients see why, and may retry), then close.
async fn refuse(mut stream: tokio::net::TcpStream, max: usize) {
    let body = format!("too many connections (limit {max}): try again later\n");
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_WRITE_TIMEOUT, async {
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

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
    let header_timeout = Duration::from_secs(args.http_header_timeout);
    let idle_timeout = Duration::from_secs(args.http_idle_timeout);
    let max_connections = usize::try_from(args.http_max_connections).unwrap_or(usize::MAX);
    let open = Arc::new(AtomicUsize::new(0));
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
        let Some(slot) = Slot::take(&open, max_connections) else {
            tokio::spawn(refuse(stream, max_connections));
            continue;
        };
        tokio::spawn(serve_connection(
            stream,
            slot,
            service.clone(),
            token.clone(),
            Bounds {
                header: header_timeout,
                idle: idle_timeout,
            },
            shutdown.clone(),
        ));
    }
    Ok(())
}

/// A connection's timeouts.
#[derive(Clone, Copy)]
struct Bounds {
    header: Duration,
    idle: Duration,
}

/// One connection's task: hyper serving it, and the watchdog enforcing [`Bounds`] (see the module doc).
async fn serve_connection(
    stream: tokio::net::TcpStream,
    slot: Slot,
    service: Mcp,
    token: Option<Arc<str>>,
    bounds: Bounds,
    shutdown: CancellationToken,
) {
    let _slot = slot;
    let activity = Activity::new();
    let io = Watched {
        inner: stream,
        activity: Arc::clone(&activity),
    };
    let requests = Arc::clone(&activity);
    let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
        let in_flight = requests.request_began();
        let reply = handle(req, service.clone(), token.clone());
        async move {
            let r = reply.await?;
            Ok::<_, Infallible>(r.map(|inner| {
                Tracked {
                    inner,
                    _in_flight: in_flight,
                }
                .boxed()
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), handler);
    tokio::pin!(conn);
    let mut check_at = Instant::now() + bounds.header.min(bounds.idle);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep_until(check_at) => {
                match activity.verdict(Instant::now(), bounds.header, bounds.idle) {
                    Verdict::CheckAt(at) => check_at = at,
                    // Half a request: drop it, which closes the socket.
                    Verdict::HeaderTimeout => return,
                    // Nothing in flight: hyper closes an idle connection at once.
                    Verdict::Idle => break,
                }
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
}
