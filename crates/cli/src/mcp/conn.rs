//! The MCP server's connections to bld_remote services: which instance a tool call goes to
//! ([`Backend::choose`], from its `instance` argument and the instance descriptors), and one TCP connection
//! per instance in framed mode (every request carries an `id`), made on its first call and kept, shared by
//! every tool call in flight to that instance. Replies are matched to calls by id, progress lines
//! (`{"id": N, "progress": {...}}`) are routed to the call that asked for them, and a call that is cancelled
//! or abandoned sends `cancel` for its id on the same connection, so a request still queued in Blender never
//! runs. Replies are read by bld-remote-core's [`interpret_reply`], as every other client reads them (same
//! timeout rules: `ran` comes from the reply's fields). Async: the reader and writer are tasks on the tokio
//! runtime of `bld-remote mcp` (see [`super::run`]), ended when their [`Link`] closes; never in Blender.
//!
//! Why not `crate::client::Client`: it is blocking and owns its stream for the length of one call, so it
//! cannot carry several concurrent MCP tool calls on one connection, deliver progress lines, or send
//! `cancel` for a request while waiting for that request's reply. All three are what MCP needs.
//!
//! Reconnects: a lost connection fails the calls in flight with [`CallError::Lost`]; the next call to that
//! instance connects afresh. The instance is chosen again on every call (when no port was given), so
//! Blenders may start and stop while the server runs.
//!
//! Tokens: each instance's token is resolved for its own address (`--token`, else `$BLD_REMOTE_TOKEN`, else
//! its descriptor's: [`bld_remote_core::instances::resolve_token`]). With a token, each new connection first
//! runs bld-remote-core's challenge-response handshake ([`bld_remote_core::auth`]): the service proves it
//! holds the token for the address dialed before anything else is sent, then we prove it; requests carry no
//! `token` field. A peer that cannot prove it (a port squatter, a wrong token, an older service) fails the
//! call with [`ClientError::Unverified`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bld_remote_core::auth::{self, ClientHandshake};
use bld_remote_core::client::{interpret_reply, ClientError};
use bld_remote_core::config::{port_from, ProcessEnv, DEFAULT_HOST, DEFAULT_PORT};
use bld_remote_core::instances::Descriptor;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How long connecting may take before Blender counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Extra time granted beyond the deadline sent to the service, so the service's own timeout reply (which
/// says whether the request ran) normally wins the race. The same 2 s as bld-remote-core's blocking client.
const REPLY_GRACE: Duration = Duration::from_secs(2);
/// Longest the handshake may take (the service answers it on its network threads, at once), and the largest
/// reply read from a peer not yet trusted: the same bounds as bld-remote-core's blocking client.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_REPLY_LIMIT: u64 = 64 * 1024;

/// Where the services are: a pinned port (`--port`), or "find them" (the instance descriptors).
#[derive(Debug, Clone)]
pub struct Target {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub token: Option<String>,
    /// `--read-only`: offer and call only the read-only tools, whatever the token may do, and reach each
    /// instance with its descriptor's read token when it has one (then the service refuses writes too).
    pub read_only: bool,
}

/// Why a call produced no result.
#[derive(Debug)]
pub enum CallError {
    /// No service to talk to (not running, refused, several instances...).
    Unreachable(String),
    /// The connection broke while the request was in flight: whether it ran is unknown.
    Lost(String),
    /// The service answered with an error ([`ClientError::Remote`], the whole reply kept;
    /// [`ClientError::Timeout`], `ran` read from its fields), or gave no reply within the deadline plus
    /// [`REPLY_GRACE`] ([`ClientError::Timeout`] with `ran: None`).
    Service(ClientError),
    /// The MCP client cancelled the call.
    Cancelled,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(m) | Self::Lost(m) => f.write_str(m),
            // The detail alone: it already says that Blender did not answer, and in how long.
            Self::Service(ClientError::Timeout { detail, .. }) => f.write_str(detail),
            Self::Service(e) => write!(f, "{e}"),
            Self::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// What the reader task hands a waiting call: the raw reply (read by [`interpret_reply`] in the call), or
/// why none will come.
type PendingReply = Result<Map<String, Value>, CallError>;

struct Pending {
    reply: oneshot::Sender<PendingReply>,
    progress: Option<mpsc::UnboundedSender<Value>>,
}

/// One live connection: a writer task fed by a channel (so a drop guard can send `cancel` synchronously)
/// and a reader task that routes replies and progress by id.
struct Link {
    addr: String,
    out: mpsc::UnboundedSender<Vec<u8>>,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    alive: Arc<AtomicBool>,
    closed: CancellationToken,
}

impl Link {
    fn send(&self, msg: &Value) -> bool {
        let mut bytes = serde_json::to_vec(msg).unwrap_or_default();
        bytes.push(b'\n');
        self.out.send(bytes).is_ok()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// The services as seen by the MCP tools: one kept [`Link`] per instance, made on its first call.
pub struct Backend {
    target: Target,
    /// Default deadline for a request (sent to the service as `timeout`).
    pub timeout: Duration,
    /// By address. Each slot has its own lock, so connecting to one instance never waits on another.
    links: Mutex<HashMap<String, Slot>>,
    next_id: AtomicU64,
    /// Set once a handshake said our token may only read (`"role": "read"`): tools/list then shows only
    /// the read-only tools.
    read_only: AtomicBool,
    /// The token each address was last reached with. A later lookup that finds none (the descriptor was
    /// pruned: a handshake there failed, its service died) still uses it, so a request never goes to that
    /// address unverified once a token was needed there.
    tokens: std::sync::Mutex<HashMap<String, String>>,
}

/// One instance's connection, if made: locked while it is being made, so concurrent first calls make one.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Link>>>>;

/// The instance one tool call goes to (from [`Backend::choose`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub host: String,
    pub port: u16,
    pub addr: String,
}

impl Chosen {
    fn new(host: String, port: u16) -> Self {
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Self { host, port, addr }
    }

    /// Blender on this machine (its temp files are readable here).
    pub fn is_local(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// The descriptor an `instance` argument names: a port first, then an id (the pid `bld-remote ls` prints),
/// then an address `host:port`.
pub fn find<'a>(named: &str, among: &'a [Descriptor]) -> Option<&'a Descriptor> {
    let named = named.trim();
    if let Ok(n) = named.parse::<u64>() {
        return among
            .iter()
            .find(|d| u64::from(d.port) == n)
            .or_else(|| among.iter().find(|d| u64::from(d.pid) == n));
    }
    among.iter().find(|d| {
        d.addr_text() == named
            || named.rsplit_once(':').is_some_and(|(h, p)| {
                p.parse::<u16>() == Ok(d.port)
                    && (h == d.host || (h == "localhost" && d.host == "127.0.0.1"))
            })
    })
}

/// One line per instance, as the errors that ask for an `instance` show them.
pub fn listing(among: &[Descriptor]) -> String {
    among
        .iter()
        .map(|d| {
            format!(
                "  instance {} (id {}, {}): {} Blender {}{}",
                d.port,
                d.pid,
                d.addr_text(),
                if d.mode.is_empty() { "?" } else { &d.mode },
                d.blender_version.as_deref().unwrap_or("?"),
                d.blend_file
                    .as_deref()
                    .map(|f| format!(", {f}"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The descriptors of running instances (their processes alive), read off the async workers. No port is
/// asked: that costs a connection per instance, and a Blender that does not answer now (stopped, swapping)
/// is still one the caller may mean.
async fn running() -> Vec<Descriptor> {
    tokio::task::spawn_blocking(crate::instances::running)
        .await
        .unwrap_or_default()
}

/// Sends `cancel` for a request that is dropped before its reply arrived (the MCP call was cancelled, or
/// the transport dropped the handler).
struct CancelOnDrop {
    link: Arc<Link>,
    id: u64,
    cancel_id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.link.pending.lock().remove(&self.id);
        if self.link.alive.load(Ordering::SeqCst) {
            let sent = self.link.send(&json!({
                "id": self.cancel_id,
                "type": "cancel",
                "params": {"id": self.id},
            }));
            if sent {
                log(&format!("cancel sent for request {}", self.id));
            }
        }
    }
}

/// One line on stderr (stdout belongs to the MCP transport).
pub fn log(message: &str) {
    use std::io::Write;
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "bld-remote mcp: {message}");
}

impl Backend {
    pub fn new(target: Target, timeout: Duration) -> Self {
        Self {
            read_only: AtomicBool::new(target.read_only),
            target,
            timeout,
            links: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            tokens: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn host(&self) -> String {
        self.target
            .host
            .clone()
            .unwrap_or_else(|| DEFAULT_HOST.into())
    }

    /// The one port this server is pinned to: `--port`, else `BLD_REMOTE_MCP_PORT` (0 asks a service for a
    /// free port, so it names none: not pinned).
    pub fn pinned(&self) -> Result<Option<u16>, String> {
        if let Some(port) = self.target.port {
            return Ok(Some(port));
        }
        // Read as every bld_remote reads it (a bad value is an error; `run` refuses it at start).
        Ok(port_from(&ProcessEnv)
            .map_err(|e| e.to_string())?
            .filter(|p| *p != 0))
    }

    /// The instance a tool call goes to, from its `instance` argument (`named`). Pinned (`--port`): that
    /// port, and `named` must be it. Else among the running instances (on `--host`, when given): the one
    /// `named` (port, id or address), or, with none named, the only one; several and none named is an
    /// error that lists them (never a guess), as is a name that matches none. No instance at all and none
    /// named: the default port (services started by other tools write no descriptor). Worked out on every
    /// call, so instances may come and go while the server runs.
    pub async fn choose(&self, named: Option<&str>) -> Result<Chosen, String> {
        let on_host = |all: Vec<Descriptor>| -> Vec<Descriptor> {
            all.into_iter()
                .filter(|d| self.target.host.as_deref().is_none_or(|h| h == d.host))
                .collect()
        };
        if let Some(port) = self.pinned()? {
            let at = Chosen::new(self.host(), port);
            if let Some(n) = named {
                let same = find(n, &on_host(running().await)).is_some_and(|d| d.port == port)
                    || n.trim().parse::<u64>() == Ok(u64::from(port))
                    || n.trim() == at.addr;
                if !same {
                    return Err(format!(
                        "this MCP server is pinned to {} (--port or BLD_REMOTE_MCP_PORT), and instance \
                         {n:?} is not that one. Leave `instance` out, or run `bld-remote mcp` without --port \
                         to reach every running Blender",
                        at.addr
                    ));
                }
            }
            return Ok(at);
        }
        // Several with their processes alive and none named: refused even when some do not answer now
        // (the one that does may not be the one the caller means).
        let found = on_host(running().await);
        let Some(n) = named else {
            return match found.as_slice() {
                [] => Ok(Chosen::new(self.host(), DEFAULT_PORT)),
                [d] => Ok(Chosen::new(d.host.clone(), d.port)),
                several => Err(format!(
                    "{} Blender instances are running; say which with the `instance` argument (its port \
                     or id; list_instances shows them):\n{}",
                    several.len(),
                    listing(several)
                )),
            };
        };
        match find(n, &found) {
            Some(d) => Ok(Chosen::new(d.host.clone(), d.port)),
            None if found.is_empty() => Err(format!(
                "no Blender instance {n:?}: none is running (no instance descriptors in {}). Start one \
                 with `bld-remote start`",
                crate::instances::runtime_dir().display()
            )),
            None => Err(format!(
                "no Blender instance {n:?} (`instance` takes a port or an id, as list_instances shows \
                 them). Running:\n{}",
                listing(&found)
            )),
        }
    }

    /// Every running instance (on `--host`, when given) as `list_instances` shows it: its descriptor (the
    /// token left out) and whether its port answers now as that instance, asked of all at once (each
    /// within 2 s, as `bld-remote ls` asks).
    pub async fn survey(&self) -> Vec<Value> {
        let found: Vec<Descriptor> = running()
            .await
            .into_iter()
            .filter(|d| self.target.host.as_deref().is_none_or(|h| h == d.host))
            .collect();
        let mut checks = tokio::task::JoinSet::new();
        for (i, d) in found.into_iter().enumerate() {
            checks.spawn_blocking(move || {
                let verdict = crate::instances::check(&d, Duration::from_secs(2));
                (i, d, verdict)
            });
        }
        let mut done = Vec::new();
        while let Some(r) = checks.join_next().await {
            if let Ok(r) = r {
                done.push(r);
            }
        }
        done.sort_by_key(|(i, ..)| *i);
        done.into_iter()
            .map(|(_, d, verdict)| {
                let mut v = json!({
                    "instance": d.port,
                    "id": d.pid,
                    "host": d.host,
                    "port": d.port,
                    "pid": d.pid,
                    "mode": d.mode,
                    "blender_version": d.blender_version,
                    "blend_file": d.blend_file,
                    "started": d.started,
                    "token_required": d.auth,
                    "answers": verdict.is_ok(),
                });
                if let (Err(why), Value::Object(m)) = (verdict, &mut v) {
                    m.insert("problem".into(), Value::String(why.to_string()));
                }
                v
            })
            .collect()
    }

    /// The live connection, or a new one.
    #[allow(clippy::too_many_lines)] // one linear path: resolve, connect, verify, spawn the two tasks
    async fn connection(&self, at: &Chosen) -> Result<Arc<Link>, CallError> {
        let slot = {
            let mut links = self.links.lock();
            // Forget the instances whose connection is gone (they may never come back: a restarted
            // Blender usually gets a new port), so the map holds at most one entry per live instance.
            links.retain(|k, slot| {
                *k == at.addr
                    || slot.try_lock().map_or(true, |l| {
                        l.as_ref().is_some_and(|l| l.alive.load(Ordering::SeqCst))
                    })
            });
            Arc::clone(links.entry(at.addr.clone()).or_default())
        };
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.alive.load(Ordering::SeqCst) {
                return Ok(Arc::clone(c));
            }
        }
        *guard = None;
        let (host, port, addr) = (at.host.clone(), at.port, at.addr.clone());
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(CallError::Unreachable(format!(
                    "Blender is not reachable: cannot connect to the bld_remote service at {addr} ({e}). \
                     Is Blender running with the service started (`bld-remote start`, or the add-on)?"
                )))
            }
            Err(_) => {
                return Err(CallError::Unreachable(format!(
                    "Blender is not reachable: connecting to {addr} timed out after {} s",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        let dialed = stream.peer_addr().ok();
        let (read_half, mut write_half) = stream.into_split();
        let mut reader = BufReader::with_capacity(1 << 20, read_half);
        self.verify(&mut reader, &mut write_half, &host, port, dialed, &addr)
            .await?;
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::new(Mutex::new(HashMap::new()));
        let alive = Arc::new(AtomicBool::new(true));
        let closed = CancellationToken::new();

        // Writer: one write per message.
        {
            let alive = Arc::clone(&alive);
            let closed = closed.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        msg = out_rx.recv() => {
                            let Some(msg) = msg else { break };
                            if write_half.write_all(&msg).await.is_err() {
                                alive.store(false, Ordering::SeqCst);
                                break;
                            }
                        }
                        () = closed.cancelled() => break,
                    }
                }
                let _ = write_half.shutdown().await;
            });
        }
        // Reader: route replies and progress lines by id; on EOF fail everything in flight.
        {
            let alive = Arc::clone(&alive);
            let pending = Arc::clone(&pending);
            let closed = closed.clone();
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let why = loop {
                    line.clear();
                    let n = tokio::select! {
                        r = reader.read_until(b'\n', &mut line) => r,
                        () = closed.cancelled() => break "the connection was closed".to_string(),
                    };
                    match n {
                        Ok(0) => break "the service closed the connection".to_string(),
                        Err(e) => break e.to_string(),
                        Ok(_) => {}
                    }
                    let Ok(Value::Object(msg)) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    route(&pending, msg);
                };
                alive.store(false, Ordering::SeqCst);
                let lost: Vec<Pending> = pending.lock().drain().map(|(_, p)| p).collect();
                for p in lost {
                    let _ = p.reply.send(Err(CallError::Lost(format!(
                        "the connection to Blender ({addr}) was lost while the request was in flight ({why}); \
                         it may or may not have run. Blender may have quit or crashed; the next call \
                         reconnects"
                    ))));
                }
            });
        }
        let link = Arc::new(Link {
            addr,
            out: out_tx,
            pending,
            alive,
            closed,
        });
        *guard = Some(Arc::clone(&link));
        Ok(link)
    }

    /// With a token for `host:port` (explicit, else `$BLD_REMOTE_TOKEN` if not `auto`, else the owner-only
    /// instance descriptor's; resolved per connection, as the target may change on reconnect): the
    /// handshake, before anything else is sent. The token only keys the proofs; it is never sent.
    async fn verify(
        &self,
        reader: &mut BufReader<OwnedReadHalf>,
        writer: &mut OwnedWriteHalf,
        host: &str,
        port: u16,
        dialed: Option<std::net::SocketAddr>,
        addr: &str,
    ) -> Result<(), CallError> {
        // `--read-only` without an explicit token: the instance's read token, if its descriptor has one.
        let read = if self.target.read_only && self.target.token.is_none() {
            crate::instances::read_token_for(host, port)
        } else {
            None
        };
        let resolved =
            read.or_else(|| crate::instances::resolve_token(self.target.token.clone(), host, port));
        let token = match self.tokens.lock() {
            Ok(mut known) => match resolved {
                Some(t) => {
                    known.insert(addr.to_string(), t.clone());
                    Some(t)
                }
                None => known.get(addr).cloned(),
            },
            Err(_) => resolved,
        };
        let Some(token) = token else {
            return Ok(());
        };
        let first_id = self.next_id.fetch_add(2, Ordering::Relaxed);
        let verified = match dialed {
            None => Err("the connection has no peer address".to_string()),
            Some(dialed) => tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake(reader, writer, &token, dialed, first_id),
            )
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer to the handshake within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ))
            }),
        };
        match verified {
            Err(detail) => {
                let _ = writer.shutdown().await;
                Err(CallError::Service(ClientError::Unverified {
                    addr: addr.to_string(),
                    detail,
                }))
            }
            Ok(read) => {
                if read {
                    self.read_only.store(true, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    /// `--read-only` was asked for: only read-only tools, whatever the token's role.
    pub fn forced_read_only(&self) -> bool {
        self.target.read_only
    }

    /// Whether our token may only read (always, with `--read-only`): known after a handshake; before one,
    /// the default instance is connected to (if it can be chosen) to learn it. Unknown (no Blender yet):
    /// false.
    pub async fn read_only(&self) -> bool {
        if !self.read_only.load(Ordering::Relaxed) {
            if let Ok(at) = self.choose(None).await {
                let _ = self.connection(&at).await;
            }
        }
        self.read_only.load(Ordering::Relaxed)
    }

    /// Send one request and wait for its result. Progress lines go to `progress` (only framed requests get
    /// them; ours always are). `ct` cancelled → `cancel` is sent and [`CallError::Cancelled`] returned.
    pub async fn call(
        &self,
        at: &Chosen,
        command: &str,
        params: Map<String, Value>,
        timeout: Option<Duration>,
        progress: Option<mpsc::UnboundedSender<Value>>,
        ct: &CancellationToken,
    ) -> Result<Value, CallError> {
        let link = self.connection(at).await?;
        let timeout = timeout.unwrap_or(self.timeout);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        link.pending.lock().insert(
            id,
            Pending {
                reply: tx,
                progress,
            },
        );
        let request = json!({
            "id": id,
            "type": command,
            "params": Value::Object(params),
            "timeout": timeout.as_secs_f64().max(0.001),
        });
        let mut guard = CancelOnDrop {
            link: Arc::clone(&link),
            id,
            cancel_id,
            armed: true,
        };
        if !link.send(&request) {
            guard.armed = false;
            link.pending.lock().remove(&id);
            return Err(CallError::Lost(format!(
                "the connection to Blender ({}) was lost before the request was sent; it did not run",
                link.addr
            )));
        }
        let outcome = tokio::select! {
            r = rx => r.unwrap_or_else(|_| Err(CallError::Lost("the connection to Blender was lost".into()))),
            () = tokio::time::sleep(timeout + REPLY_GRACE) => Err(CallError::Service(ClientError::Timeout {
                addr: link.addr.clone(),
                detail: format!(
                    "Blender did not answer within {:.0} s; the request may still be running (it was \
                     cancelled if it had not started)",
                    timeout.as_secs_f64()
                ),
                ran: None,
            })),
            () = ct.cancelled() => Err(CallError::Cancelled),
        };
        // A reply (success or error) settles the request; anything else leaves the guard armed to cancel it.
        let reply = match outcome {
            Ok(reply) => {
                guard.armed = false;
                reply
            }
            Err(e) => {
                if matches!(e, CallError::Lost(_)) {
                    guard.armed = false;
                } else {
                    drop(guard);
                }
                return Err(e);
            }
        };
        interpret_reply(&link.addr, reply).map_err(CallError::Service)
    }
}

/// Prove, on a fresh connection and before anything else is sent, that both ends hold `token`
/// ([`bld_remote_core::auth`]): the service first, for the address dialed. `Err` says why it is not trusted.
async fn handshake(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    token: &str,
    dialed: std::net::SocketAddr,
    first_id: u64,
) -> Result<bool, String> {
    let hs = ClientHandshake::new()?;
    let challenge = exchange(
        reader,
        writer,
        first_id,
        auth::CHALLENGE,
        hs.challenge_params(),
    )
    .await?;
    let proof = hs.answer(token, dialed, &challenge)?;
    let done = exchange(reader, writer, first_id + 1, auth::AUTHENTICATE, proof).await?;
    Ok(done.get("role").and_then(Value::as_str) == Some("read"))
}

/// One handshake request and its reply, read with a size limit (the peer is not trusted yet).
async fn exchange(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    id: u64,
    command: &str,
    params: Map<String, Value>,
) -> Result<Value, String> {
    let mut bytes = serde_json::to_vec(&json!({"id": id, "type": command, "params": params}))
        .unwrap_or_default();
    bytes.push(b'\n');
    writer
        .write_all(&bytes)
        .await
        .map_err(|e| format!("{command} could not be sent: {e}"))?;
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(HANDSHAKE_REPLY_LIMIT)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("{command} got no reply: {e}"))?;
    if n == 0 {
        return Err(format!(
            "it closed the connection without answering {command}"
        ));
    }
    if !line.ends_with(b"\n") {
        return Err(format!(
            "its reply to {command} is cut short or larger than {HANDSHAKE_REPLY_LIMIT} bytes"
        ));
    }
    let reply = match serde_json::from_slice::<Value>(&line) {
        Ok(Value::Object(r)) if r.get("id").and_then(Value::as_u64) == Some(id) => r,
        Ok(Value::Object(r)) if !r.contains_key("id") && r.contains_key("status") => r,
        _ => return Err(format!("its reply to {command} is not a bld_remote reply")),
    };
    interpret_reply("", reply).map_err(|e| {
        format!("it answered {command} with an error ({e}): not a bld_remote service with the handshake")
    })
}

fn route(pending: &Mutex<HashMap<u64, Pending>>, msg: Map<String, Value>) {
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        // An id-less message is an error about the stream itself; the close that follows fails the calls.
        if let Some(m) = msg.get("message").and_then(Value::as_str) {
            log(&format!("service: {m}"));
        }
        return;
    };
    if !msg.contains_key("status") {
        if let Some(p) = msg.get("progress") {
            if let Some(tx) = pending.lock().get(&id).and_then(|p| p.progress.as_ref()) {
                let _ = tx.send(p.clone());
            }
        }
        return;
    }
    if let Some(p) = pending.lock().remove(&id) {
        let _ = p.reply.send(Ok(msg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(pid: u32, port: u16) -> Descriptor {
        serde_json::from_value(
            json!({"pid": pid, "host": "127.0.0.1", "port": port, "started_at": 0.0}),
        )
        .unwrap()
    }

    #[test]
    fn an_instance_is_found_by_port_first_then_id_then_address() {
        // The second's pid is the first's port: a number names a port before an id.
        let among = [desc(111, 6688), desc(6688, 7000)];
        let port_of = |n: &str| find(n, &among).map(|d| d.port);
        assert_eq!(port_of("6688"), Some(6688));
        assert_eq!(port_of(" 7000 "), Some(7000));
        assert_eq!(port_of("111"), Some(6688));
        assert_eq!(port_of("127.0.0.1:7000"), Some(7000));
        assert_eq!(port_of("localhost:7000"), Some(7000));
        assert_eq!(port_of("10.0.0.1:7000"), None);
        assert_eq!(port_of("5"), None);
        assert_eq!(port_of("nope"), None);
        let l = listing(&among);
        assert!(l.contains("instance 6688 (id 111, 127.0.0.1:6688)"), "{l}");
    }

    #[test]
    fn progress_lines_go_to_their_call_only() {
        let pending = Mutex::new(HashMap::new());
        let (tx, mut rx) = oneshot::channel();
        let (ptx, mut prx) = mpsc::unbounded_channel();
        pending.lock().insert(
            7,
            Pending {
                reply: tx,
                progress: Some(ptx),
            },
        );
        let Value::Object(p) = json!({"id": 7, "progress": {"progress": 1, "total": 4}}) else {
            return;
        };
        route(&pending, p);
        assert_eq!(
            prx.try_recv().ok(),
            Some(json!({"progress": 1, "total": 4}))
        );
        assert!(rx.try_recv().is_err());
        let Value::Object(r) = json!({"id": 7, "status": "success", "result": 1}) else {
            return;
        };
        route(&pending, r);
        assert!(rx.try_recv().is_ok_and(|r| r.is_ok()));
        assert!(pending.lock().is_empty());
    }
}
