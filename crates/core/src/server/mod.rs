//! The TCP service: the `Server` handle (start, a graceful joined stop) and the state its threads share
//! (`Shared`: limits, the job queue, counters, `get_status`, persisted values). `start`/`stop` run on the
//! thread that owns the service (Blender's main thread); `Shared` is read by every service thread and the
//! main-thread pump. Pure Rust; none of the service's threads ever touches Python.
//!
//! The threads, one file each: the listener (`accept`), per connection a reader (`reader`: splits the byte
//! stream into requests, answers `control` commands itself, queues the rest as jobs for the main thread)
//! and a writer (`writer`: waits for every job of its connection at once and for their deadlines; replies
//! to plain requests leave in request order, replies to framed requests (with an id) as soon as they are
//! ready, so a `ping` or `cancel` is never stuck behind a 30-second script) with its sender thread (the
//! socket writes, each reply within a total deadline, counted against the connection's reply budget).
//! `slots` tracks what each connection is doing, so the listener can reclaim idle ones under pressure.
//! `reply` shapes a job's outcome into the bytes clients expect; each reply is serialised once and written
//! with one (vectored) write (Nagle is off). See docs/PROTOCOL.md.

mod accept;
mod control;
mod fds;
mod job_commands;
mod reader;
mod reply;
pub mod rights;
mod slots;
mod writer;

use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde_json::{json, Value};

use crate::jobs::{not_run, Job, JobQueue, Msg};
use crate::persist::PersistStore;
use crate::protocol::Outcome;
use crate::store::JobStore;

pub use crate::config::Config;

/// On stop, how long connections get to flush the replies they owe before their sockets are shut.
const STOP_GRACE: Duration = Duration::from_secs(2);
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

/// A connection's thread and a handle on its socket, kept by the listener so that `stop` can shut the
/// socket and join the thread.
struct ConnectionHandle {
    stream: TcpStream,
    thread: JoinHandle<()>,
    /// What the connection is doing, for reclaiming its slot under pressure.
    activity: Arc<slots::Activity>,
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
    conns: Mutex<Vec<ConnectionHandle>>,
    active_conns: AtomicUsize,
    /// Each connection thread sends one message here as it ends, so a listener at the connection limit can
    /// wait briefly for a slot whose client has already closed rather than refuse a newcomer (see
    /// `accept::ENDING_GRACE`). One slot: a notice that finds it full is dropped (it only wakes the listener).
    ended_tx: crossbeam_channel::Sender<()>,
    ended_rx: crossbeam_channel::Receiver<()>,
    next_seq: AtomicU64,
    served: AtomicU64,
    auth_failures: AtomicU64,
    persist: PersistStore,
    /// Connections closed to make room for a newcomer at `max_connections`.
    reclaimed: AtomicU64,
    /// Jobs that outlive their connection (`submit_code_job`); see `crate::store`.
    store: Arc<JobStore>,
    /// The largest read buffer of the connections that have ended, handed to the next connection, so that
    /// a client opening a connection per large request (scripts, the CLI, the benches) does not fault in
    /// and zero fresh pages for each. One buffer, so at most `max_request_bytes` plus two reads; freed at
    /// stop.
    spare_read_buffer: Mutex<Vec<u8>>,
    running: Mutex<Option<Running>>,
    started: Instant,
    started_unix: f64,
}

/// A running service. Dropping it stops it.
pub struct Server {
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
    /// Set once `stop` has joined every connection: a later `stop` (or the drop) does nothing.
    stopped: bool,
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
                 in Blender. Set a token (a read_token alone is not enough off loopback), or bind 127.0.0.1"
            )));
        }
        crate::config::check_tokens(config.token.as_deref(), config.read_token.as_deref())
            .map_err(|e| StartError::Config(e.0))?;
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
        let (ended_tx, ended_rx) = crossbeam_channel::bounded(1);
        let store = JobStore::new(config.jobs.clone());
        let shared = Arc::new(Shared {
            ended_tx,
            ended_rx,
            queue: JobQueue::new(config.queue_capacity),
            persist: PersistStore::new(config.persist),
            config,
            addr,
            gate: RwLock::new(false),
            stop_requested: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            active_conns: AtomicUsize::new(0),
            next_seq: AtomicU64::new(1),
            served: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            reclaimed: AtomicU64::new(0),
            store,
            spare_read_buffer: Mutex::new(Vec::new()),
            running: Mutex::new(None),
            started: Instant::now(),
            started_unix,
        });
        let s = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("bld_remote-listener".into())
            .spawn(move || {
                let _ = catch_unwind(AssertUnwindSafe(|| accept::accept_loop(&s, &listener)));
            })
            .map_err(|e| StartError::Bind {
                addr: addr.to_string(),
                source: e,
            })?;
        Ok(Server {
            shared,
            listener: Some(handle),
            stopped: false,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The first half of `stop`, safe from inside a running job: close the gate, wake and join the listener
    /// (the port is free when this returns), and refuse the queued jobs. Connections stay open, so the
    /// running job's reply still reaches its client; `stop` finishes the rest. Idempotent.
    pub fn stop_accepting(&mut self) {
        *self.shared.gate.write() = true;
        if let Some(h) = self.listener.take() {
            // Wake the blocking accept() with a connection to ourselves, then join the listener.
            let _ =
                TcpStream::connect_timeout(&wake_addr(self.shared.addr), Duration::from_secs(1));
            let _ = h.join();
        }
        for job in self.shared.queue.drain() {
            job.refuse(not_run("the service is stopping; the request was not run"));
        }
    }

    /// Stop accepting, refuse queued jobs, let every connection flush the replies it owes, close, and join
    /// every thread. Must not be called from inside a running job (`stop_accepting` is the half that may;
    /// the pump finishes with this once the job has replied). Bounded by the write timeout for clients that
    /// do not read.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stop_accepting();
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
        // Every connection is joined: nobody can hand a buffer back any more.
        *self.shared.spare_read_buffer.lock() = Vec::new();
        self.shared.queue.wake();
        self.stopped = true;
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
        let (persist_keys, persist_bytes) = self.persist.usage();
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
            "auth": self.config.token.is_some() || self.config.read_token.is_some(),
            "read_token_set": self.config.read_token.is_some(),
            "running_job": running.map(|r| json!({
                "command": r.command,
                "seq": r.seq,
                "seconds": r.since.elapsed().as_secs_f64(),
            })),
            "auth_failures": self.auth_failures.load(Ordering::Relaxed),
            "connections_reclaimed": self.reclaimed.load(Ordering::Relaxed),
            "limits": {
                "max_request_bytes": self.config.max_request_bytes,
                "max_depth": self.config.max_depth,
                "max_connections": self.config.max_connections,
                "queue_capacity": self.queue.capacity(),
                "max_queued_per_connection": self.config.max_queued_per_connection,
                "max_reply_bytes_in_flight": self.config.max_reply_bytes_in_flight,
                "write_timeout": self.config.write_timeout.as_secs_f64(),
                "idle_timeout": self.config.idle_timeout.map(|d| d.as_secs_f64()),
                "request_read_timeout": self.config.request_read_timeout.as_secs_f64(),
                "default_timeout": self.config.default_timeout.map(|d| d.as_secs_f64()),
                "persist_max_value_bytes": self.config.persist.max_value_bytes,
                "persist_max_total_bytes": self.config.persist.max_total_bytes,
                "persist_max_keys": self.config.persist.max_keys,
            },
            "persist": {"keys": persist_keys, "bytes": persist_bytes},
            "version": env!("CARGO_PKG_VERSION"),
        });
        if let Value::Object(m) = &mut v {
            for (k, val) in &self.config.info {
                m.entry(k.clone()).or_insert_with(|| val.clone());
            }
            self.config.live_info.fill(m);
        }
        v
    }

    /// A connection ended: keep its read buffer for the next one if it is the largest (the other is
    /// freed). Nothing is kept once the service is stopping.
    fn keep_read_buffer(&self, buf: Vec<u8>) {
        if self.is_stopping() {
            return;
        }
        let mut spare = self.spare_read_buffer.lock();
        if buf.len() > spare.len() {
            *spare = buf;
        }
    }

    /// Bytes of the read buffer kept for the next connection.
    pub fn spare_read_buffer_bytes(&self) -> usize {
        self.spare_read_buffer.lock().len()
    }

    /// Persisted values live in the service (not in Blender data), shared by all clients, bounded by
    /// `config.persist` (see `crate::persist`).
    pub fn persist(&self) -> &PersistStore {
        &self.persist
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
}
