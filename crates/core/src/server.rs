//! The TCP service: the listener thread, one reader and one writer thread per connection, limits, auth,
//! the control commands answered without Blender's main thread, and a graceful, joined stop. Pure Rust;
//! none of these threads ever touches Python.
//!
//! Per connection, the reader splits the byte stream into requests (`protocol::Decoder`), answers control
//! requests itself and queues the rest as jobs for the main thread. The writer waits for every job of its
//! connection at once (their outcomes arrive on one completion channel) and for their deadlines: replies
//! to plain requests leave in request order, replies to framed requests (with an id) as soon as they are
//! ready, so a `ping` or `cancel` is never stuck behind a 30-second script. Each reply is serialised once
//! and written with a single `write_all` (Nagle is off). See docs/PROTOCOL.md.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use crossbeam_channel::{Receiver, Select, Sender};
use parking_lot::{Mutex, RwLock};
use serde_json::{json, Map, Value};

use crate::jobs::{
    not_run, timed_out_not_run, timed_out_running, Completion, Expiry, Job, JobQueue, JobState,
    Msg, Progress, SubmitError,
};
use crate::protocol::{self, Decoder, Outcome, Reply, Request, StreamError};

pub use crate::config::Config;

const READ_CHUNK: usize = 256 * 1024;
/// Replies a connection may have outstanding (pipelined) before its reader stops reading: backpressure.
const MAX_PIPELINED: usize = 4096;
/// After an error that ends a connection, how long to keep discarding what the client still sends so
/// the error reply is not destroyed by a reset.
const LINGER: Duration = Duration::from_secs(2);
/// On stop, how long connections get to flush the replies they owe before their sockets are shut.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Progress reports a connection may have waiting for its writer; more are dropped (never blocking).
const PROGRESS_BACKLOG: usize = 256;
/// Errors starting a service.
#[derive(Debug)]
pub enum StartError {
    /// The address could not be bound (in use, permission...).
    Bind {
        addr: String,
        source: std::io::Error,
    },
    /// The configuration is unsafe or invalid.
    Config(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bind { addr, source } if source.kind() == ErrorKind::AddrInUse => {
                write!(f, "cannot listen on {addr}: the port is already in use")
            }
            Self::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Self::Config(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for StartError {}

/// The job currently running on the main thread, for `get_status`.
#[derive(Debug, Clone)]
struct Running {
    seq: u64,
    command: String,
    since: Instant,
}

struct Conn {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

/// State shared by the listener, the connection threads and the main-thread pump.
pub struct Shared {
    config: Config,
    addr: SocketAddr,
    queue: JobQueue,
    /// Held for reading while a job is submitted, for writing while `stopping` is set: after a stop, no
    /// job can slip into the queue behind the final drain.
    gate: RwLock<bool>,
    stop_requested: AtomicBool,
    conns: Mutex<Vec<Conn>>,
    active_conns: AtomicUsize,
    next_seq: AtomicU64,
    served: AtomicU64,
    auth_failures: AtomicU64,
    persist: Mutex<HashMap<String, Value>>,
    running: Mutex<Option<Running>>,
    started: Instant,
    started_unix: f64,
}

/// A running service. Dropping it stops it.
pub struct Server {
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

fn is_loopback_host(host: &str, addr: &SocketAddr) -> bool {
    addr.ip().is_loopback() || host == "localhost"
}

impl Server {
    pub fn start(config: Config) -> Result<Server, StartError> {
        let target = format!("{}:{}", config.host, config.port);
        let addrs: Vec<SocketAddr> = (config.host.as_str(), config.port)
            .to_socket_addrs()
            .map_err(|e| StartError::Bind {
                addr: target.clone(),
                source: e,
            })?
            .collect();
        let Some(first) = addrs.first() else {
            return Err(StartError::Config(format!(
                "host {:?} resolves to no address",
                config.host
            )));
        };
        if !is_loopback_host(&config.host, first)
            && config.token.as_deref().is_none_or(str::is_empty)
        {
            return Err(StartError::Config(format!(
                "refusing to listen on {target} without a token: anyone who can reach it could run code \
                 in Blender. Set a token, or bind 127.0.0.1"
            )));
        }
        let listener = TcpListener::bind(&addrs[..]).map_err(|e| StartError::Bind {
            addr: target.clone(),
            source: e,
        })?;
        let addr = listener.local_addr().map_err(|e| StartError::Bind {
            addr: target,
            source: e,
        })?;
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let shared = Arc::new(Shared {
            queue: JobQueue::new(config.queue_capacity),
            config,
            addr,
            gate: RwLock::new(false),
            stop_requested: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            active_conns: AtomicUsize::new(0),
            next_seq: AtomicU64::new(1),
            served: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            persist: Mutex::new(HashMap::new()),
            running: Mutex::new(None),
            started: Instant::now(),
            started_unix,
        });
        let s = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("bld_remote-listener".into())
            .spawn(move || {
                let _ = catch_unwind(AssertUnwindSafe(|| accept_loop(&s, &listener)));
            })
            .map_err(|e| StartError::Bind {
                addr: addr.to_string(),
                source: e,
            })?;
        Ok(Server {
            shared,
            listener: Some(handle),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Stop accepting, refuse queued jobs, let every connection flush the replies it owes, close, and join
    /// every thread. Must not be called from inside a running job (the pump defers it; see `Shared`).
    /// Bounded by the write timeout for clients that do not read.
    pub fn stop(&mut self) {
        {
            let mut stopping = self.shared.gate.write();
            if *stopping && self.listener.is_none() {
                return;
            }
            *stopping = true;
        }
        // Wake the blocking accept() with a connection to ourselves, then join the listener.
        let _ = TcpStream::connect_timeout(&wake_addr(self.shared.addr), Duration::from_secs(1));
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock());
        // Readers stop reading; writers still flush what they owe.
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Read);
        }
        for job in self.shared.queue.drain() {
            job.refuse(not_run("the service is stopping; the request was not run"));
        }
        // Writers flush what they owe; one stuck on a client that does not read is cut off after a grace.
        let grace_end = Instant::now() + STOP_GRACE;
        while conns.iter().any(|c| !c.thread.is_finished()) && Instant::now() < grace_end {
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in &conns {
            if !c.thread.is_finished() {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
        for c in conns {
            let _ = c.thread.join();
        }
        // Anything a reader queued between its last check and the gate closing was refused above, since
        // the gate was already shut before the drain. A final drain covers jobs queued by nobody.
        for job in self.shared.queue.drain() {
            job.refuse(not_run("the service is stopping; the request was not run"));
        }
        self.shared.queue.wake();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

impl Shared {
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn is_stopping(&self) -> bool {
        *self.gate.read()
    }

    /// Ask the pump to stop the service once the current job (if any) has replied.
    pub fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        self.queue.wake();
    }

    /// Make a blocked pump return to Python (e.g. so it can run signal handlers).
    pub fn wake_pump(&self) {
        self.queue.wake();
    }

    pub fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// Pump side: the next message for the main thread (`None` timeout = block until one arrives).
    pub fn next_message(&self, timeout: Option<Duration>) -> Option<Msg> {
        self.queue.recv(timeout)
    }

    /// Pump side: claim a job for running now; `Err` is the reply to send instead (cancelled, expired).
    pub fn begin(&self, job: &Job) -> Result<(), Outcome> {
        job.begin()?;
        *self.running.lock() = Some(Running {
            seq: job.seq,
            command: job.command.clone(),
            since: Instant::now(),
        });
        Ok(())
    }

    /// Pump side: hand a job's outcome back to its connection.
    pub fn finish(&self, job: Job, outcome: Outcome) {
        *self.running.lock() = None;
        self.served.fetch_add(1, Ordering::Relaxed);
        job.finish(outcome);
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn requests_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Value {
        let running = self.running.lock().clone();
        let mut v = json!({
            "running": !self.is_stopping(),
            "host": self.addr.ip().to_string(),
            "port": self.addr.port(),
            "mode": self.config.mode,
            "pid": std::process::id(),
            "requests_served": self.requests_served(),
            "queue_length": self.queue_len(),
            "queue_capacity": self.queue.capacity(),
            "connections": self.active_conns.load(Ordering::Relaxed),
            "max_connections": self.config.max_connections,
            "uptime": self.started.elapsed().as_secs_f64(),
            "started_at": self.started_unix,
            "auth": self.config.token.is_some(),
            "running_job": running.map(|r| json!({
                "command": r.command,
                "seq": r.seq,
                "seconds": r.since.elapsed().as_secs_f64(),
            })),
            "auth_failures": self.auth_failures.load(Ordering::Relaxed),
            "limits": {
                "max_request_bytes": self.config.max_request_bytes,
                "max_depth": self.config.max_depth,
                "max_connections": self.config.max_connections,
                "queue_capacity": self.queue.capacity(),
                "idle_timeout": self.config.idle_timeout.map(|d| d.as_secs_f64()),
                "request_read_timeout": self.config.request_read_timeout.as_secs_f64(),
                "default_timeout": self.config.default_timeout.map(|d| d.as_secs_f64()),
            },
            "version": env!("CARGO_PKG_VERSION"),
        });
        if let Value::Object(m) = &mut v {
            for (k, val) in &self.config.info {
                m.entry(k.clone()).or_insert_with(|| val.clone());
            }
        }
        v
    }

    /// Persisted values live in the service (not in Blender data), shared by all clients.
    pub fn persist_put(&self, key: String, data: Value) {
        self.persist.lock().insert(key, data);
    }

    pub fn persist_get(&self, key: &str) -> Option<Value> {
        self.persist.lock().get(key).cloned()
    }

    pub fn persist_remove(&self, key: &str) -> bool {
        self.persist.lock().remove(key).is_some()
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for incoming in listener.incoming() {
        if shared.is_stopping() {
            break;
        }
        let Ok(stream) = incoming else {
            // EMFILE and friends: back off briefly rather than spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let mut conns = shared.conns.lock();
        // Reap connections that have ended so the list (and their join handles) stays bounded.
        let (done, live): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut *conns)
            .into_iter()
            .partition(|c| c.thread.is_finished());
        *conns = live;
        for c in done {
            let _ = c.thread.join();
        }
        if conns.len() >= shared.config.max_connections {
            drop(conns);
            refuse_connection(
                stream,
                &format!(
                    "too many connections (limit {}); try again later",
                    shared.config.max_connections
                ),
            );
            continue;
        }
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(shared.config.write_timeout));
        let Ok(handle_stream) = stream.try_clone() else {
            drop(conns);
            refuse_connection(stream, "cannot serve this connection (out of resources)");
            continue;
        };
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("bld_remote-conn".into())
            .spawn(move || {
                s.active_conns.fetch_add(1, Ordering::Relaxed);
                let _ = catch_unwind(AssertUnwindSafe(|| serve_connection(&s, stream)));
                s.active_conns.fetch_sub(1, Ordering::Relaxed);
            });
        if let Ok(thread) = spawned {
            conns.push(Conn {
                stream: handle_stream,
                thread,
            });
        } else {
            drop(conns);
            refuse_connection(
                handle_stream,
                "cannot serve this connection (out of threads)",
            );
        }
    }
}

fn refuse_connection(mut stream: TcpStream, message: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&protocol::encode_reply(None, &Outcome::error(message)));
    let _ = stream.shutdown(Shutdown::Both);
}

/// How a job's outcome becomes the reply a client expects.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Plain,
    ExecuteCode {
        base64: bool,
    },
    /// blender-remote's `{"code": ...}` form: `{"response": "OK"|"FAILED", "message", "output"}`.
    Legacy,
    /// `get_viewport_screenshot`: the main thread writes the file; the image is read and base64-encoded
    /// here, on the network thread (unless the request says `"inline": false`).
    Screenshot {
        inline: bool,
    },
}

/// Validate `execute_code` params and decode base64 code here, off the main thread.
fn prepare_execute_code(params: &mut Map<String, Value>) -> Result<Shape, String> {
    let code_is_b64 = params.get("code_is_base64").is_some_and(truthy);
    let return_b64 = params.get("return_as_base64").is_some_and(truthy);
    match params.get("code") {
        Some(Value::String(code)) => {
            if code_is_b64 {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(code.trim())
                    .map_err(|e| format!("'code' is not valid base64: {e}"))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| "base64 'code' is not UTF-8 text".to_string())?;
                params.insert("code".into(), Value::String(text));
            }
        }
        Some(_) => return Err("'code' must be a string".into()),
        None => return Err("execute_code needs 'code' (a string of Python)".into()),
    }
    Ok(Shape::ExecuteCode { base64: return_b64 })
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"),
        _ => false,
    }
}

/// Token comparison without an early exit on the first differing byte (the one used for every token:
/// the service's and the MCP HTTP bearer's).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Length is not secret; content is compared without an early exit.
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn str_param<'a>(params: &'a Map<String, Value>, name: &str) -> Result<&'a str, Outcome> {
    match params.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Outcome::error(format!("'{name}' must be a string"))),
        None => Err(Outcome::error(format!("missing parameter '{name}'"))),
    }
}

/// `cancel` of one job: the reply to the `cancel` request, and the reply the cancelled job gets right now
/// (its later outcome, if any, is discarded).
fn cancel(state: &JobState) -> (Outcome, Option<Outcome>) {
    if state.cancel() {
        return (
            Outcome::Success(json!({"cancelled": true, "state": "queued", "ran": false})),
            Some(not_run(
                "cancelled: the request was not run and never will be",
            )),
        );
    }
    match state.phase_name() {
        "running" => {
            let mut extra = Map::new();
            extra.insert("ran".into(), Value::from("unknown"));
            extra.insert("state".into(), Value::from("running"));
            extra.insert("cancelled".into(), Value::Bool(true));
            (
                Outcome::Success(json!({
                    "cancelled": true,
                    "state": "running",
                    "ran": "unknown",
                    "message": "the request is already running in Blender and cannot be stopped; \
                                its result will be discarded",
                })),
                Some(Outcome::error_with(
                    "cancelled while running: it may still be running; its result will be discarded",
                    extra,
                )),
            )
        }
        phase => (
            Outcome::Success(json!({"cancelled": false, "state": phase})),
            None,
        ),
    }
}

/// Commands answered on the network thread: they never wait for Blender's main thread. A `cancel` may
/// also settle a job now (`settle_out`: its seq and the reply it gets).
fn control(
    shared: &Arc<Shared>,
    req: &mut Request,
    by_id: &HashMap<String, (u64, Arc<JobState>)>,
    settle_out: &mut Option<(u64, Outcome)>,
) -> Option<Outcome> {
    if req.legacy {
        return None;
    }
    let p = &mut req.params;
    let outcome = match req.command.as_str() {
        "ping" => Outcome::Success(json!({"pong": true, "message": "pong"})),
        "get_status" => Outcome::Success(shared.status()),
        "get_polyhaven_status"
        | "get_hyper3d_status"
        | "get_sketchfab_status"
        | "get_hunyuan3d_status" => {
            let what = req
                .command
                .trim_start_matches("get_")
                .trim_end_matches("_status");
            Outcome::Success(json!({
                "enabled": false,
                "message": format!("{what} integration is not available in bld_remote"),
            }))
        }
        "put_persist_data" => match str_param(p, "key") {
            Ok(key) => {
                let key = key.to_string();
                // Moved, not copied: the request is answered here and dropped.
                let data = p.remove("data").unwrap_or(Value::Null);
                shared.persist_put(key.clone(), data);
                Outcome::Success(Value::String(format!("Data stored with key: {key}")))
            }
            Err(e) => e,
        },
        "get_persist_data" => match str_param(p, "key") {
            Ok(key) => match shared.persist_get(key) {
                Some(data) => Outcome::Success(json!({"data": data, "found": true})),
                None => Outcome::Success(json!({
                    "data": p.get("default").cloned().unwrap_or(Value::Null),
                    "found": false,
                })),
            },
            Err(e) => e,
        },
        "remove_persist_data" => match str_param(p, "key") {
            Ok(key) => Outcome::Success(json!({"removed": shared.persist_remove(key)})),
            Err(e) => e,
        },
        "server_shutdown" => {
            shared.request_stop();
            Outcome::Success(json!({"message": "Server shutting down"}))
        }
        "cancel" => match p.get("id") {
            Some(id @ (Value::Number(_) | Value::String(_))) => match by_id.get(&id_key(id)) {
                Some((seq, state)) => {
                    let (outcome, settle) = cancel(state);
                    if let Some(reply) = settle {
                        *settle_out = Some((*seq, reply));
                    }
                    outcome
                }
                None => Outcome::Success(json!({"cancelled": false, "state": "unknown"})),
            },
            _ => Outcome::error("cancel needs 'id': the id of a request sent on this connection"),
        },
        _ => return None,
    };
    Some(outcome)
}

/// What the reader hands the writer, in request order.
enum ToWriter {
    /// A reply that is ready now (control commands, errors). `framed` replies (the request had an id)
    /// may leave before replies to earlier requests.
    Ready {
        bytes: Vec<u8>,
        framed: bool,
        /// Answer this in-flight job now with this outcome first (a `cancel`).
        settle: Option<(u64, Outcome)>,
    },
    /// A job the reader is about to queue for the main thread; its outcome arrives as a `Completion`.
    Job(InFlight),
    /// The stream cannot be decoded further: send what is owed, then close the sending side.
    Close,
}

/// A job whose reply this connection owes.
struct InFlight {
    seq: u64,
    id: Option<Value>,
    shape: Shape,
    deadline: Option<Instant>,
    state: Arc<JobState>,
}

/// The reader half. Runs on the connection's thread; spawns and joins the writer.
fn serve_connection(shared: &Arc<Shared>, stream: TcpStream) {
    let Ok(write_stream) = stream.try_clone() else {
        return;
    };
    let (tx, rx) = crossbeam_channel::bounded::<ToWriter>(MAX_PIPELINED);
    // Unbounded so the main thread never blocks completing a job; at most MAX_PIPELINED are in flight.
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
    // Progress reports of this connection's framed jobs. Bounded: a report that finds it full is dropped,
    // so reporting never blocks the main thread.
    let (progress_tx, progress_rx) = crossbeam_channel::bounded::<Progress>(PROGRESS_BACKLOG);
    let writer = std::thread::Builder::new()
        .name("bld_remote-writer".into())
        .spawn(move || {
            let _ = catch_unwind(AssertUnwindSafe(|| {
                Writer::new(write_stream).run(&rx, &done_rx, &progress_rx);
            }));
        });
    let Ok(writer) = writer else {
        refuse_connection(stream, "cannot serve this connection (out of threads)");
        return;
    };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        read_loop(shared, &stream, &tx, &done_tx, &progress_tx);
    }));
    drop(tx);
    let _ = writer.join();
}

/// Why the reader stopped reading requests.
enum ReadEnd {
    /// The client closed its side, or the service is stopping: replies still go out.
    Eof,
    /// A reply could not be handed to the writer (it gave up on a dead client).
    WriterGone,
    /// The stream is unusable: this error reply is sent, then the connection closes.
    Error(Vec<u8>),
}

fn read_loop(
    shared: &Arc<Shared>,
    mut stream: &TcpStream,
    tx: &Sender<ToWriter>,
    done_tx: &Sender<Completion>,
    progress_tx: &Sender<Progress>,
) {
    let config = &shared.config;
    let mut decoder = Decoder::new(config.max_request_bytes, config.max_depth);
    let mut buf = vec![0u8; READ_CHUNK];
    // Jobs of this connection by request id, for `cancel`.
    let mut by_id: HashMap<String, (u64, Arc<JobState>)> = HashMap::new();
    // When the request being received began (its first read), for `request_read_timeout`.
    let mut request_began: Option<Instant> = None;
    let mut socket_timeout: Option<Option<Duration>> = None;
    let end = loop {
        let wanted = match request_began {
            Some(began) => {
                let left = config.request_read_timeout.saturating_sub(began.elapsed());
                if left.is_zero() {
                    break ReadEnd::Error(slow_request_reply(config));
                }
                Some(left)
            }
            None => config.idle_timeout,
        };
        if socket_timeout != Some(wanted) {
            let _ = stream.set_read_timeout(wanted);
            socket_timeout = Some(wanted);
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => break ReadEnd::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if request_began.is_some() {
                    break ReadEnd::Error(slow_request_reply(config));
                }
                break ReadEnd::Error(protocol::encode_reply(
                    None,
                    &Outcome::error(format!(
                        "idle timeout: nothing received for {} s; closing the connection",
                        config.idle_timeout.map_or(0.0, |d| d.as_secs_f64())
                    )),
                ));
            }
            Err(_) => break ReadEnd::Eof,
        };
        decoder.feed(&buf[..n]);
        let mut writer_gone = false;
        let stream_error = loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    request_began = None;
                    let msg = handle_frame(shared, &frame, &mut by_id, done_tx, progress_tx);
                    drop(frame);
                    if let Err(crossbeam_channel::SendError(msg)) = tx.send(msg) {
                        // Nobody will send this reply: queued work for it must never run.
                        if let ToWriter::Job(f) = msg {
                            f.state.cancel();
                        }
                        writer_gone = true;
                    }
                    if writer_gone {
                        break None;
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        if writer_gone {
            break ReadEnd::WriterGone;
        }
        if let Some(e) = stream_error {
            break ReadEnd::Error(match e {
                StreamError::Http => http_refusal(),
                other => protocol::encode_reply(None, &Outcome::error(other.to_string())),
            });
        }
        if decoder.in_request() {
            request_began.get_or_insert_with(Instant::now);
        } else {
            request_began = None;
        }
        if by_id.len() > 1024 {
            by_id.retain(|_, (_, s)| matches!(s.phase_name(), "queued" | "running"));
        }
    };
    if let ReadEnd::Error(bytes) = end {
        let _ = tx.send(ToWriter::Ready {
            bytes,
            framed: false,
            settle: None,
        });
        let _ = tx.send(ToWriter::Close);
        linger(stream);
    }
}

fn slow_request_reply(config: &Config) -> Vec<u8> {
    protocol::encode_reply(
        None,
        &Outcome::error(format!(
            "request not received in time: a request must arrive completely within {} s of its first \
             byte; closing the connection",
            config.request_read_timeout.as_secs_f64()
        )),
    )
}

/// After an error reply that ends the connection, read and discard what the client is still sending for
/// a short while, so that closing does not reset the connection (a reset can destroy the error reply
/// before the client reads it). Bounded in time; discarded bytes are never stored.
fn linger(mut stream: &TcpStream) {
    let until = Instant::now() + LINGER;
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn http_refusal() -> Vec<u8> {
    let body = "{\"status\":\"error\",\"message\":\"this port speaks JSON over TCP, not HTTP\"}\n";
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn id_key(id: &Value) -> String {
    id.to_string()
}

/// Turn one frame into what the writer must send for it.
#[allow(clippy::too_many_lines)] // one linear path: parse, auth, control, validate, queue
fn handle_frame(
    shared: &Arc<Shared>,
    frame: &[u8],
    by_id: &mut HashMap<String, (u64, Arc<JobState>)>,
    done_tx: &Sender<Completion>,
    progress_tx: &Sender<Progress>,
) -> ToWriter {
    let mut request = match protocol::parse_request(frame) {
        Ok(r) => r,
        Err(bad) => {
            return ToWriter::Ready {
                framed: bad.id.is_some(),
                bytes: protocol::encode_reply(bad.id.as_ref(), &Outcome::error(bad.message)),
                settle: None,
            }
        }
    };
    let read_at = Instant::now();
    let id = request.id.clone();
    let ready = |outcome: Outcome| ToWriter::Ready {
        framed: id.is_some(),
        bytes: protocol::encode_reply(id.as_ref(), &outcome),
        settle: None,
    };
    if let Some(expected) = shared.config.token.as_deref() {
        let given = request.token.as_deref().unwrap_or("");
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            shared.auth_failures.fetch_add(1, Ordering::Relaxed);
            let mut extra = Map::new();
            extra.insert("ran".into(), Value::Bool(false));
            extra.insert("auth".into(), Value::Bool(false));
            return ready(Outcome::error_with(
                if given.is_empty() {
                    "authentication required: this service needs a token (add \"token\" to the request)"
                } else {
                    "authentication failed: wrong token"
                },
                extra,
            ));
        }
    }
    let mut settle = None;
    if let Some(outcome) = control(shared, &mut request, by_id, &mut settle) {
        shared.served.fetch_add(1, Ordering::Relaxed);
        return ToWriter::Ready {
            framed: id.is_some(),
            bytes: protocol::encode_reply(id.as_ref(), &outcome),
            settle,
        };
    }
    if !shared
        .config
        .main_thread_commands
        .iter()
        .any(|c| c == &request.command)
    {
        return ready(Outcome::error(format!(
            "Unknown command type: {}",
            request.command
        )));
    }
    let Request {
        command,
        mut params,
        timeout,
        legacy,
        ..
    } = request;
    let shape = if legacy {
        Shape::Legacy
    } else if command == "execute_code" {
        match prepare_execute_code(&mut params) {
            Ok(shape) => shape,
            Err(message) => return ready(Outcome::error(message)),
        }
    } else if command == "get_viewport_screenshot" {
        Shape::Screenshot {
            inline: params.get("inline").is_none_or(truthy),
        }
    } else {
        Shape::Plain
    };
    let timeout = timeout
        .map(Duration::from_secs_f64)
        .or(shared.config.default_timeout);
    let deadline = timeout.and_then(|t| read_at.checked_add(t));
    let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
    let (mut job, state) = Job::new(seq, command, params, deadline, done_tx.clone());
    if id.is_some() {
        // Framed requests may get progress lines before their reply; plain clients never see any.
        job = job.with_progress(progress_tx.clone());
    }
    if let Some(id) = &id {
        by_id.insert(id_key(id), (seq, Arc::clone(&state)));
    }
    let in_flight = ToWriter::Job(InFlight {
        seq,
        id,
        shape,
        deadline,
        state,
    });
    let submitted = {
        let stopping = shared.gate.read();
        if *stopping {
            Err((SubmitError::Stopped, job))
        } else {
            shared.queue.submit(job)
        }
    };
    // A refused job completes through the same channel as any other, with its reason.
    match submitted {
        Ok(()) => {}
        Err((SubmitError::Busy, job)) => job.refuse(not_run(&format!(
            "busy: {} requests are already queued for Blender's main thread; try again later",
            shared.queue.capacity()
        ))),
        Err((SubmitError::Stopped, job)) => {
            job.refuse(not_run("the service is stopping; the request was not run"));
        }
    }
    // The completion may reach the writer before this message does; the writer keeps it until then.
    in_flight
}

/// The writer half: one per connection. Writes each reply with a single `write_all`. Replies to requests
/// without an id leave in request order (plain clients match replies by order); replies to framed
/// requests leave as soon as they are ready. Enforces deadlines: at a job's deadline it answers with a
/// timeout reply that says whether the work ran.
struct Writer {
    stream: TcpStream,
    in_flight: HashMap<u64, InFlight>,
    /// Deadlines of in-flight jobs, earliest first.
    deadlines: BTreeSet<(Instant, u64)>,
    /// Replies owed to plain (id-less) requests, in request order: ready bytes, or a job's seq.
    ordered: VecDeque<Owed>,
    /// Plain replies that are ready but wait behind earlier ones, by seq.
    parked: HashMap<u64, Reply>,
    /// Completions that arrived before the reader's message about their job.
    early: HashMap<u64, Outcome>,
    /// Jobs answered at their deadline whose completion has not arrived yet (it is discarded).
    expired: HashSet<u64>,
    /// Highest seq tracked so far. The reader hands jobs over in seq order, after queueing them, so a
    /// progress report for a higher seq is early (its job is not tracked yet) and one for a lower seq
    /// whose job is no longer in flight is late (already answered) and dropped.
    max_tracked: u64,
    /// Progress reports that arrived before the reader's message about their job.
    early_progress: HashMap<u64, Vec<Value>>,
    dead: bool,
}

enum Owed {
    Bytes(Vec<u8>),
    Job(u64),
}

impl Writer {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            in_flight: HashMap::new(),
            deadlines: BTreeSet::new(),
            ordered: VecDeque::new(),
            parked: HashMap::new(),
            early: HashMap::new(),
            expired: HashSet::new(),
            max_tracked: 0,
            early_progress: HashMap::new(),
            dead: false,
        }
    }

    fn run(
        mut self,
        rx: &Receiver<ToWriter>,
        done: &Receiver<Completion>,
        progress: &Receiver<Progress>,
    ) {
        let mut reader_open = true;
        // Disconnected once the reader and every job are gone; then it must not be selected (always ready).
        let mut progress_open = true;
        while !self.dead && (reader_open || !self.in_flight.is_empty() || !self.ordered.is_empty())
        {
            let mut sel = Select::new();
            // Backpressure: with too many replies owed, stop taking requests; the reader then blocks,
            // stops reading, and TCP slows the client down.
            let take_requests = reader_open && self.in_flight.len() < MAX_PIPELINED;
            let rx_index = take_requests.then(|| sel.recv(rx));
            let done_index = sel.recv(done);
            let progress_index = progress_open.then(|| sel.recv(progress));
            let selected = match self.deadlines.first() {
                Some(&(deadline, _)) => sel.select_deadline(deadline).ok(),
                None => Some(sel.select()),
            };
            let Some(op) = selected else {
                self.expire_due();
                continue;
            };
            if Some(op.index()) == rx_index {
                match op.recv(rx) {
                    Ok(ToWriter::Ready {
                        bytes,
                        framed,
                        settle,
                    }) => {
                        if let Some((seq, outcome)) = settle {
                            self.settle(seq, outcome);
                        }
                        if framed {
                            self.write(&bytes);
                        } else {
                            self.ordered.push_back(Owed::Bytes(bytes));
                            self.flush_ordered();
                        }
                    }
                    Ok(ToWriter::Job(job)) => self.track(job),
                    Ok(ToWriter::Close) | Err(_) => reader_open = false,
                }
            } else if op.index() == done_index {
                if let Ok(c) = op.recv(done) {
                    self.complete(c.seq, c.outcome);
                }
            } else if Some(op.index()) == progress_index {
                match op.recv(progress) {
                    Ok(p) => self.progress(p),
                    Err(_) => progress_open = false,
                }
            }
        }
        if self.dead {
            // Nobody will read these replies: queued work for them must never run.
            for job in self.in_flight.values() {
                job.state.cancel();
            }
            let _ = self.stream.shutdown(Shutdown::Both);
            return;
        }
        // Everything owed is sent. Closing our sending side tells a client that half-closed (or whose
        // stream failed) that no more replies come.
        let _ = self.stream.flush();
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// `{"id": N, "progress": {...}}` for a framed job still owed a reply (after its reply, or its
    /// deadline, progress is dropped).
    fn progress(&mut self, p: Progress) {
        match self.in_flight.get(&p.seq) {
            Some(job) => {
                if let Some(id) = job.id.clone() {
                    self.write_progress(id, p.value);
                }
            }
            None if p.seq > self.max_tracked => {
                let held = self.early_progress.entry(p.seq).or_default();
                if held.len() < 64 {
                    held.push(p.value);
                }
            }
            None => {}
        }
    }

    fn write_progress(&mut self, id: Value, value: Value) {
        let mut line = Map::new();
        line.insert("id".into(), id);
        line.insert("progress".into(), value);
        self.write(&protocol::encode_value(&Value::Object(line)));
    }

    fn track(&mut self, job: InFlight) {
        let seq = job.seq;
        if job.id.is_none() {
            self.ordered.push_back(Owed::Job(seq));
        }
        if let Some(d) = job.deadline {
            self.deadlines.insert((d, seq));
        }
        self.max_tracked = self.max_tracked.max(seq);
        let id = job.id.clone();
        self.in_flight.insert(seq, job);
        if let Some(held) = self.early_progress.remove(&seq) {
            for value in held {
                if let Some(id) = id.clone() {
                    self.write_progress(id, value);
                }
            }
        }
        if let Some(outcome) = self.early.remove(&seq) {
            self.complete(seq, outcome);
        }
    }

    fn complete(&mut self, seq: u64, outcome: Outcome) {
        let Some(job) = self.in_flight.remove(&seq) else {
            // Either its deadline already answered it (the result is discarded), or the reader's message
            // about it has not arrived yet.
            if !self.expired.remove(&seq) {
                self.early.insert(seq, outcome);
            }
            return;
        };
        self.deliver(seq, &job, outcome);
    }

    /// Write a job's reply: a framed one at once, a plain one in request order.
    fn deliver(&mut self, seq: u64, job: &InFlight, outcome: Outcome) {
        if let Some(d) = job.deadline {
            self.deadlines.remove(&(d, seq));
        }
        let reply = shape_reply(job.id.as_ref(), job.shape, outcome);
        if job.id.is_some() {
            self.write_reply(&reply);
        } else {
            self.parked.insert(seq, reply);
            self.flush_ordered();
        }
    }

    fn expire_due(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, seq)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.remove(&(deadline, seq));
            let Some(job) = self.in_flight.get(&seq) else {
                continue;
            };
            let outcome = match job.state.expire() {
                Expiry::NotRun => timed_out_not_run(
                    "timed out while queued: the request was not run and never will be",
                ),
                Expiry::Running => timed_out_running(),
                // Finished or skipped just now: its completion (with the real outcome) is on its way.
                Expiry::Settled => continue,
            };
            self.settle(seq, outcome);
        }
    }

    /// Answer an in-flight job now (deadline, cancel); its later completion is discarded.
    fn settle(&mut self, seq: u64, outcome: Outcome) {
        let Some(job) = self.in_flight.remove(&seq) else {
            return;
        };
        self.expired.insert(seq);
        self.deliver(seq, &job, outcome);
    }

    fn flush_ordered(&mut self) {
        while let Some(front) = self.ordered.front() {
            match front {
                Owed::Bytes(_) => {
                    if let Some(Owed::Bytes(b)) = self.ordered.pop_front() {
                        self.write(&b);
                    }
                }
                Owed::Job(seq) => match self.parked.remove(seq) {
                    Some(reply) => {
                        self.ordered.pop_front();
                        self.write_reply(&reply);
                    }
                    None => return,
                },
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.dead {
            return;
        }
        if self.stream.write_all(bytes).is_err() {
            self.dead = true;
        }
    }

    /// Write a reply of several pieces with vectored writes (one `writev` unless the socket is full).
    fn write_reply(&mut self, reply: &Reply) {
        if self.dead {
            return;
        }
        if let Reply::One(bytes) = reply {
            self.write(bytes);
            return;
        }
        let pieces = reply.slices();
        let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.stream.write_vectored(rest) {
                Ok(0) => {
                    self.dead = true;
                    return;
                }
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
    }
}

fn shape_reply(id: Option<&Value>, shape: Shape, outcome: Outcome) -> Reply {
    let bytes = match (shape, outcome) {
        (
            Shape::Plain | Shape::ExecuteCode { .. } | Shape::Screenshot { .. },
            o @ Outcome::Error { .. },
        )
        | (Shape::Plain | Shape::Screenshot { inline: false }, o @ Outcome::Success(_)) => {
            protocol::encode_reply(id, &o)
        }
        (Shape::Screenshot { inline: true }, Outcome::Success(v)) => {
            protocol::encode_reply(id, &Outcome::Success(screenshot_result(v)))
        }
        (Shape::ExecuteCode { base64 }, Outcome::Success(v)) => {
            return execute_code_reply(id, v, base64);
        }
        (Shape::Legacy, Outcome::Success(v)) => return legacy_success_reply(id, v),
        (Shape::Legacy, Outcome::Error { message, extra }) => {
            let stdout = extra
                .get("output")
                .and_then(|o| o.get("stdout"))
                .cloned()
                .unwrap_or_else(|| Value::from(""));
            let mut r = json!({"response": "FAILED", "message": message, "output": stdout});
            if let Value::Object(m) = &mut r {
                if let Some(tb) = extra.get("traceback") {
                    m.insert("traceback".into(), tb.clone());
                }
                if let Some(id) = id {
                    m.insert("id".into(), id.clone());
                }
            }
            protocol::encode_value(&r)
        }
    };
    bytes.into()
}

/// The blender-remote reply to `{"code": ...}`: `{"id"?, "message", "output": <stdout>, "response": "OK"}`
/// (keys in the order `serde_json` writes them), the output written from its own buffer like
/// [`execute_code_reply`]'s.
fn legacy_success_reply(id: Option<&Value>, v: Value) -> Reply {
    let stdout = match v {
        Value::Object(mut m) => take_stdout(&mut m),
        _ => String::new(),
    };
    let mut reply = Reply::with_body(protocol::json_string_contents(stdout));
    let mut head = b"{".to_vec();
    if let Some(id) = id {
        head.extend_from_slice(b"\"id\":");
        protocol::write_json(&mut head, id);
        head.push(b',');
    }
    head.extend_from_slice(b"\"message\":\"Code executed successfully\",\"output\":\"");
    reply.push(head);
    reply.push_body();
    reply.push(b"\",\"response\":\"OK\"}\n".to_vec());
    reply
}

/// The captured output in a job's result, moved out (empty when absent).
fn take_stdout(m: &mut Map<String, Value>) -> String {
    match m.remove("stdout") {
        Some(Value::String(s)) => s,
        _ => String::new(),
    }
}

/// Largest screenshot file sent inline; bigger ones are only on disk (`filepath`).
const MAX_INLINE_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

/// Add the image file written by the main thread to the reply as base64 (`data`), off the main thread.
fn screenshot_result(v: Value) -> Value {
    let Value::Object(mut m) = v else { return v };
    let Some(path) = m.get("filepath").and_then(Value::as_str).map(str::to_owned) else {
        return Value::Object(m);
    };
    let read = std::fs::metadata(&path).and_then(|meta| {
        if meta.len() > MAX_INLINE_IMAGE_BYTES {
            Err(std::io::Error::other(format!(
                "{} bytes is more than the {MAX_INLINE_IMAGE_BYTES} sent inline",
                meta.len()
            )))
        } else {
            std::fs::read(&path)
        }
    });
    match read {
        Ok(bytes) => {
            m.insert(
                "data".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
            m.insert("encoding".into(), Value::from("base64"));
        }
        Err(e) => {
            m.insert(
                "data_error".into(),
                Value::String(format!("image not inlined: {e}")),
            );
        }
    }
    Value::Object(m)
}

/// `{"stdout", "stderr", "value"?, "duration"}` from the main thread → the reply clients read:
/// `{"executed": true, "result": <stdout>, "output": {"stdout", "stderr"}, "duration", "value"?}`.
/// Clients read the captured stdout both as `result` and as `output.stdout` (COMPAT.md): it is escaped
/// once (not at all when it is plain text) and the reply refers to it twice (`Reply` pieces, one vectored
/// write), never cloned as a `Value` nor copied (a reply can be tens of megabytes).
fn execute_code_reply(id: Option<&Value>, v: Value, base64: bool) -> Reply {
    let Value::Object(mut m) = v else {
        return protocol::encode_reply(id, &Outcome::Success(v)).into();
    };
    let stdout = take_stdout(&mut m);
    let stderr = m.remove("stderr").unwrap_or_else(|| Value::from(""));
    let encoded = base64.then(|| base64::engine::general_purpose::STANDARD.encode(&stdout));
    let mut reply = Reply::with_body(protocol::json_string_contents(stdout));
    let mut head = Vec::with_capacity(128);
    protocol::begin_success_reply(&mut head, id);
    head.extend_from_slice(b"{\"executed\":true,\"output\":{\"stdout\":\"");
    reply.push(head);
    reply.push_body();
    let mut rest = Vec::with_capacity(256);
    rest.push(b'"');
    protocol::write_field(&mut rest, "stderr", &stderr);
    rest.extend_from_slice(b"},\"result\":");
    if let Some(encoded) = encoded {
        protocol::write_str(&mut rest, &encoded);
        rest.extend_from_slice(b",\"result_is_base64\":true");
    } else {
        rest.push(b'"');
        reply.push(rest);
        reply.push_body();
        rest = vec![b'"'];
    }
    for (k, val) in &m {
        if !matches!(
            k.as_str(),
            "executed" | "result" | "output" | "result_is_base64"
        ) {
            protocol::write_field(&mut rest, k, val);
        }
    }
    rest.extend_from_slice(b"}}\n");
    reply.push(rest);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn refuses_public_bind_without_token() {
        let cfg = Config {
            host: "0.0.0.0".into(),
            port: 0,
            ..Config::default()
        };
        assert!(matches!(Server::start(cfg), Err(StartError::Config(_))));
    }

    #[test]
    fn execute_code_reply_shapes() {
        let parse = |reply: Reply| -> Value {
            let bytes = reply.to_vec();
            assert_eq!(memchr::memchr_iter(b'\n', &bytes).count(), 1);
            assert_eq!(bytes.last(), Some(&b'\n'));
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        let r = parse(execute_code_reply(
            Some(&json!(4)),
            json!({"stdout": "h\"i\n", "stderr": "w", "value": {"a": [1]}, "duration": 0.1}),
            false,
        ));
        assert_eq!(
            r,
            json!({"id": 4, "status": "success", "result": {
                "executed": true, "result": "h\"i\n", "output": {"stdout": "h\"i\n", "stderr": "w"},
                "value": {"a": [1]}, "duration": 0.1,
            }})
        );
        let r = parse(execute_code_reply(
            None,
            json!({"stdout": "hi\n", "stderr": ""}),
            true,
        ));
        assert_eq!(r["result"]["result"], json!("aGkK"));
        assert_eq!(r["result"]["result_is_base64"], json!(true));
        assert_eq!(r["result"]["output"]["stdout"], json!("hi\n"));
        assert!(r.get("id").is_none());
    }

    #[test]
    fn screenshot_reply_gets_the_file_inline() {
        let path =
            std::env::temp_dir().join(format!("bld_remote_shot_test_{}.png", std::process::id()));
        std::fs::write(&path, b"\x89PNG").unwrap_or_default();
        let v = screenshot_result(json!({"filepath": path.to_string_lossy(), "width": 1}));
        let _ = std::fs::remove_file(&path);
        assert_eq!(v["data"], json!("iVBORw=="));
        assert_eq!(v["encoding"], json!("base64"));
        let v = screenshot_result(json!({"filepath": "/nonexistent/x.png"}));
        assert!(v["data_error"].is_string());
        assert!(v.get("data").is_none());
    }

    #[test]
    fn base64_code_is_decoded_off_the_main_thread() {
        let mut p = Map::new();
        p.insert("code".into(), json!("cHJpbnQoMSk="));
        p.insert("code_is_base64".into(), json!(true));
        assert!(prepare_execute_code(&mut p).is_ok());
        assert_eq!(p["code"], json!("print(1)"));
        p.insert("code".into(), json!("!!!"));
        assert!(prepare_execute_code(&mut p).is_err());
        let mut p = Map::new();
        assert!(prepare_execute_code(&mut p).is_err());
    }
}
