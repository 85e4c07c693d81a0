//! The client that `bld-remote` and `bld_remote.Client` share: one TCP connection to a running service,
//! speaking the framed mode (every request carries an `id`; replies are one JSON object per line). Pure Rust;
//! runs on whatever thread calls it (the Python binding calls it with the GIL released).
//!
//! Replies of any size: the reader keeps one growing buffer and searches only the bytes that arrived since the
//! last search for the terminating newline, so a 100 MB reply costs one pass. Long waits are sliced (at most
//! `POLL` each) so the caller's `interrupted` hook runs often enough for Ctrl+C to work.
//!
//! The token never leaves this process: with a token, each new connection first runs the challenge-response
//! handshake of [`crate::auth`] (the service proves it holds the token for the address we dialed, then
//! we prove it), and requests on the connection carry no `token` field. A service that cannot prove it (a port
//! squatter, a wrong token, a service older than the handshake) is refused with [`ClientError::Unverified`]
//! before anything else is sent.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::auth::{self, ClientHandshake};
use crate::jobs::Phase;

/// Longest single blocking wait, so that an interrupt (Ctrl+C) is noticed quickly.
const POLL: Duration = Duration::from_millis(100);
/// Extra time the client waits beyond the deadline it sends, so the service's own "timed out" reply (which
/// says whether the request ran) normally arrives before the client gives up on its own.
const GRACE: Duration = Duration::from_secs(2);
const READ_CHUNK: usize = 1 << 20;
/// Longest the handshake may take: the service answers it on its network threads, at once even when
/// Blender is busy, so a peer that takes longer is not a service worth trusting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest handshake reply read from a peer not yet trusted (a real one is about 300 bytes).
const HANDSHAKE_REPLY_LIMIT: usize = 64 * 1024;
/// Requests sent with [`Client::send`] whose replies are not read yet; one more first reads the oldest.
const MAX_PENDING: usize = 1024;
/// Replies read early for pending requests, and pending requests whose connection broke, kept for
/// [`Client::receive`]; past this many the oldest are forgotten (their `receive` then says so).
const MAX_KEPT: usize = 4096;

/// Everything that can go wrong talking to a service.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing accepted the connection (no service on that port, or it is not reachable).
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The connection broke or closed before the reply was complete.
    Lost { addr: String, detail: String },
    /// No reply within the timeout (client side), or the service says the request timed out.
    Timeout {
        addr: String,
        detail: String,
        /// Whether the request had started in Blender: `Some(false)` means it never ran and never will
        /// (safe to retry); `Some(true)` that it started (its side effects may have happened); `None`
        /// that nobody can tell (the client gave up waiting on its own).
        ran: Option<bool>,
    },
    /// The service answered with an error reply (the remote code raised, unknown command, auth...).
    Remote {
        message: String,
        exception: Option<String>,
        traceback: Option<String>,
        /// The whole error reply, for fields such as `output` (partial stdout/stderr) or `ran`.
        reply: Map<String, Value>,
    },
    /// Something answered, but not with this protocol.
    Protocol { addr: String, detail: String },
    /// The peer could not prove that it holds the service token (challenge-response handshake), so
    /// nothing secret, and no request, was sent to it.
    Unverified { addr: String, detail: String },
    /// The caller's interrupt hook fired (Ctrl+C, SIGTERM) while waiting.
    Interrupted,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect { addr, source } if source.kind() == ErrorKind::ConnectionRefused => write!(
                f,
                "cannot connect to bld_remote at {addr}: connection refused (is Blender running with the \
                 service started? `bld-remote ls` lists running instances)"
            ),
            Self::Connect { addr, source } => {
                write!(f, "cannot connect to bld_remote at {addr}: {source}")
            }
            Self::Lost { addr, detail } => write!(f, "connection to {addr} lost: {detail}"),
            Self::Timeout { addr, detail, .. } => write!(f, "{addr}: {detail}"),
            Self::Remote { message, .. } => f.write_str(message),
            Self::Protocol { addr, detail } => {
                write!(f, "{addr} does not speak the bld_remote protocol: {detail}")
            }
            Self::Unverified { addr, detail } => write!(
                f,
                "could not verify that {addr} is the bld_remote service this token belongs to: {detail}. \
                 Nothing was sent to it: not the token (which never crosses the wire) and not the request. \
                 If that Blender was killed, another program may now hold its port (`bld-remote ls` lists \
                 the live instances); a service older than the handshake must be updated"
            ),
            Self::Interrupted => f.write_str("interrupted"),
        }
    }
}

impl std::error::Error for ClientError {}

/// The one reading of a service reply, shared by every client (this one, the MCP server's): a success is
/// its `result`; an error with `"timeout": true` is a [`ClientError::Timeout`] whose `ran` comes from the
/// fields; any other error is [`ClientError::Remote`] with the whole reply kept.
pub fn interpret_reply(addr: &str, mut reply: Map<String, Value>) -> Result<Value, ClientError> {
    match reply.get("status").and_then(Value::as_str) {
        Some("success") => Ok(reply.remove("result").unwrap_or(Value::Null)),
        Some("error") => {
            let message = reply
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the service replied with an error and no message")
                .to_string();
            if reply.get("timeout").and_then(Value::as_bool) == Some(true) {
                return Err(ClientError::Timeout {
                    addr: addr.to_string(),
                    detail: message,
                    ran: ran_field(&reply),
                });
            }
            let text = |k: &str| reply.get(k).and_then(Value::as_str).map(str::to_string);
            Err(ClientError::Remote {
                exception: text("exception"),
                traceback: text("traceback"),
                message,
                reply,
            })
        }
        _ => Err(ClientError::Protocol {
            addr: addr.to_string(),
            detail: "reply has no 'status'".into(),
        }),
    }
}

/// Whether a request ran, from the fields of the service's error reply (never from its text): `ran` is
/// `false` when it never ran; `state: "running"` when it had started (`ran` is then `"unknown"`: it may
/// still be running).
pub fn ran_field(reply: &Map<String, Value>) -> Option<bool> {
    match reply.get("ran") {
        Some(Value::Bool(b)) => Some(*b),
        _ if reply.get("state").and_then(Value::as_str) == Some(Phase::Running.name()) => {
            Some(true)
        }
        _ => None,
    }
}

/// What `execute_code` returned, in the shape scripts want.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    /// The code's `result` variable (JSON), `None` when it set none.
    pub result: Option<Value>,
    /// Seconds the code ran in Blender.
    pub duration: f64,
    /// What the code changed in the scene (`changes` in the reply), when it was asked for.
    pub changes: Option<Value>,
}

/// A connection to one service. Not shared between threads; reconnects on the next call after a failure.
#[derive(Debug)]
pub struct Client {
    host: String,
    port: u16,
    /// Per request: how long to wait for the reply. `None`: as long as it takes.
    timeout: Option<Duration>,
    token: Option<String>,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    next_id: u64,
    /// Ids of requests sent with [`Client::send`] on the current connection, reply not read yet, oldest
    /// first. Their replies are kept when another call reads past them.
    pending: VecDeque<u64>,
    /// What [`Client::receive`] will return for a sent request: its reply, read early, or why it will
    /// never come (the connection broke first). Oldest first, at most `MAX_KEPT`.
    kept: HashMap<u64, Kept>,
    kept_order: VecDeque<u64>,
    /// Pending requests sent quiet (`"quiet": true`): the service replies only if it refuses them, so a
    /// reply to any later request of ours means they were accepted.
    quiet: BTreeSet<u64>,
}

#[derive(Debug)]
enum Kept {
    Reply(Map<String, Value>),
    Lost(String),
}

/// A fresh id for a job this client submits (`submit_code_job`'s optional `job_id`): `job-` and 16
/// random hex digits, so a submission can be followed by requests about it before its reply arrives.
pub fn new_job_id() -> Result<String, ClientError> {
    auth::random_hex(8)
        .map(|h| format!("job-{h}"))
        .map_err(|detail| ClientError::Protocol {
            addr: String::new(),
            detail,
        })
}

/// A hook polled during waits; returning true abandons the call with [`ClientError::Interrupted`].
pub type Interrupt<'a> = &'a (dyn Fn() -> bool + Sync);

fn never() -> bool {
    false
}

impl Client {
    pub fn new(
        host: impl Into<String>,
        port: u16,
        timeout: Option<Duration>,
        token: Option<String>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            timeout,
            token: token.filter(|t| !t.is_empty()),
            stream: None,
            buf: Vec::new(),
            next_id: 1,
            pending: VecDeque::new(),
            kept: HashMap::new(),
            kept_order: VecDeque::new(),
            quiet: BTreeSet::new(),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    pub fn addr_text(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Close the connection (the next call opens a new one). Requests sent with [`Client::send`] whose
    /// replies were not read yet will never get one: their [`Client::receive`] says the outcome is unknown.
    pub fn close(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.buf.clear();
        self.quiet.clear();
        while let Some(id) = self.pending.pop_front() {
            self.keep(
                id,
                Kept::Lost(
                    "the connection closed before its reply was read: it may or may not have run"
                        .into(),
                ),
            );
        }
    }

    fn keep(&mut self, id: u64, k: Kept) {
        if self.kept.insert(id, k).is_none() {
            self.kept_order.push_back(id);
        }
        while self.kept_order.len() > MAX_KEPT {
            if let Some(old) = self.kept_order.pop_front() {
                self.kept.remove(&old);
            }
        }
    }

    /// A reply to our request `later` arrived: every quiet request sent before it was accepted.
    fn settle_quiet_before(&mut self, later: u64) {
        let accepted: Vec<u64> = self.quiet.range(..later).copied().collect();
        for q in accepted {
            self.quiet.remove(&q);
            self.pending.retain(|&p| p != q);
            let mut reply = Map::new();
            reply.insert("status".into(), Value::from("success"));
            reply.insert("result".into(), Value::Null);
            reply.insert("id".into(), Value::from(q));
            self.keep(q, Kept::Reply(reply));
        }
    }

    fn take_kept(&mut self, id: u64) -> Option<Kept> {
        let k = self.kept.remove(&id)?;
        self.kept_order.retain(|&i| i != id);
        Some(k)
    }

    /// Send one request without waiting for its reply (pipelining): returns its id, for
    /// [`Client::receive`]. Other calls on this client keep its reply when they read past it. At most
    /// `MAX_PENDING` are outstanding: one more first reads the oldest one's reply (and keeps it).
    pub fn send(&mut self, command: &str, params: Map<String, Value>) -> Result<u64, ClientError> {
        self.send_with(command, params, &never)
    }

    /// [`Client::send`], polling `interrupted` while connecting (the handshake) or making room.
    pub fn send_with(
        &mut self,
        command: &str,
        params: Map<String, Value>,
        interrupted: Interrupt<'_>,
    ) -> Result<u64, ClientError> {
        self.send_inner(command, params, false, interrupted)
    }

    /// [`Client::send_with`] for a command the service can accept quietly (`submit_code_job`): it replies
    /// only if it refuses it. Its [`Client::receive`] is answered by the reply to any request sent after it,
    /// so send one before receiving it.
    pub fn send_quiet_with(
        &mut self,
        command: &str,
        mut params: Map<String, Value>,
        interrupted: Interrupt<'_>,
    ) -> Result<u64, ClientError> {
        params.insert("quiet".into(), Value::Bool(true));
        self.send_inner(command, params, true, interrupted)
    }

    fn send_inner(
        &mut self,
        command: &str,
        params: Map<String, Value>,
        quiet: bool,
        interrupted: Interrupt<'_>,
    ) -> Result<u64, ClientError> {
        let deadline = self
            .timeout
            .and_then(|t| Instant::now().checked_add(t + GRACE));
        if self.pending.len() >= MAX_PENDING {
            if let Some(oldest) = self.pending.front().copied() {
                match self.read_reply_for(oldest, deadline, interrupted) {
                    Ok(reply) => self.keep(oldest, Kept::Reply(reply)),
                    Err(e) => {
                        self.close();
                        return Err(e);
                    }
                }
            }
        }
        let (id, bytes) = self.encode(command, params)?;
        if self.pending.is_empty() {
            self.drop_if_closed_by_peer();
        }
        let reused = self.stream.is_some();
        self.connect(deadline, interrupted)?;
        if let Err(e) = self.write_request(&bytes) {
            // As in `call`: on a kept connection with nothing outstanding, the service may have closed it
            // idle; the request never reached it, so one fresh attempt is safe.
            if !reused || !self.pending.is_empty() {
                self.close();
                return Err(e);
            }
            self.close();
            self.connect(deadline, interrupted)?;
            if let Err(e) = self.write_request(&bytes) {
                self.close();
                return Err(e);
            }
        }
        self.pending.push_back(id);
        if quiet {
            self.quiet.insert(id);
        }
        Ok(id)
    }

    /// The reply to a request sent with [`Client::send`] (read now, or kept from earlier), as
    /// [`Client::call`] returns it. An id this client never sent, or whose reply was already received,
    /// is a protocol error.
    pub fn receive(&mut self, id: u64) -> Result<Value, ClientError> {
        self.receive_with(id, &never)
    }

    /// [`Client::receive`], polling `interrupted` at least every 100 ms while waiting.
    pub fn receive_with(
        &mut self,
        id: u64,
        interrupted: Interrupt<'_>,
    ) -> Result<Value, ClientError> {
        let addr = self.addr_text();
        match self.take_kept(id) {
            Some(Kept::Reply(mut reply)) => return self.interpret(&mut reply),
            Some(Kept::Lost(detail)) => return Err(ClientError::Lost { addr, detail }),
            None => {}
        }
        if !self.pending.contains(&id) {
            return Err(ClientError::Protocol {
                addr,
                detail: format!(
                    "no reply is owed to request {id} (never sent by this client, already received, or \
                     forgotten among more than {MAX_KEPT} unread replies)"
                ),
            });
        }
        let deadline = self
            .timeout
            .and_then(|t| Instant::now().checked_add(t + GRACE));
        match self.read_reply_for(id, deadline, interrupted) {
            Ok(mut reply) => self.interpret(&mut reply),
            Err(e) => {
                // The stream is in an unknown state: every request still pending on it is lost with it.
                self.close();
                Err(e)
            }
        }
    }

    /// Read replies until `id`'s (a pending request), keeping those of other pending requests.
    fn read_reply_for(
        &mut self,
        id: u64,
        deadline: Option<Instant>,
        interrupted: Interrupt<'_>,
    ) -> Result<Map<String, Value>, ClientError> {
        loop {
            if let Some(Kept::Reply(reply)) = self.take_kept(id) {
                return Ok(reply);
            }
            let reply = self.read_reply(deadline, interrupted)?;
            if let Some(got) = reply.get("id").and_then(Value::as_u64) {
                if got == id || self.pending.contains(&got) {
                    self.settle_quiet_before(got);
                }
            }
            match reply.get("id").and_then(Value::as_u64) {
                Some(got) if got == id => {
                    self.pending.retain(|&p| p != id);
                    self.quiet.remove(&id);
                    return Ok(reply);
                }
                Some(got) if self.pending.contains(&got) => {
                    if reply.contains_key("progress") && !reply.contains_key("status") {
                        continue;
                    }
                    self.pending.retain(|&p| p != got);
                    self.quiet.remove(&got);
                    self.keep(got, Kept::Reply(reply));
                }
                // An id-less error is about the stream itself (malformed, too large, closed idle): it
                // ends the connection, and the oldest request in flight is the one it answers.
                None if reply.contains_key("status") => {
                    self.pending.retain(|&p| p != id);
                    return Ok(reply);
                }
                _ => {}
            }
        }
    }

    /// One reply object off the stream.
    fn read_reply(
        &mut self,
        deadline: Option<Instant>,
        interrupted: Interrupt<'_>,
    ) -> Result<Map<String, Value>, ClientError> {
        let line = self.read_line(deadline, usize::MAX, interrupted)?;
        match serde_json::from_slice::<Value>(&line) {
            Ok(Value::Object(reply)) => Ok(reply),
            Ok(_) => Err(ClientError::Protocol {
                addr: self.addr_text(),
                detail: "reply is not a JSON object".into(),
            }),
            Err(e) => Err(ClientError::Protocol {
                addr: self.addr_text(),
                detail: format!("reply is not JSON: {e}"),
            }),
        }
    }

    fn encode(
        &mut self,
        command: &str,
        params: Map<String, Value>,
    ) -> Result<(u64, Vec<u8>), ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({"type": command, "params": Value::Object(params), "id": id});
        if let Value::Object(m) = &mut request {
            if let Some(t) = self.timeout {
                // The service drops the request if it is still queued when this runs out.
                m.insert("timeout".into(), json!(t.as_secs_f64().max(0.001)));
            }
            // No `token` field: a connection with a token is authenticated by the handshake.
        }
        let mut bytes = serde_json::to_vec(&request).map_err(|e| ClientError::Protocol {
            addr: self.addr_text(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        bytes.push(b'\n');
        Ok((id, bytes))
    }

    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    /// A kept connection that the service has closed, or written to while we sent nothing (its idle-timeout
    /// notice), is dropped before a request goes out on it: nothing was sent on it, so the fresh connection
    /// that replaces it is not a retry.
    fn drop_if_closed_by_peer(&mut self) {
        let Some(s) = &self.stream else {
            return;
        };
        let mut byte = [0u8; 1];
        if s.set_nonblocking(true).is_err() {
            self.close();
            return;
        }
        let closed = match s.peek(&mut byte) {
            Ok(_) => true,
            Err(e) => e.kind() != ErrorKind::WouldBlock,
        };
        if closed || s.set_nonblocking(false).is_err() {
            self.close();
        }
    }

    fn connect(
        &mut self,
        deadline: Option<Instant>,
        interrupted: Interrupt<'_>,
    ) -> Result<(), ClientError> {
        if self.stream.is_some() {
            return Ok(());
        }
        let addr = self.addr_text();
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?
            .collect();
        let connect_timeout = deadline
            .map_or(Duration::from_secs(10), |d| {
                d.saturating_duration_since(Instant::now())
            })
            .clamp(Duration::from_millis(1), Duration::from_secs(10));
        let mut last =
            std::io::Error::new(ErrorKind::NotFound, "the host name resolved to nothing");
        for a in addrs {
            match TcpStream::connect_timeout(&a, connect_timeout) {
                Ok(s) => {
                    // One write per request; without this a small request can sit 40 ms in Nagle's buffer.
                    let _ = s.set_nodelay(true);
                    self.stream = Some(s);
                    self.buf.clear();
                    let Some(token) = self.token.clone() else {
                        return Ok(());
                    };
                    let verified = self.handshake(&token, deadline, interrupted);
                    if verified.is_err() {
                        self.close();
                    }
                    return verified;
                }
                Err(e) => last = e,
            }
        }
        if last.kind() == ErrorKind::TimedOut {
            return Err(ClientError::Timeout {
                addr,
                detail: "timed out connecting".into(),
                ran: Some(false),
            });
        }
        Err(ClientError::Connect { addr, source: last })
    }

    /// Send one request and wait for its reply. Returns the `result` of a success reply.
    pub fn call(
        &mut self,
        command: &str,
        params: Map<String, Value>,
    ) -> Result<Value, ClientError> {
        self.call_with(command, params, &never)
    }

    /// [`Client::call`], polling `interrupted` at least every 100 ms while waiting.
    pub fn call_with(
        &mut self,
        command: &str,
        params: Map<String, Value>,
        interrupted: Interrupt<'_>,
    ) -> Result<Value, ClientError> {
        let started = Instant::now();
        let deadline = self.timeout.and_then(|t| started.checked_add(t + GRACE));
        let (id, bytes) = self.encode(command, params)?;
        let result = self.round_trip(&bytes, id, deadline, interrupted);
        if result
            .as_ref()
            .is_err_and(|e| !matches!(e, ClientError::Remote { .. }))
        {
            // The stream is in an unknown state (half a reply may still arrive): start afresh next time.
            self.close();
        }
        result
    }

    fn round_trip(
        &mut self,
        request: &[u8],
        id: u64,
        deadline: Option<Instant>,
        interrupted: Interrupt<'_>,
    ) -> Result<Value, ClientError> {
        // With replies owed to sent requests, bytes waiting on the stream are theirs, not a closing notice.
        let outstanding = !self.pending.is_empty();
        if !outstanding {
            self.drop_if_closed_by_peer();
        }
        let reused = self.stream.is_some();
        self.connect(deadline, interrupted)?;
        if let Err(e) = self.write_request(request) {
            if !reused || outstanding {
                return Err(e);
            }
            // The service may have closed an idle connection: retry once on a new one. Safe, because
            // nothing was read back, and a request the service never fully received never ran.
            self.close();
            self.connect(deadline, interrupted)?;
            self.write_request(request)?;
        }
        // Whether this request may still be sent again on a fresh connection: only when the service says,
        // on a reused connection, that it closed it without reading the request (`ran: false`). A
        // connection that breaks with nothing read back is never a reason to resend: the service may have
        // read the request and died running it (outcome unknown, never replayed blindly).
        let mut may_retry = reused && !outstanding;
        loop {
            let mut reply = self.read_reply(deadline, interrupted)?;
            // Ours: our id, or an id-less error about the stream itself (malformed, too large...). A reply to
            // a request sent with `send` is kept for its `receive`; anything else is a stray reply to an
            // earlier, abandoned request.
            if let Some(got) = reply.get("id").and_then(Value::as_u64) {
                if got == id || self.pending.contains(&got) {
                    self.settle_quiet_before(got);
                }
            }
            let ours = match reply.get("id") {
                Some(v) if v.as_u64() == Some(id) => true,
                Some(v) => {
                    let other = v.as_u64().filter(|o| self.pending.contains(o));
                    let progress = reply.contains_key("progress") && !reply.contains_key("status");
                    if let (Some(other), false) = (other, progress) {
                        self.pending.retain(|&p| p != other);
                        self.quiet.remove(&other);
                        self.keep(other, Kept::Reply(std::mem::take(&mut reply)));
                    }
                    continue;
                }
                None => reply.contains_key("status"),
            };
            if !ours {
                continue;
            }
            if reply.contains_key("progress") && !reply.contains_key("status") {
                continue;
            }
            // An id-less notice that the connection was closed before this request was read (the idle
            // timeout raced our send): it never ran, so one fresh attempt is safe.
            if may_retry
                && !reply.contains_key("id")
                && reply.get("ran") == Some(&Value::Bool(false))
            {
                may_retry = false;
                self.close();
                self.connect(deadline, interrupted)?;
                self.write_request(request)?;
                continue;
            }
            return self.interpret(&mut reply);
        }
    }

    fn interpret(&self, reply: &mut Map<String, Value>) -> Result<Value, ClientError> {
        interpret_reply(&self.addr_text(), std::mem::take(reply))
    }

    fn write_request(&mut self, request: &[u8]) -> Result<(), ClientError> {
        let addr = self.addr_text();
        let Some(stream) = self.stream.as_mut() else {
            return Err(ClientError::Lost {
                addr,
                detail: "not connected".into(),
            });
        };
        // Large requests can block on a full socket buffer; a write timeout keeps that bounded.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(60)));
        stream
            .write_all(request)
            .and_then(|()| stream.flush())
            .map_err(|e| ClientError::Lost {
                addr,
                detail: format!("sending the request failed: {e}"),
            })
    }

    /// Prove, on the fresh connection, that both ends hold `token` (`crate::auth`), the service first.
    /// Nothing secret is sent before the service's proof checks out.
    fn handshake(
        &mut self,
        token: &str,
        deadline: Option<Instant>,
        interrupted: Interrupt<'_>,
    ) -> Result<(), ClientError> {
        let unverified = |addr: String, detail: String| ClientError::Unverified { addr, detail };
        let limit = Instant::now() + HANDSHAKE_TIMEOUT;
        let deadline = Some(deadline.map_or(limit, |d| d.min(limit)));
        let hs = ClientHandshake::new().map_err(|e| unverified(self.addr_text(), e))?;
        let challenge = self.exchange(
            auth::CHALLENGE,
            hs.challenge_params(),
            deadline,
            interrupted,
        )?;
        let dialed = self
            .stream
            .as_ref()
            .and_then(|s| s.peer_addr().ok())
            .ok_or_else(|| {
                unverified(
                    self.addr_text(),
                    "the connection has no peer address".into(),
                )
            })?;
        let proof = hs
            .answer(token, dialed, &challenge)
            .map_err(|e| unverified(self.addr_text(), e))?;
        self.exchange(auth::AUTHENTICATE, proof, deadline, interrupted)
            .map(drop)
    }

    /// One handshake request and its reply, on a connection whose peer is not trusted yet: replies are
    /// size-limited, and every failure (other than an interrupt) is [`ClientError::Unverified`].
    fn exchange(
        &mut self,
        command: &str,
        params: Map<String, Value>,
        deadline: Option<Instant>,
        interrupted: Interrupt<'_>,
    ) -> Result<Value, ClientError> {
        let addr = self.addr_text();
        let id = self.next_id;
        self.next_id += 1;
        let mut bytes = serde_json::to_vec(&json!({"type": command, "params": params, "id": id}))
            .unwrap_or_default();
        bytes.push(b'\n');
        let why = |e: ClientError| {
            match e {
            ClientError::Interrupted => ClientError::Interrupted,
            ClientError::Remote { message, .. } => ClientError::Unverified {
                addr: addr.clone(),
                detail: format!(
                    "it answered {command} with an error ({message}): not a bld_remote service with the \
                     handshake"
                ),
            },
            ClientError::Timeout { .. } => ClientError::Unverified {
                addr: addr.clone(),
                detail: format!("no answer to {command} within the handshake's time"),
            },
            other => ClientError::Unverified {
                addr: addr.clone(),
                detail: format!("{command} failed: {other}"),
            },
        }
        };
        self.write_request(&bytes).map_err(why)?;
        let line = self
            .read_line(deadline, HANDSHAKE_REPLY_LIMIT, interrupted)
            .map_err(why)?;
        let reply = match serde_json::from_slice::<Value>(&line) {
            Ok(Value::Object(reply)) if reply.get("id").and_then(Value::as_u64) == Some(id) => {
                reply
            }
            Ok(Value::Object(reply))
                if !reply.contains_key("id") && reply.contains_key("status") =>
            {
                reply
            }
            _ => {
                return Err(why(ClientError::Protocol {
                    addr: addr.clone(),
                    detail: "its reply is not a bld_remote reply to that request".into(),
                }))
            }
        };
        interpret_reply(&addr, reply).map_err(why)
    }

    /// One reply line (without its newline), however many reads it takes; more than `limit` bytes without
    /// a newline is a protocol error.
    fn read_line(
        &mut self,
        deadline: Option<Instant>,
        limit: usize,
        interrupted: Interrupt<'_>,
    ) -> Result<Vec<u8>, ClientError> {
        let addr = self.addr_text();
        let mut searched = 0;
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.buf[searched..]) {
                let end = searched + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                return Ok(line);
            }
            searched = self.buf.len();
            if searched > limit {
                return Err(ClientError::Protocol {
                    addr,
                    detail: format!("more than {limit} bytes without the end of a reply"),
                });
            }
            if interrupted() {
                return Err(ClientError::Interrupted);
            }
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::Timeout {
                            addr,
                            detail: format!(
                                "no reply within {:.1} s (the request may still be running in Blender)",
                                self.timeout.map_or(0.0, |t| t.as_secs_f64())
                            ),
                            ran: None,
                        });
                    }
                    left.min(POLL)
                }
                None => POLL,
            };
            let Some(stream) = self.stream.as_mut() else {
                return Err(ClientError::Lost {
                    addr,
                    detail: "not connected".into(),
                });
            };
            let _ = stream.set_read_timeout(Some(wait));
            let old_len = self.buf.len();
            // Read straight into the buffer's spare room: no copy of large replies.
            self.buf.resize(old_len + READ_CHUNK, 0);
            let got = stream.read(&mut self.buf[old_len..]);
            match got {
                Ok(0) => {
                    self.buf.truncate(old_len);
                    return Err(ClientError::Lost {
                        addr,
                        detail: if old_len == 0 {
                            "the service closed the connection without replying".into()
                        } else {
                            format!("the service closed the connection after {old_len} bytes of a reply")
                        },
                    });
                }
                Ok(n) => self.buf.truncate(old_len + n),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    self.buf.truncate(old_len);
                }
                Err(e) => {
                    self.buf.truncate(old_len);
                    return Err(ClientError::Lost {
                        addr,
                        detail: e.to_string(),
                    });
                }
            }
        }
    }

    // --- typed helpers -------------------------------------------------------------------------------

    pub fn ping(&mut self) -> Result<Value, ClientError> {
        self.call("ping", Map::new())
    }

    pub fn status(&mut self) -> Result<Value, ClientError> {
        self.call("get_status", Map::new())
    }

    /// Run Python in Blender. A failure in the code is [`ClientError::Remote`] with the traceback and the
    /// output printed before it (`reply["output"]`). What the code changed is not asked for (send
    /// [`exec_params`]`(code, true)` for it): Blender then spends nothing on it.
    pub fn execute_with(
        &mut self,
        code: &str,
        interrupted: Interrupt<'_>,
    ) -> Result<ExecOutput, ClientError> {
        let r = self.call_with("execute_code", exec_params(code, false), interrupted)?;
        Ok(exec_output(r))
    }

    pub fn execute(&mut self, code: &str) -> Result<ExecOutput, ClientError> {
        self.execute_with(code, &never)
    }
}

/// The longest single `get_job_result` wait a client asks for: a longer wait is sliced, so that a lost
/// connection or an interrupt is noticed, and a fresh request made, at least this often.
pub const JOB_WAIT_SLICE: Duration = Duration::from_secs(20);

/// Wait for a job to end with `get_job_result` waits of at most [`JOB_WAIT_SLICE`], until its snapshot is
/// terminal or `deadline` passes (`None`: as long as it takes). `ask` sends one `get_job_result` with the
/// params given (`wait_timeout_seconds`; it adds the `job_id`). Returns the last snapshot and whether it
/// is terminal. Used by `bld_remote.Job.result` and `bld-remote job result`.
pub fn wait_for_job<E>(
    deadline: Option<Instant>,
    mut ask: impl FnMut(Map<String, Value>) -> Result<Value, E>,
) -> Result<(Value, bool), E> {
    loop {
        let left = deadline.map_or(JOB_WAIT_SLICE, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let mut p = Map::new();
        p.insert(
            "wait_timeout_seconds".into(),
            Value::from(left.min(JOB_WAIT_SLICE).as_secs_f64()),
        );
        let v = ask(p)?;
        let terminal = v.get("terminal") == Some(&Value::Bool(true));
        if terminal || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok((v, terminal));
        }
    }
}

/// `execute_code`'s parameters: the code, and whether to report what it changed (framed requests do by
/// default, so a client that will not read them says `false`).
pub fn exec_params(code: &str, changes: bool) -> Map<String, Value> {
    let mut params = Map::new();
    params.insert("code".into(), Value::String(code.to_string()));
    params.insert("changes".into(), Value::Bool(changes));
    params
}

/// The `execute_code` success result → [`ExecOutput`].
pub fn exec_output(mut r: Value) -> ExecOutput {
    let take_str = |v: Option<Value>| match v {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    let (stdout, stderr) = match r.get_mut("output").map(Value::take) {
        Some(Value::Object(mut o)) => (take_str(o.remove("stdout")), take_str(o.remove("stderr"))),
        _ => (
            take_str(r.get_mut("result").map(Value::take)),
            String::new(),
        ),
    };
    ExecOutput {
        stdout,
        stderr,
        result: r.get_mut("value").map(Value::take),
        duration: r.get("duration").and_then(Value::as_f64).unwrap_or(0.0),
        changes: r.get_mut("changes").map(Value::take),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn wait_for_job_slices_long_waits_and_stops_at_the_end_or_the_deadline() {
        // No deadline: waits of one slice each until the snapshot is terminal.
        let mut asked = Vec::new();
        let mut n = 0;
        let (v, terminal) = wait_for_job::<()>(None, |p| {
            asked.push(p["wait_timeout_seconds"].as_f64().unwrap());
            n += 1;
            Ok(json!({"status": if n < 3 { "running" } else { "completed" }, "terminal": n >= 3}))
        })
        .unwrap();
        assert!(terminal && v["status"] == json!("completed"));
        assert_eq!(asked, vec![JOB_WAIT_SLICE.as_secs_f64(); 3]);
        // A deadline: the wait asked is what is left (never more than a slice), and it ends there.
        let deadline = Instant::now() + Duration::from_millis(30);
        let mut waits = Vec::new();
        let (v, terminal) = wait_for_job::<()>(Some(deadline), |p| {
            let w = p["wait_timeout_seconds"].as_f64().unwrap();
            waits.push(w);
            std::thread::sleep(Duration::from_secs_f64(w.min(0.02)));
            Ok(json!({"status": "running", "terminal": false}))
        })
        .unwrap();
        assert!(!terminal && v["status"] == json!("running"));
        assert!(
            waits[0] <= 0.03 && waits.iter().all(|w| *w <= 0.03),
            "{waits:?}"
        );
        assert!(Instant::now() >= deadline);
        // An error from `ask` ends the wait with it.
        assert_eq!(wait_for_job(None, |_| Err::<Value, _>("lost")), Err("lost"));
    }

    /// A one-connection fake service: replies to each request line with what `answer` returns.
    fn fake(answer: impl Fn(Value) -> Vec<u8> + Send + 'static) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().map_or(0, |a| a.port());
        std::thread::spawn(move || {
            let Ok((s, _)) = l.accept() else { return };
            let mut w = s.try_clone().unwrap();
            for line in std::io::BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if w.write_all(&answer(v)).is_err() {
                    return;
                }
            }
        });
        port
    }

    #[test]
    fn large_reply_in_many_reads_and_progress_lines_skipped() {
        let port = fake(|req| {
            let id = req["id"].clone();
            let big = "x".repeat(5_000_000);
            let mut out = serde_json::to_vec(&json!({"id": id, "progress": {"progress": 1}}))
                .unwrap_or_default();
            out.push(b'\n');
            out.extend(
                serde_json::to_vec(&json!({"id": 999, "status": "success", "result": 0}))
                    .unwrap_or_default(),
            );
            out.push(b'\n');
            out.extend(
                serde_json::to_vec(&json!({"id": id, "status": "success", "result": {
                    "executed": true, "result": big, "output": {"stdout": big, "stderr": "e"},
                    "value": [1, 2], "duration": 0.5}}))
                .unwrap_or_default(),
            );
            out.push(b'\n');
            out
        });
        let mut c = Client::new("127.0.0.1", port, Some(Duration::from_secs(10)), None);
        let r = c.execute("print()").unwrap();
        assert_eq!(r.stdout.len(), 5_000_000);
        assert_eq!(r.stderr, "e");
        assert_eq!(r.result, Some(json!([1, 2])));
        assert!((r.duration - 0.5).abs() < 1e-9);
        // The connection is reused.
        let r = c.execute("print()").unwrap();
        assert_eq!(r.stdout.len(), 5_000_000);
    }

    #[test]
    fn error_reply_is_remote_with_traceback_and_timeout_reply_is_timeout() {
        let port = fake(|req| {
            let id = req["id"].clone();
            let v = if req["type"] == "slow" {
                json!({"id": id, "status": "error", "message": "timed out while queued", "ran": false, "timeout": true})
            } else {
                json!({"id": id, "status": "error", "message": "ZeroDivisionError: division by zero",
                       "exception": "ZeroDivisionError", "traceback": "Traceback...",
                       "output": {"stdout": "before\n", "stderr": ""}})
            };
            let mut out = serde_json::to_vec(&v).unwrap_or_default();
            out.push(b'\n');
            out
        });
        let mut c = Client::new("127.0.0.1", port, None, None);
        match c.execute("1/0") {
            Err(ClientError::Remote {
                exception,
                traceback,
                reply,
                ..
            }) => {
                assert_eq!(exception.as_deref(), Some("ZeroDivisionError"));
                assert_eq!(traceback.as_deref(), Some("Traceback..."));
                assert_eq!(reply["output"]["stdout"], json!("before\n"));
            }
            other => panic!("{other:?}"),
        }
        assert!(c.is_connected(), "a remote error keeps the connection");
        assert!(matches!(
            c.call("slow", Map::new()),
            Err(ClientError::Timeout {
                ran: Some(false),
                ..
            })
        ));
    }

    #[test]
    fn refused_and_silent_and_closing_services() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().map_or(0, |a| a.port())
        };
        let mut c = Client::new("127.0.0.1", port, Some(Duration::from_millis(200)), None);
        let e = c.ping().err();
        assert!(
            matches!(&e, Some(ClientError::Connect { source, .. }) if source.kind() == ErrorKind::ConnectionRefused),
            "{e:?}"
        );

        // Accepts, never answers: a client-side timeout (timeout + grace).
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().map_or(0, |a| a.port());
        let mut c = Client::new("127.0.0.1", port, Some(Duration::from_millis(100)), None);
        let t0 = Instant::now();
        assert!(matches!(c.ping(), Err(ClientError::Timeout { .. })));
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(!c.is_connected());
        drop(l);

        // Closes mid-reply: lost.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().map_or(0, |a| a.port());
        std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                let mut r = std::io::BufReader::new(s);
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let _ = r.get_mut().write_all(b"{\"id\":1,\"status\":\"succ");
            }
        });
        let mut c = Client::new("127.0.0.1", port, None, None);
        let e = c.ping().err();
        assert!(matches!(e, Some(ClientError::Lost { .. })), "{e:?}");
    }

    #[test]
    fn interrupt_hook_ends_a_wait() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().map_or(0, |a| a.port());
        let mut c = Client::new("127.0.0.1", port, None, None);
        let t0 = Instant::now();
        let stop = || t0.elapsed() > Duration::from_millis(300);
        assert!(matches!(
            c.call_with("ping", Map::new(), &stop),
            Err(ClientError::Interrupted)
        ));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    /// A service that accepts connections forever; on each, answers the first request with success, then
    /// does what `then` says with the second. Counts every request line it reads.
    fn two_step(then: &'static str) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().map_or(0, |a| a.port());
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { return };
                let mut w = s.try_clone().unwrap();
                let mut r = std::io::BufReader::new(s);
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                let ok = json!({"id": req["id"], "status": "success", "result": {"pong": true}});
                let _ = w.write_all(format!("{ok}\n").as_bytes());
                if then == "idle" {
                    // The idle timeout: a notice (id-less, `ran: false`), then a close.
                    let notice =
                        json!({"status": "error", "message": "idle timeout", "ran": false});
                    let _ = w.write_all(format!("{notice}\n").as_bytes());
                } else {
                    // Reads the next request, then dies without a word (killed while running it).
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) > 0 {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        (port, seen)
    }

    #[test]
    fn a_request_read_by_a_service_that_then_dies_is_never_sent_again() {
        let (port, seen) = two_step("die");
        let mut c = Client::new("127.0.0.1", port, Some(Duration::from_secs(10)), None);
        assert!(c.ping().is_ok());
        let e = c.ping().err();
        assert!(matches!(e, Some(ClientError::Lost { .. })), "{e:?}");
        // One read of each request: the lost one was not replayed on a new connection.
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_connection_closed_idle_by_the_service_is_replaced_before_sending() {
        let (port, seen) = two_step("idle");
        let mut c = Client::new("127.0.0.1", port, Some(Duration::from_secs(10)), None);
        assert!(c.ping().is_ok());
        // Wait on state: the notice has arrived on the kept connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.stream.as_ref().is_some_and(|s| {
            let mut b = [0u8; 1];
            s.set_nonblocking(true).ok();
            let pending = s.peek(&mut b).is_ok();
            s.set_nonblocking(false).ok();
            !pending
        }) {
            assert!(Instant::now() < deadline);
            std::thread::yield_now();
        }
        // The next request goes out on a fresh connection, and is served.
        assert!(c.ping().is_ok());
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_service_that_cannot_prove_the_token_gets_neither_it_nor_the_request() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
        let rec = std::sync::Arc::clone(&seen);
        // Answers everything with success, the challenge with a made-up proof.
        let port = fake(move |req| {
            rec.lock().unwrap().push(req.clone());
            let result = if req["type"] == "auth_challenge" {
                json!({"auth": true, "version": 1, "alg": "hmac-sha256", "server_nonce": "ab".repeat(32),
                       "port": 1, "pid": 1, "proof": "00".repeat(32)})
            } else {
                json!({"executed": true})
            };
            let mut out = serde_json::to_vec(
                &json!({"id": req["id"], "status": "success", "result": result}),
            )
            .unwrap_or_default();
            out.push(b'\n');
            out
        });
        let mut c = Client::new(
            "127.0.0.1",
            port,
            Some(Duration::from_secs(5)),
            Some("s3cret".into()),
        );
        let e = c.execute("print()").unwrap_err();
        assert!(matches!(e, ClientError::Unverified { .. }), "{e:?}");
        assert!(!c.is_connected());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "only the challenge was sent: {seen:?}");
        assert_eq!(seen[0]["type"], json!("auth_challenge"));
        assert!(!serde_json::to_string(&*seen).unwrap().contains("s3cret"));
    }

    #[test]
    fn not_our_protocol() {
        let port = fake(|_| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        let mut c = Client::new("127.0.0.1", port, Some(Duration::from_secs(5)), None);
        assert!(matches!(c.ping(), Err(ClientError::Protocol { .. })));
    }
}
