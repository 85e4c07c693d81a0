//! The pool's map: run one piece of code once per item over several services, one item in flight per
//! service, each item going to whichever service is free. The one implementation behind `bld_remote.Pool.map`
//! (the Python binding, src/pool.rs) and `bld-remote map` (crates/cli). Pure Rust over [`crate::client`].
//!
//! Threads: [`map`] runs on the caller's thread (the coordinator: it relays events, polls the caller's
//! interrupt hook, and never touches a socket) plus one scoped worker thread per member, each with its own
//! connection; all are joined before [`map`] returns. Nothing here takes the GIL.
//!
//! The rules, which the docs (docs/POOL.md) repeat:
//! - `item` is bound in the code's namespace (parsed from the item's JSON); the code's `result` is the
//!   item's value, returned in item order.
//! - An item whose code raises comes back as that item's error ([`ItemError::Failed`]).
//! - A member whose connection breaks while an item runs: the item's outcome is unknown (it may have run,
//!   in part or whole) and it is **never** sent again unless `retries > 0` (the caller says the code is
//!   idempotent). An item that provably never ran (connection refused before it was sent) goes back to the
//!   queue: that is not a replay.
//! - An owned member (its supervisor restarts it on the same port) is waited for, up to `restart_wait`;
//!   an attached one is dropped. The map always completes: items left when no member remains fail with
//!   [`ItemError::NoInstance`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde_json::{Map, Value};

use crate::client::{exec_output, Client, ClientError, Interrupt};
use crate::instances;

/// Most retries of one item that a caller may ask for.
pub const MAX_RETRIES: u32 = 100;
/// How often a waiting worker looks again (a restarting member, a busy one after a timeout).
const RECHECK: Duration = Duration::from_millis(200);
/// How long a verification (`get_status`) may take: answered on the service's network threads.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// One service of the pool.
#[derive(Debug, Clone)]
pub struct Member {
    pub host: String,
    pub port: u16,
    /// The token to use; `None`: `$BLD_REMOTE_TOKEN`, else the service's descriptor (looked up again after a
    /// restart, since `--token auto` gives the restarted Blender a new one).
    pub token: Option<String>,
    /// Restarted on the same port by its supervisor when it dies (`bld-remote start --instances`): wait for
    /// it instead of dropping it.
    pub owned: bool,
    /// Its process id, as its last `get_status` said (0: not known yet).
    pub pid: u32,
}

impl Member {
    pub fn new(host: impl Into<String>, port: u16, token: Option<String>, owned: bool) -> Self {
        Self {
            host: host.into(),
            port,
            token,
            owned,
            pid: 0,
        }
    }

    pub fn addr_text(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn client(&self, timeout: Option<Duration>) -> Client {
        let token = instances::resolve_token(self.token.clone(), &self.host, self.port);
        // An item is sent once: the client never resends a request on a connection that closed under it
        // (its outcome is then unknown), only after the service said it did not read it (`ran: false`).
        Client::new(self.host.clone(), self.port, timeout, token)
    }
}

/// How [`map`] runs.
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// Per item (and per attempt): the service drops an item still queued when it runs out, and the client
    /// stops waiting for it 2 s later. `None`: as long as it takes.
    pub timeout: Option<Duration>,
    /// Extra attempts for an item whose outcome is unknown or that timed out (never for code that raised).
    pub retries: u32,
    /// How long to wait for an owned member to come back after it died, and for any member to be idle
    /// again after an item timed out on it.
    pub restart_wait: Duration,
    /// Send [`Event`]s to `on_event`, each [`Event::Finished`] with the item's [`outcome_json`] (for a
    /// caller that shows progress or streams results). Off: the coordinator is not woken per item.
    pub events: bool,
}

impl Default for MapOptions {
    fn default() -> Self {
        Self {
            timeout: None,
            retries: 0,
            restart_wait: Duration::from_secs(120),
            events: false,
        }
    }
}

/// Why an item has no value.
#[derive(Debug)]
pub enum ItemError {
    /// The code raised ([`ClientError::Remote`]), or the item timed out ([`ClientError::Timeout`], whose
    /// `ran` says whether it started).
    Failed(ClientError),
    /// The member's connection broke while the item ran (Blender died, or the network): it may have run.
    OutcomeUnknown { addr: String, detail: String },
    /// No member was left to run it; it never ran.
    NoInstance { detail: String },
    /// The caller interrupted the map (Ctrl+C) while it was queued or running.
    Interrupted,
}

impl std::fmt::Display for ItemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Failed(e) => write!(f, "{e}"),
            Self::OutcomeUnknown { addr, detail } => write!(
                f,
                "outcome unknown: the connection to {addr} broke while the item ran ({detail}); it may have \
                 run, and it is not sent again unless retries > 0"
            ),
            Self::NoInstance { detail } => write!(f, "never ran: {detail}"),
            Self::Interrupted => f.write_str("interrupted"),
        }
    }
}

/// Something a caller may want to show while a map runs (a progress bar, a log line).
#[derive(Debug, Clone)]
pub enum Event {
    /// An item was sent to a member (`attempt` 0 is the first).
    Started {
        item: usize,
        member: usize,
        attempt: u32,
    },
    /// An item has its final outcome; `outcome` is its [`outcome_json`] when [`MapOptions::events`].
    Finished {
        item: usize,
        member: Option<usize>,
        ok: bool,
        seconds: f64,
        outcome: Option<Value>,
    },
    /// A member stopped answering; `waiting`: it is owned, and the map waits for its restart.
    MemberDown {
        member: usize,
        detail: String,
        waiting: bool,
    },
    /// An owned member answers again (restarted: a new pid).
    MemberBack { member: usize, pid: u32 },
}

/// Why [`map`] could not run at all (no item ran).
#[derive(Debug)]
pub enum MapError {
    /// No member to run anything on.
    NoInstances(String),
    /// A member answered but refused us (wrong token, an unverifiable service, not `bld_remote`).
    Refused { addr: String, error: ClientError },
    /// The caller's interrupt hook fired before any item was sent.
    Interrupted,
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoInstances(d) => f.write_str(d),
            Self::Refused { addr, error } => write!(
                f,
                "the pool's instance at {addr} refused it ({error}); no item was run. Check its token \
                 (--token, $BLD_REMOTE_TOKEN, or its descriptor), or leave that instance out"
            ),
            Self::Interrupted => f.write_str("interrupted"),
        }
    }
}

impl std::error::Error for MapError {}

/// What [`map`] did.
#[derive(Debug)]
pub struct MapReport {
    /// Per item, in item order: its `result` (None: the code set none), or why it has none.
    pub outcomes: Vec<Result<Option<Value>, ItemError>>,
    /// Members that were dropped (attached and dead, or owned and not back in time): index and why.
    pub dropped: Vec<(usize, String)>,
    /// Each member's pid as last seen (0: never answered).
    pub pids: Vec<u32>,
    /// The caller's hook fired: items not finished are [`ItemError::Interrupted`].
    pub interrupted: bool,
}

/// One item's outcome as JSON, the shape `bld-remote map` prints: `{"item", "ok": true, "result"}` or
/// `{"item", "ok": false, "error": {"kind", "message", ...}}`, where `kind` is `remote` (the code raised:
/// `exception`, `traceback`, `output`), `timeout` (`ran`), `outcome_unknown`, `no_instance`,
/// `interrupted` or `connection`.
pub fn outcome_json(item: usize, outcome: &Result<Option<Value>, ItemError>) -> Value {
    let mut error = Map::new();
    let (kind, ran) = match outcome {
        Ok(v) => {
            return serde_json::json!({"item": item, "ok": true, "result": v.clone().unwrap_or(Value::Null)})
        }
        Err(ItemError::Failed(ClientError::Remote {
            exception,
            traceback,
            reply,
            ..
        })) => {
            error.insert("exception".into(), serde_json::json!(exception));
            error.insert("traceback".into(), serde_json::json!(traceback));
            if let Some(o) = reply.get("output") {
                error.insert("output".into(), o.clone());
            }
            ("remote", Value::Bool(true))
        }
        Err(ItemError::Failed(ClientError::Timeout { ran, .. })) => {
            ("timeout", ran.map_or(Value::Null, Value::Bool))
        }
        Err(ItemError::Failed(_)) => ("connection", Value::Null),
        Err(ItemError::OutcomeUnknown { .. }) => ("outcome_unknown", Value::Null),
        Err(ItemError::NoInstance { .. }) => ("no_instance", Value::Bool(false)),
        Err(ItemError::Interrupted) => ("interrupted", Value::Null),
    };
    error.insert("kind".into(), Value::String(kind.into()));
    if let Err(e) = outcome {
        error.insert("message".into(), Value::String(e.to_string()));
    }
    error.insert("ran".into(), ran);
    serde_json::json!({"item": item, "ok": false, "error": Value::Object(error)})
}

/// A Python string literal (JSON string syntax is valid Python, and `serde_json` never writes `\/`).
fn py_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "''".into())
}

/// The code sent for one item: `item` bound (a Python literal of its JSON value; `json.loads` for deep or
/// unparsable ones), then the caller's code compiled under its own name, so that its tracebacks keep its own
/// line numbers.
pub fn item_code(code_literal: &str, item_json: &str) -> String {
    let binding = serde_json::from_str::<Value>(item_json)
        .ok()
        .and_then(|v| {
            let mut out = String::with_capacity(item_json.len() + 8);
            py_literal(&v, 0, &mut out).then_some(out)
        })
        .unwrap_or_else(|| format!("__import__('json').loads({})", py_str(item_json)));
    format!("item = {binding}\nexec(compile({code_literal}, '<map item>', 'exec'))\n")
}

/// Deepest item written as a literal (Python's parser refuses deeply nested ones; `json.loads` does not).
const LITERAL_DEPTH: usize = 50;

/// `v` as a Python literal; false when it is nested deeper than [`LITERAL_DEPTH`].
fn py_literal(v: &Value, depth: usize, out: &mut String) -> bool {
    if depth > LITERAL_DEPTH {
        return false;
    }
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        // JSON number text is Python number syntax (serde_json writes finite numbers only).
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => out.push_str(&py_str(s)),
        Value::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                if !py_literal(x, depth + 1, out) {
                    return false;
                }
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&py_str(k));
                out.push_str(": ");
                if !py_literal(x, depth + 1, out) {
                    return false;
                }
            }
            out.push('}');
        }
    }
    true
}

struct Queue {
    /// (item, attempts so far)
    pending: VecDeque<(usize, u32)>,
    in_flight: usize,
    live_workers: usize,
    outcomes: Vec<Option<Result<Option<Value>, ItemError>>>,
}

struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    /// The next item for a worker: waits while the queue is empty but items are in flight (one may come
    /// back); `None` when everything is done or the map is stopping.
    fn take(&self) -> Option<(usize, u32)> {
        let mut q = self.queue.lock();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(next) = q.pending.pop_front() {
                q.in_flight += 1;
                return Some(next);
            }
            if q.in_flight == 0 {
                return None;
            }
            self.changed.wait_for(&mut q, RECHECK);
        }
    }

    fn finish(&self, item: usize, outcome: Result<Option<Value>, ItemError>) {
        let mut q = self.queue.lock();
        q.in_flight -= 1;
        q.outcomes[item] = Some(outcome);
        self.changed.notify_all();
    }

    /// Put an item back (at the front: it was started first).
    fn requeue(&self, item: usize, attempts: u32) {
        let mut q = self.queue.lock();
        q.in_flight -= 1;
        q.pending.push_front((item, attempts));
        self.changed.notify_all();
    }

    fn all_done(&self) -> bool {
        let q = self.queue.lock();
        q.pending.is_empty() && q.in_flight == 0
    }

    fn worker_exited(&self) {
        let mut q = self.queue.lock();
        q.live_workers -= 1;
        self.changed.notify_all();
    }

    /// Wait up to `d`, waking early when anything changes (stop, work done).
    fn pause(&self, d: Duration) {
        let mut q = self.queue.lock();
        self.changed.wait_for(&mut q, d);
    }
}

/// The first contact with a member: `get_status` (answered on network threads; it also tells the pid), on a
/// fresh connection (a kept one may have been closed as idle, and this client never resends).
fn verify(client: &mut Client) -> Result<u32, ClientError> {
    verify_status(client).map(|s| {
        s.get("pid")
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0)
    })
}

/// `get_status` on a fresh connection.
fn verify_status(client: &mut Client) -> Result<Value, ClientError> {
    client.close();
    let saved = client.timeout();
    client.set_timeout(Some(VERIFY_TIMEOUT));
    let r = client.status();
    client.set_timeout(saved);
    r
}

/// Errors that mean "nothing is listening / it went away", as opposed to "it answered and refused us".
fn is_absence(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Connect { .. } | ClientError::Lost { .. } | ClientError::Timeout { .. }
    )
}

/// A remote error that is about the connection's credentials, not the item's code (the field, not the text).
fn is_auth_refusal(e: &ClientError) -> bool {
    matches!(e, ClientError::Remote { reply, .. } if reply.get("auth").and_then(Value::as_bool) == Some(false))
}

enum Msg {
    Event(Event),
    Pid(usize, u32),
    Dropped(usize, String),
}

/// Run `code` once per item of `items` (each a JSON text) over `members`. See the module's rules.
#[allow(clippy::too_many_lines)] // verify, run, collect: one linear story
pub fn map(
    members: &[Member],
    code: &str,
    items: &[String],
    opts: &MapOptions,
    interrupted: Interrupt<'_>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<MapReport, MapError> {
    if members.is_empty() {
        return Err(MapError::NoInstances(
            "the pool has no instances (start some with `bld-remote start --background --instances N` or \
             Pool.start(n))"
                .into(),
        ));
    }
    // Verify every member at once, before any item runs: a refusal is the caller's configuration error.
    let verified: Vec<(Client, Result<u32, ClientError>)> = std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter()
            .map(|m| {
                s.spawn(move || {
                    let mut c = m.client(opts.timeout);
                    let r = verify(&mut c);
                    (c, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(members)
            .map(|(h, m)| {
                h.join().unwrap_or_else(|_| {
                    (
                        m.client(opts.timeout),
                        Err(ClientError::Protocol {
                            addr: m.addr_text(),
                            detail: "verification thread panicked".into(),
                        }),
                    )
                })
            })
            .collect()
    });
    let mut pids: Vec<u32> = members.iter().map(|m| m.pid).collect();
    let mut dropped = Vec::new();
    let mut clients = Vec::new();
    let mut reasons = Vec::new();
    for (i, ((client, r), m)) in verified.into_iter().zip(members).enumerate() {
        match r {
            Ok(pid) => {
                pids[i] = pid;
                clients.push((i, client, true));
            }
            Err(e) if is_absence(&e) => {
                reasons.push(format!("  {}: {e}", m.addr_text()));
                if m.owned {
                    // Perhaps restarting right now: its worker waits for it.
                    clients.push((i, client, false));
                } else {
                    dropped.push((i, e.to_string()));
                }
            }
            Err(ClientError::Interrupted) => return Err(MapError::Interrupted),
            Err(error) => {
                return Err(MapError::Refused {
                    addr: m.addr_text(),
                    error,
                })
            }
        }
    }
    if clients.is_empty() {
        return Err(MapError::NoInstances(format!(
            "none of the pool's {} instances answers:\n{}",
            members.len(),
            reasons.join("\n")
        )));
    }

    let shared = Shared {
        queue: Mutex::new(Queue {
            pending: (0..items.len()).map(|i| (i, 0)).collect(),
            in_flight: 0,
            live_workers: clients.len(),
            outcomes: (0..items.len()).map(|_| None).collect(),
        }),
        changed: Condvar::new(),
        stop: AtomicBool::new(false),
    };
    let code_literal = py_str(code);
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut was_interrupted = false;
    std::thread::scope(|s| {
        for (index, client, up) in clients {
            let tx = tx.clone();
            let shared = &shared;
            let code_literal = code_literal.as_str();
            let member = &members[index];
            let _ = std::thread::Builder::new()
                .name(format!("bld-remote-pool-{index}"))
                .spawn_scoped(s, move || {
                    let w = Worker {
                        index,
                        member,
                        client,
                        up,
                        shared,
                        opts,
                        items,
                        code_literal,
                        tx: &tx,
                    };
                    // A panic must not leave the coordinator waiting for this worker.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()));
                    shared.worker_exited();
                })
                .map_err(|_| shared.worker_exited());
        }
        drop(tx);
        // Coordinator: relay events until every worker has gone (the channel closes), polling the hook.
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Event(e)) => on_event(&e),
                Ok(Msg::Pid(i, pid)) => pids[i] = pid,
                Ok(Msg::Dropped(i, why)) => dropped.push((i, why)),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if !was_interrupted && interrupted() {
                was_interrupted = true;
                shared.stop.store(true, Ordering::SeqCst);
                shared.changed.notify_all();
            }
        }
    });

    let q = shared.queue.into_inner();
    let detail = if dropped.is_empty() {
        "no instance was left to run it".to_string()
    } else {
        let list: Vec<String> = dropped
            .iter()
            .map(|(i, why)| format!("{}: {why}", members[*i].addr_text()))
            .collect();
        format!(
            "no instance was left to run it (dropped: {})",
            list.join("; ")
        )
    };
    let mut outcomes = Vec::with_capacity(items.len());
    for (i, o) in q.outcomes.into_iter().enumerate() {
        outcomes.push(match o {
            Some(o) => o,
            None if was_interrupted => Err(ItemError::Interrupted),
            None => {
                let o = Err(ItemError::NoInstance {
                    detail: detail.clone(),
                });
                on_event(&Event::Finished {
                    item: i,
                    member: None,
                    ok: false,
                    seconds: 0.0,
                    outcome: opts.events.then(|| outcome_json(i, &o)),
                });
                o
            }
        });
    }
    Ok(MapReport {
        outcomes,
        dropped,
        pids,
        interrupted: was_interrupted,
    })
}

struct Worker<'a> {
    index: usize,
    member: &'a Member,
    client: Client,
    /// Whether the member answered last time we looked.
    up: bool,
    shared: &'a Shared,
    opts: &'a MapOptions,
    items: &'a [String],
    code_literal: &'a str,
    tx: &'a mpsc::Sender<Msg>,
}

/// What a worker does after an attempt.
enum Next {
    Continue,
    /// The member went away: wait for it (owned) or drop it.
    Recover(String),
    /// The member is unusable for us (refused after a restart): drop it.
    Drop(String),
    /// The member may still be running a timed-out item: wait until it is idle.
    WaitIdle,
}

impl Worker<'_> {
    fn send(&self, e: Event) {
        if self.opts.events {
            let _ = self.tx.send(Msg::Event(e));
        }
    }

    #[allow(clippy::too_many_lines)] // one match over every way an attempt can end
    fn run(mut self) {
        if !self.up && !self.recover("it did not answer when the map began".into()) {
            return;
        }
        let stop = || self.shared.stop.load(Ordering::SeqCst);
        while let Some((item, attempts)) = self.shared.take() {
            self.send(Event::Started {
                item,
                member: self.index,
                attempt: attempts,
            });
            let started = Instant::now();
            // No `changes`: map returns results only, so Blender need not diff the scene per item.
            let params =
                crate::client::exec_params(&item_code(self.code_literal, &self.items[item]), false);
            let r = self.client.call_with("execute_code", params, &stop);
            let seconds = started.elapsed().as_secs_f64();
            let done = |w: &Self, outcome: Result<Option<Value>, ItemError>| {
                let ok = outcome.is_ok();
                let json = w.opts.events.then(|| outcome_json(item, &outcome));
                w.shared.finish(item, outcome);
                w.send(Event::Finished {
                    item,
                    member: Some(w.index),
                    ok,
                    seconds,
                    outcome: json,
                });
            };
            let retry_or = |w: &Self, e: ItemError| {
                if attempts < w.opts.retries {
                    w.shared.requeue(item, attempts + 1);
                } else {
                    done(w, Err(e));
                }
            };
            let next = match r {
                Ok(v) => {
                    done(&self, Ok(exec_output(v).result));
                    Next::Continue
                }
                Err(ClientError::Interrupted) => {
                    done(&self, Err(ItemError::Interrupted));
                    return;
                }
                Err(e) if is_auth_refusal(&e) => {
                    // Refused before it ran (a restarted Blender with another token): not this item's fault.
                    self.shared.requeue(item, attempts);
                    Next::Drop(e.to_string())
                }
                Err(e @ ClientError::Remote { .. }) => {
                    done(&self, Err(ItemError::Failed(e)));
                    Next::Continue
                }
                Err(e @ ClientError::Connect { .. }) => {
                    // Nothing accepted the connection: the item was never sent. Back in the queue (no replay).
                    self.shared.requeue(item, attempts);
                    Next::Recover(e.to_string())
                }
                // Timed out: queued too long (`ran: false`) or still running; either way the member may be busy.
                Err(e @ ClientError::Timeout { .. }) => {
                    retry_or(&self, ItemError::Failed(e));
                    Next::WaitIdle
                }
                Err(ClientError::Lost { addr, detail }) => {
                    let why = format!("connection lost: {detail}");
                    retry_or(&self, ItemError::OutcomeUnknown { addr, detail });
                    Next::Recover(why)
                }
                Err(e) => {
                    // Anything else (a protocol error, a failed verification after a reconnect): the item's
                    // fate is unknown only if it was sent; a refusal on connecting sends nothing, but we
                    // cannot tell those apart here, so be conservative.
                    let why = e.to_string();
                    retry_or(
                        &self,
                        ItemError::OutcomeUnknown {
                            addr: self.member.addr_text(),
                            detail: why.clone(),
                        },
                    );
                    Next::Drop(why)
                }
            };
            match next {
                Next::Continue => {}
                Next::Recover(why) => {
                    if !self.recover(why) {
                        return;
                    }
                }
                Next::Drop(why) => {
                    self.drop_member(why, false);
                    return;
                }
                Next::WaitIdle => {
                    if !self.wait_idle() {
                        return;
                    }
                }
            }
        }
    }

    fn drop_member(&self, why: String, waiting: bool) {
        self.send(Event::MemberDown {
            member: self.index,
            detail: why.clone(),
            waiting,
        });
        if !waiting {
            let _ = self.tx.send(Msg::Dropped(self.index, why));
        }
    }

    /// The member stopped answering. Owned: wait (up to `restart_wait`) for its supervisor to bring it back
    /// on the same port; true when it is back. Attached: drop it.
    fn recover(&mut self, why: String) -> bool {
        self.client.close();
        if !self.member.owned {
            self.drop_member(why, false);
            return false;
        }
        self.drop_member(why.clone(), true);
        let deadline = Instant::now() + self.opts.restart_wait;
        loop {
            if self.shared.stop.load(Ordering::SeqCst) || self.shared.all_done() {
                return false;
            }
            // A fresh client: a restarted Blender with `--token auto` has a new token in its descriptor.
            let mut c = self.member.client(self.opts.timeout);
            match verify(&mut c) {
                Ok(pid) => {
                    self.client = c;
                    let _ = self.tx.send(Msg::Pid(self.index, pid));
                    self.send(Event::MemberBack {
                        member: self.index,
                        pid,
                    });
                    return true;
                }
                Err(_) if Instant::now() < deadline => self.shared.pause(RECHECK),
                Err(e) => {
                    let _ = self.tx.send(Msg::Dropped(
                        self.index,
                        format!(
                            "{why}; not back within {:.0} s ({e})",
                            self.opts.restart_wait.as_secs_f64()
                        ),
                    ));
                    return false;
                }
            }
        }
    }

    /// After a timed-out item the member may still be running it (Blender cannot interrupt it): one in
    /// flight per member means waiting until it is idle (no running job, nothing queued), for at most
    /// `restart_wait` (or the timeout, when longer). False: dropped.
    fn wait_idle(&mut self) -> bool {
        let limit = self
            .opts
            .timeout
            .map_or(self.opts.restart_wait, |t| t.max(self.opts.restart_wait));
        let deadline = Instant::now() + limit;
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return false;
            }
            let status = verify_status(&mut self.client);
            match status {
                Ok(s) => {
                    let idle = s.get("running_job").is_none_or(Value::is_null)
                        && s.get("queue_length").and_then(Value::as_u64).unwrap_or(0) == 0;
                    if idle {
                        return true;
                    }
                }
                Err(e) if is_absence(&e) => return self.recover(e.to_string()),
                Err(e) => {
                    self.drop_member(e.to_string(), false);
                    return false;
                }
            }
            if Instant::now() >= deadline {
                self.drop_member(
                    format!(
                        "still busy {:.0} s after an item timed out",
                        limit.as_secs_f64()
                    ),
                    false,
                );
                return false;
            }
            self.shared.pause(RECHECK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_code_binds_item_and_keeps_the_code_apart() {
        let c = item_code(
            &py_str("result = item['x'] * 2\n"),
            r#"{"x": "a\"b\n", "t": [true, false, null, 1.5, -2, 1e300]}"#,
        );
        assert!(
            c.starts_with(r#"item = {"t": [True, False, None, 1.5, -2, 1e+300], "x": "a\"b\n"}"#),
            "{c}"
        );
        assert!(c.contains("exec(compile(\"result = item['x'] * 2\\n\", '<map item>', 'exec'))"));
        let deep = format!("{}1{}", "[".repeat(60), "]".repeat(60));
        let c = item_code("''", &deep);
        assert!(
            c.starts_with("item = __import__('json').loads(\"[[[["),
            "{c}"
        );
    }

    #[test]
    fn no_members_is_a_clear_error() {
        let r = map(
            &[],
            "result = 1",
            &["1".into()],
            &MapOptions::default(),
            &|| false,
            &mut |_| {},
        );
        assert!(matches!(r, Err(MapError::NoInstances(_))));
    }

    #[test]
    fn nothing_listening_attached_is_no_instances_and_returns_at_once() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().map_or(0, |a| a.port())
        };
        let t0 = Instant::now();
        let r = map(
            &[Member::new("127.0.0.1", port, None, false)],
            "result = 1",
            &["1".into()],
            &MapOptions::default(),
            &|| false,
            &mut |_| {},
        );
        assert!(
            matches!(&r, Err(MapError::NoInstances(d)) if d.contains(&port.to_string())),
            "{r:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
