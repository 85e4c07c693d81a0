//! The job store: jobs that outlive the connection that submitted them (`submit_code_job`,
//! `get_job_status`, `get_job_result`, `cancel_job`, `list_jobs`; blender-remote's names and shapes,
//! docs/COMPAT.md). A submitted job enters the same main-thread queue as every request; only *who waits*
//! changes: its outcome comes here instead of to a connection, and stays until its TTL after it ended.
//!
//! Bounded: at most `max_jobs` records and `max_bytes` of kept results. When full, expired records go,
//! then results that were already read (oldest first); unread results are never dropped before their TTL,
//! so a submission that finds no room gets a clear "busy" error instead. A result that alone would not fit
//! is replaced by an error saying so (the job's status still says how it ended). Results are lost only if
//! Blender exits: nothing is written to disk.
//!
//! Threads: connection threads (submit, status, result, cancel, list: never behind Blender work) and the
//! main thread (`complete`, through [`CompletionSink`], which only takes the lock briefly).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use serde_json::{json, Map, Value};

use crate::jobs::{Completion, CompletionSink, Job, JobState, Phase};
use crate::protocol::Outcome;

/// The store's bounds.
#[derive(Debug, Clone)]
pub struct StoreLimits {
    /// Records kept, whatever their state.
    pub max_jobs: usize,
    /// Bytes of results kept (an estimate of their JSON size).
    pub max_bytes: usize,
    /// How long a result is kept after its job ended.
    pub ttl: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_jobs: 1024,
            max_bytes: 256 << 20,
            ttl: Duration::from_secs(3600),
        }
    }
}

/// How a job ended (or where it is), as blender-remote names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
    TimedOut,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
        }
    }

    pub fn terminal(self) -> bool {
        matches!(
            self,
            Self::Cancelled | Self::Completed | Self::Failed | Self::TimedOut
        )
    }
}

#[derive(Debug)]
struct Record {
    id: String,
    /// The job's seq (unique in the service): tells this record from an older one of the same id in
    /// `order` and `ended_order`, whose entries are dropped lazily.
    seq: u64,
    state: Arc<JobState>,
    created_at: f64,
    updated_at: f64,
    completed_at: Option<f64>,
    ended: Option<Instant>,
    job_timeout: Option<f64>,
    base64: bool,
    cancel_reason: Option<String>,
    /// Set when it ended.
    end: Option<Status>,
    outcome: Option<Outcome>,
    bytes: usize,
    read: bool,
}

impl Record {
    fn status(&self) -> Status {
        if let Some(s) = self.end {
            return s;
        }
        match (self.state.phase(), self.state.cancel_requested()) {
            (Phase::Queued, false) => Status::Queued,
            // Done: settled, its completion not stored yet (a moment): still say where it was.
            (Phase::Running, false) | (Phase::Done, _) => Status::Running,
            (Phase::Queued | Phase::Running, true) | (Phase::Skipped, _) => Status::Cancelling,
        }
    }

    fn snapshot(&self) -> Map<String, Value> {
        let status = self.status();
        let mut m = Map::new();
        m.insert("job_id".into(), Value::from(self.id.as_str()));
        m.insert("status".into(), Value::from(status.name()));
        m.insert(
            "cancel_requested".into(),
            Value::Bool(self.state.cancel_requested()),
        );
        m.insert("terminal".into(), Value::Bool(status.terminal()));
        m.insert("created_at".into(), Value::from(self.created_at));
        m.insert("updated_at".into(), Value::from(self.updated_at));
        m.insert(
            "started_at".into(),
            self.state.started_at().map_or(Value::Null, Value::from),
        );
        m.insert(
            "completed_at".into(),
            self.completed_at.map_or(Value::Null, Value::from),
        );
        m.insert(
            "job_timeout_seconds".into(),
            self.job_timeout.map_or(Value::Null, Value::from),
        );
        let (error, traceback) = match &self.outcome {
            Some(Outcome::Error { message, extra }) => (
                Value::from(message.as_str()),
                extra.get("traceback").cloned().unwrap_or(Value::Null),
            ),
            _ => (Value::Null, Value::Null),
        };
        m.insert("error".into(), error);
        m.insert("traceback".into(), traceback);
        let mut meta = Map::new();
        if let Some(r) = &self.cancel_reason {
            meta.insert("cancel_reason".into(), Value::from(r.as_str()));
        }
        meta.insert("result_read".into(), Value::Bool(self.read));
        m.insert("metadata".into(), Value::Object(meta));
        m
    }

    /// The snapshot with the result: for a completed `submit_code_job`, `execute_code`'s result shape.
    fn with_result(&self) -> Map<String, Value> {
        let mut m = self.snapshot();
        let result = match &self.outcome {
            Some(Outcome::Success(v)) => code_result(v, self.base64),
            Some(Outcome::Error { extra, .. }) => {
                if let Some(out) = extra.get("output") {
                    m.insert("output".into(), out.clone());
                }
                if let Some(e) = extra.get("exception") {
                    m.insert("exception".into(), e.clone());
                }
                Value::Null
            }
            None => {
                m.insert(
                    "message".into(),
                    Value::from(format!(
                        "job {} has not reached a terminal state yet (status: {})",
                        self.id,
                        self.status().name()
                    )),
                );
                Value::Null
            }
        };
        m.insert("result".into(), result);
        m
    }
}

/// `execute_code`'s result shape (COMPAT.md): `{executed, result (stdout), output {stdout, stderr},
/// value?, duration}`, from what the handler returned (`{stdout, stderr, value?, duration}`).
fn code_result(v: &Value, base64: bool) -> Value {
    let Value::Object(m) = v else {
        return v.clone();
    };
    let stdout = m.get("stdout").and_then(Value::as_str).unwrap_or("");
    let stderr = m.get("stderr").cloned().unwrap_or_else(|| Value::from(""));
    let mut r = json!({"executed": true, "output": {"stdout": stdout, "stderr": stderr}});
    if let Value::Object(out) = &mut r {
        if base64 {
            use base64::Engine as _;
            out.insert(
                "result".into(),
                Value::from(base64::engine::general_purpose::STANDARD.encode(stdout)),
            );
            out.insert("result_is_base64".into(), Value::Bool(true));
        } else {
            out.insert("result".into(), Value::from(stdout));
        }
        for (k, val) in m {
            if !matches!(k.as_str(), "stdout" | "stderr") {
                out.insert(k.clone(), val.clone());
            }
        }
    }
    r
}

/// An estimate of a value's JSON size, in O(number of nodes), for the byte bound.
fn approx_bytes(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(a) => 2 + a.iter().map(approx_bytes).sum::<usize>(),
        Value::Object(o) => {
            2 + o
                .iter()
                .map(|(k, v)| k.len() + 4 + approx_bytes(v))
                .sum::<usize>()
        }
    }
}

fn outcome_bytes(o: &Outcome) -> usize {
    match o {
        Outcome::Success(v) => approx_bytes(v),
        Outcome::Error { message, extra } => {
            message.len() + extra.values().map(approx_bytes).sum::<usize>()
        }
    }
}

/// A record's reply, as every job command gives it: the snapshot plus `found: true`.
pub fn found(mut snapshot: Map<String, Value>) -> Outcome {
    snapshot.insert("found".into(), Value::Bool(true));
    Outcome::Success(Value::Object(snapshot))
}

/// What `get_job_result` with a wait finds when it asks without blocking.
#[derive(Debug)]
pub enum ResultNow {
    /// The job has ended (its result), or the id is unknown (`None`).
    Ready(Option<Map<String, Value>>),
    /// Not ended: the waiter is registered, and gets the result through its channel when it ends.
    Waiting,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<String, Record>,
    /// `(seq, id)` in submission order (eviction goes oldest first). Entries of removed records stay
    /// until they reach the front or a compaction drops them, so removing is O(1).
    order: VecDeque<(u64, String)>,
    /// `(ended, seq, id)` in the order jobs ended (so by `ended`: each is stamped under the lock), for
    /// expiring results from the front in O(1), not by scanning every record on every call.
    ended_order: VecDeque<(Instant, u64, String)>,
    by_seq: HashMap<u64, String>,
    bytes: usize,
    /// Connections waiting for a job's end (`get_job_result` with a wait), by job id: the request's seq
    /// and the connection's completion channel, which gets the result when the job ends.
    waiters: HashMap<String, Vec<(u64, crossbeam_channel::Sender<Completion>)>>,
}

impl Inner {
    fn remove(&mut self, id: &str) {
        if let Some(r) = self.records.remove(id) {
            self.bytes = self.bytes.saturating_sub(r.bytes);
        }
        self.waiters.remove(id);
        // Stale entries cost memory only: compact when they outnumber the live ones (amortised O(1)).
        let live = self.records.len();
        if self.order.len() > 2 * live + 64 || self.ended_order.len() > 2 * live + 64 {
            let records = &self.records;
            self.order.retain(|(seq, id)| is_live(records, *seq, id));
            self.ended_order
                .retain(|(_, seq, id)| is_live(records, *seq, id));
        }
    }

    /// A job ended just now (under the lock): stamp it, and queue it for expiry.
    fn mark_ended(&mut self, id: &str) {
        let now = Instant::now();
        if let Some(r) = self.records.get_mut(id) {
            r.ended = Some(now);
            self.ended_order.push_back((now, r.seq, id.to_string()));
        }
    }

    /// A job just ended: its result for every connection waiting for it (marking it read), to be sent
    /// with [`Wakes::send`] once the lock is released, so that a woken writer does not block on it.
    fn wake_waiters(&mut self, id: &str) -> Wakes {
        let Some(waiters) = self.waiters.remove(id) else {
            return Wakes(Vec::new());
        };
        let Some(r) = self.records.get_mut(id) else {
            return Wakes(Vec::new());
        };
        r.read = true;
        let snap = found(r.with_result());
        Wakes(
            waiters
                .into_iter()
                .map(|(seq, tx)| {
                    let c = Completion {
                        seq,
                        outcome: snap.clone(),
                    };
                    (tx, c)
                })
                .collect(),
        )
    }

    fn prune_expired(&mut self, ttl: Duration) {
        while self
            .ended_order
            .front()
            .is_some_and(|(ended, _, _)| ended.elapsed() > ttl)
        {
            if let Some((_, seq, id)) = self.ended_order.pop_front() {
                if is_live(&self.records, seq, &id) {
                    self.remove(&id);
                }
            }
        }
    }

    /// Drop read results, oldest first, until `fits` says there is room. True when there is.
    fn make_room(&mut self, fits: impl Fn(&Inner) -> bool) -> bool {
        while !fits(self) {
            while let Some((seq, id)) = self.order.front() {
                if is_live(&self.records, *seq, id) {
                    break;
                }
                self.order.pop_front();
            }
            let Some(id) = self
                .order
                .iter()
                .find(|(seq, id)| {
                    self.records
                        .get(id)
                        .is_some_and(|r| r.seq == *seq && r.read && r.end.is_some())
                })
                .map(|(_, id)| id.clone())
            else {
                return false;
            };
            self.remove(&id);
        }
        true
    }
}

/// Results for waiting connections, sent after the store's lock is released.
struct Wakes(Vec<(crossbeam_channel::Sender<Completion>, Completion)>);

impl Wakes {
    fn send(self) {
        for (tx, c) in self.0 {
            let _ = tx.send(c);
        }
    }
}

/// Whether `(seq, id)` (an entry of `order` or `ended_order`) is the record stored under `id` now.
fn is_live(records: &HashMap<String, Record>, seq: u64, id: &str) -> bool {
    records.get(id).is_some_and(|r| r.seq == seq)
}

/// The store. Shared by the service's threads (`Arc`); completions reach it through a [`Sink`].
#[derive(Debug)]
pub struct JobStore {
    limits: StoreLimits,
    inner: Mutex<Inner>,
    ended: Condvar,
    next: AtomicU64,
}

/// Why a submission was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum StoreFull {
    Jobs(usize),
    Bytes(usize),
    /// The id the client chose is taken: a job with it was submitted before (and is still kept).
    IdInUse(String),
}

impl std::fmt::Display for StoreFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Jobs(n) => write!(
                f,
                "busy: the job store holds {n} jobs whose results have not been read; read them \
                 (get_job_result) or wait for them to expire, then submit again"
            ),
            Self::Bytes(n) => write!(
                f,
                "busy: the job store's unread results fill its {n} bytes; read them (get_job_result) or \
                 wait for them to expire, then submit again"
            ),
            Self::IdInUse(id) => write!(
                f,
                "job id {id:?} is already in use: a job was submitted with it before (get_job_status tells \
                 how it is doing); this submission was not run"
            ),
        }
    }
}

/// The store's [`CompletionSink`]: holds it weakly, so a job outliving the service does not keep it.
#[derive(Debug)]
struct Sink(Weak<JobStore>);

impl CompletionSink for Sink {
    fn complete(&self, completion: Completion) {
        if let Some(store) = self.0.upgrade() {
            store.complete(completion);
        }
    }
}

impl JobStore {
    pub fn new(limits: StoreLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            inner: Mutex::new(Inner::default()),
            ended: Condvar::new(),
            next: AtomicU64::new(1),
        })
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// Make a job whose outcome this store keeps, and its record (`queued`), under `id` (one the client
    /// chose, checked by the caller) or the next `bld-job-N`. The caller queues the job; if that fails it
    /// refuses it, and the record ends as `failed` with the reason and `ran: false`.
    pub fn create(
        self: &Arc<Self>,
        seq: u64,
        id: Option<String>,
        command: String,
        params: Map<String, Value>,
        job_timeout: Option<Duration>,
        base64: bool,
    ) -> Result<(Job, Map<String, Value>), StoreFull> {
        let mut inner = self.inner.lock();
        inner.prune_expired(self.limits.ttl);
        if let Some(id) = id.as_ref().filter(|id| inner.records.contains_key(*id)) {
            return Err(StoreFull::IdInUse(id.clone()));
        }
        let max_jobs = self.limits.max_jobs;
        if !inner.make_room(|i| i.records.len() < max_jobs) {
            return Err(StoreFull::Jobs(max_jobs));
        }
        let max_bytes = self.limits.max_bytes;
        if !inner.make_room(|i| i.bytes < max_bytes) {
            return Err(StoreFull::Bytes(max_bytes));
        }
        let id =
            id.unwrap_or_else(|| format!("bld-job-{}", self.next.fetch_add(1, Ordering::Relaxed)));
        let mut params = params;
        params.insert("_job_id".into(), Value::from(id.as_str()));
        let sink: Arc<dyn CompletionSink> = Arc::new(Sink(Arc::downgrade(self)));
        let (job, state) = Job::with_sink(seq, command, params, None, sink);
        if let Some(t) = job_timeout {
            state.set_run_budget(t);
        }
        let now = now_unix();
        let record = Record {
            id: id.clone(),
            seq,
            state,
            created_at: now,
            updated_at: now,
            completed_at: None,
            ended: None,
            job_timeout: job_timeout.map(|t| t.as_secs_f64()),
            base64,
            cancel_reason: None,
            end: None,
            outcome: None,
            bytes: 0,
            read: false,
        };
        let snap = record.snapshot();
        inner.by_seq.insert(seq, id.clone());
        inner.order.push_back((seq, id.clone()));
        inner.records.insert(id, record);
        Ok((job, snap))
    }

    /// A job's outcome (main thread, or a connection thread refusing it). Never blocks for long.
    fn complete(&self, c: Completion) {
        let mut inner = self.inner.lock();
        let Some(id) = inner.by_seq.remove(&c.seq) else {
            return;
        };
        let mut outcome = c.outcome;
        let mut bytes = outcome_bytes(&outcome);
        let max_bytes = self.limits.max_bytes;
        if !inner.make_room(|i| i.bytes + bytes <= max_bytes) {
            outcome = Outcome::error(format!(
                "the job ended, but its result ({bytes} bytes) was not kept: the job store's unread \
                 results already fill its {max_bytes} bytes"
            ));
            bytes = outcome_bytes(&outcome);
        }
        let Some(r) = inner.records.get_mut(&id) else {
            return;
        };
        if r.end.is_some() {
            // Cancelled while queued: its record ended then; this is the queue skipping it.
            return;
        }
        let end = match &outcome {
            Outcome::Success(_) => Status::Completed,
            Outcome::Error { extra, .. } => match extra.get("exception").and_then(Value::as_str) {
                Some("JobCancelled") => Status::Cancelled,
                Some("JobTimedOut") => Status::TimedOut,
                _ if extra.get("ran") == Some(&Value::Bool(false))
                    && r.state.cancel_requested() =>
                {
                    Status::Cancelled
                }
                _ => Status::Failed,
            },
        };
        let now = now_unix();
        r.end = Some(end);
        r.outcome = Some(outcome);
        r.bytes = bytes;
        r.completed_at = Some(now);
        r.updated_at = now;
        inner.mark_ended(&id);
        inner.bytes += bytes;
        let wakes = inner.wake_waiters(&id);
        drop(inner);
        wakes.send();
        self.ended.notify_all();
    }

    /// `get_job_result` with a wait, without blocking the connection's reader: the result now if the job
    /// has ended (or `None` for an unknown id), else `Waiting`, with `(seq, tx)` registered to get the
    /// result (as a [`Completion`] of `seq`) when it ends. The connection's writer answers the wait's
    /// expiry itself ([`JobStore::stop_waiting`], then [`JobStore::result`] without a wait).
    pub fn result_or_wait(
        &self,
        id: &str,
        seq: u64,
        tx: &crossbeam_channel::Sender<Completion>,
    ) -> ResultNow {
        let mut inner = self.inner.lock();
        inner.prune_expired(self.limits.ttl);
        let Some(r) = inner.records.get_mut(id) else {
            return ResultNow::Ready(None);
        };
        if r.end.is_some() {
            r.read = true;
            return ResultNow::Ready(Some(r.with_result()));
        }
        inner
            .waiters
            .entry(id.to_string())
            .or_default()
            .push((seq, tx.clone()));
        ResultNow::Waiting
    }

    /// A wait registered by [`JobStore::result_or_wait`] is over (its deadline passed): forget it.
    pub fn stop_waiting(&self, id: &str, seq: u64) {
        let mut inner = self.inner.lock();
        if let Some(w) = inner.waiters.get_mut(id) {
            w.retain(|(s, _)| *s != seq);
            if w.is_empty() {
                inner.waiters.remove(id);
            }
        }
    }

    /// `get_job_status`: the snapshot without the result, or `None` for an unknown id.
    pub fn status(&self, id: &str) -> Option<Map<String, Value>> {
        let mut inner = self.inner.lock();
        inner.prune_expired(self.limits.ttl);
        inner.records.get(id).map(Record::snapshot)
    }

    /// `get_job_result`: the snapshot with the result (waiting up to `wait` for the job to end). Reading
    /// does not consume the result; it marks it as read, so that it may go first when room is needed.
    pub fn result(&self, id: &str, wait: Option<Duration>) -> Option<Map<String, Value>> {
        let deadline = wait.and_then(|w| Instant::now().checked_add(w));
        let mut inner = self.inner.lock();
        inner.prune_expired(self.limits.ttl);
        loop {
            let r = inner.records.get_mut(id)?;
            if r.end.is_some() {
                r.read = true;
                return Some(r.with_result());
            }
            let Some(d) = deadline else {
                return Some(r.with_result());
            };
            if self.ended.wait_until(&mut inner, d).timed_out() {
                return inner.records.get(id).map(Record::with_result);
            }
        }
    }

    /// `cancel_job`: a queued job never runs; a running one is asked to stop (its code sees it at its next
    /// `check_cancelled()`); an ended one keeps its status. `None` for an unknown id.
    pub fn cancel(&self, id: &str, reason: Option<&str>) -> Option<Map<String, Value>> {
        let mut inner = self.inner.lock();
        inner.prune_expired(self.limits.ttl);
        let r = inner.records.get_mut(id)?;
        if r.end.is_none() {
            let never_ran = r.state.cancel();
            r.cancel_reason = reason.map(str::to_string);
            r.updated_at = now_unix();
            if never_ran {
                // It stays in the queue until the main thread skips it; its record says so now.
                let now = now_unix();
                r.end = Some(Status::Cancelled);
                r.completed_at = Some(now);
            }
        }
        let snap = r.snapshot();
        let ended = r.end.is_some();
        if ended && r.ended.is_none() {
            inner.mark_ended(id);
        }
        let wakes = if ended {
            inner.wake_waiters(id)
        } else {
            Wakes(Vec::new())
        };
        drop(inner);
        wakes.send();
        self.ended.notify_all();
        Some(snap)
    }

    /// `list_jobs`: every record's snapshot, oldest first.
    pub fn list(&self) -> Vec<Value> {
        let mut inner = self.inner.lock();
        inner.prune_expired(self.limits.ttl);
        inner
            .order
            .iter()
            .filter_map(|(seq, id)| inner.records.get(id).filter(|r| r.seq == *seq))
            .map(|r| Value::Object(r.snapshot()))
            .collect()
    }

    /// Counts by status, and the store's use of its bounds (for `get_queue_status`).
    pub fn summary(&self) -> Value {
        let mut inner = self.inner.lock();
        inner.prune_expired(self.limits.ttl);
        let mut counts = Map::new();
        for r in inner.records.values() {
            let k = r.status().name();
            let n = counts.get(k).and_then(Value::as_u64).unwrap_or(0) + 1;
            counts.insert(k.into(), Value::from(n));
        }
        json!({
            "jobs": inner.records.len(),
            "by_status": counts,
            "result_bytes": inner.bytes,
            "max_jobs": self.limits.max_jobs,
            "max_result_bytes": self.limits.max_bytes,
            "ttl_seconds": self.limits.ttl.as_secs_f64(),
        })
    }

    /// At stop: jobs still queued are refused by the queue's drain (their records end `failed`, `ran:
    /// false`); this wakes anyone waiting for a result.
    pub fn wake_all(&self) {
        self.ended.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(limits: StoreLimits) -> Arc<JobStore> {
        JobStore::new(limits)
    }

    fn submit(s: &Arc<JobStore>, seq: u64) -> (Job, String) {
        let (job, snap) = s
            .create(seq, None, "execute_code".into(), Map::new(), None, false)
            .unwrap();
        (job, snap["job_id"].as_str().unwrap().to_string())
    }

    #[test]
    fn a_job_runs_ends_and_its_result_is_kept_and_read_many_times() {
        let s = store(StoreLimits::default());
        let (job, id) = submit(&s, 1);
        assert_eq!(s.status(&id).unwrap()["status"], json!("queued"));
        job.begin().unwrap();
        assert_eq!(s.status(&id).unwrap()["status"], json!("running"));
        assert!(s.status(&id).unwrap()["started_at"].is_number());
        job.finish(Outcome::Success(
            json!({"stdout": "hi\n", "stderr": "", "value": 3, "duration": 0.1}),
        ));
        for _ in 0..2 {
            let r = s.result(&id, None).unwrap();
            assert_eq!(r["status"], json!("completed"));
            assert_eq!(r["terminal"], json!(true));
            assert_eq!(r["result"]["result"], json!("hi\n"));
            assert_eq!(r["result"]["output"]["stdout"], json!("hi\n"));
            assert_eq!(r["result"]["value"], json!(3));
        }
        assert!(s.status("bld-job-999").is_none());
    }

    #[test]
    fn waiters_get_the_result_when_the_job_ends_or_is_cancelled_and_can_stop_waiting() {
        let s = store(StoreLimits::default());
        let (tx, rx) = crossbeam_channel::unbounded();
        assert!(matches!(
            s.result_or_wait("nope", 1, &tx),
            ResultNow::Ready(None)
        ));
        let (job, id) = submit(&s, 1);
        assert!(matches!(s.result_or_wait(&id, 10, &tx), ResultNow::Waiting));
        assert!(matches!(s.result_or_wait(&id, 11, &tx), ResultNow::Waiting));
        s.stop_waiting(&id, 11);
        assert!(rx.try_recv().is_err());
        job.begin().unwrap();
        job.finish(Outcome::Success(
            json!({"stdout": "", "stderr": "", "value": 5}),
        ));
        let c = rx.try_recv().unwrap();
        assert_eq!(c.seq, 10);
        let Outcome::Success(v) = c.outcome else {
            panic!("not a success")
        };
        assert_eq!(v["found"], json!(true));
        assert_eq!(v["result"]["value"], json!(5));
        assert_eq!(v["metadata"]["result_read"], json!(true));
        assert!(
            rx.try_recv().is_err(),
            "the waiter that stopped waiting got nothing"
        );
        // Ended: answered at once.
        assert!(matches!(
            s.result_or_wait(&id, 12, &tx),
            ResultNow::Ready(Some(_))
        ));
        // A queued job cancelled: its waiters learn at once.
        let (_job, id) = submit(&s, 2);
        assert!(matches!(s.result_or_wait(&id, 13, &tx), ResultNow::Waiting));
        s.cancel(&id, None).unwrap();
        let c = rx.try_recv().unwrap();
        assert_eq!(c.seq, 13);
        let Outcome::Success(v) = c.outcome else {
            panic!("not a success")
        };
        assert_eq!(v["status"], json!("cancelled"));
    }

    #[test]
    fn a_cancelled_queued_job_never_runs_a_running_one_is_asked() {
        let s = store(StoreLimits::default());
        let (job, id) = submit(&s, 1);
        let snap = s.cancel(&id, Some("changed my mind")).unwrap();
        assert_eq!(snap["status"], json!("cancelled"));
        assert_eq!(snap["metadata"]["cancel_reason"], json!("changed my mind"));
        assert!(job.begin().is_err(), "a cancelled job must not start");
        drop(job);
        assert_eq!(s.status(&id).unwrap()["status"], json!("cancelled"));

        let (job, id) = submit(&s, 2);
        job.begin().unwrap();
        assert_eq!(s.cancel(&id, None).unwrap()["status"], json!("cancelling"));
        let mut extra = Map::new();
        extra.insert("exception".into(), json!("JobCancelled"));
        job.finish(Outcome::error_with("JobCancelled: cancelled", extra));
        assert_eq!(s.status(&id).unwrap()["status"], json!("cancelled"));
        // Ended: a cancel keeps the status.
        assert_eq!(s.cancel(&id, None).unwrap()["status"], json!("cancelled"));
    }

    #[test]
    fn eviction_and_expiry_stay_bounded_and_a_reused_id_is_its_new_record() {
        let s = store(StoreLimits {
            max_jobs: 4,
            ttl: Duration::from_millis(300),
            ..StoreLimits::default()
        });
        // Thousands of jobs through a store of 4, the same client-chosen ids over and over: every
        // submission evicts a read result; the lazy bookkeeping stays bounded.
        for seq in 1..=4000u64 {
            let id = format!("job-{}", seq % 6);
            let (job, snap) = s
                .create(
                    seq,
                    Some(id.clone()),
                    "execute_code".into(),
                    Map::new(),
                    None,
                    false,
                )
                .unwrap();
            assert_eq!(snap["job_id"], json!(id));
            job.begin().unwrap();
            job.finish(Outcome::Success(json!({"value": seq})));
            assert_eq!(s.result(&id, None).unwrap()["result"]["value"], json!(seq));
            let inner = s.inner.lock();
            assert!(inner.records.len() <= 4);
            assert!(inner.order.len() <= 2 * 4 + 64 + 1, "{}", inner.order.len());
            assert!(inner.ended_order.len() <= 2 * 4 + 64 + 1);
        }
        // Oldest first, and each id once: its newest record.
        let listed: Vec<Value> = s.list().iter().map(|v| v["result"].clone()).collect();
        assert_eq!(listed.len(), 4);
        let ids: Vec<Value> = s.list().iter().map(|v| v["job_id"].clone()).collect();
        assert_eq!(
            ids,
            vec![
                json!("job-1"),
                json!("job-2"),
                json!("job-3"),
                json!("job-4")
            ]
        );
        // Expiry from the front of the end order: all four go after the TTL.
        std::thread::sleep(Duration::from_millis(400));
        assert!(s.status("job-4").is_none());
        assert!(s.list().is_empty());
    }

    #[test]
    fn full_store_drops_read_results_first_then_says_busy() {
        let s = store(StoreLimits {
            max_jobs: 2,
            ..StoreLimits::default()
        });
        let (a, ida) = submit(&s, 1);
        let (b, _idb) = submit(&s, 2);
        a.begin().unwrap();
        a.finish(Outcome::Success(json!({})));
        b.begin().unwrap();
        b.finish(Outcome::Success(json!({})));
        // Nothing read yet: no room.
        let e = s
            .create(3, None, "execute_code".into(), Map::new(), None, false)
            .err();
        assert_eq!(e, Some(StoreFull::Jobs(2)));
        assert!(e.unwrap().to_string().starts_with("busy:"));
        // Read one: it goes first.
        s.result(&ida, None).unwrap();
        let (_c, _) = submit(&s, 3);
        assert!(s.status(&ida).is_none());
    }

    #[test]
    fn a_result_too_large_for_the_store_is_replaced_by_an_error() {
        let s = store(StoreLimits {
            max_bytes: 1000,
            ..StoreLimits::default()
        });
        let (job, id) = submit(&s, 1);
        job.begin().unwrap();
        job.finish(Outcome::Success(json!({"stdout": "x".repeat(5000)})));
        let r = s.result(&id, None).unwrap();
        assert!(
            r["error"].as_str().unwrap().contains("was not kept"),
            "{r:?}"
        );
    }

    #[test]
    fn result_waits_for_the_end_and_expired_records_go() {
        let s = store(StoreLimits {
            ttl: Duration::from_millis(50),
            ..StoreLimits::default()
        });
        let (job, id) = submit(&s, 1);
        job.begin().unwrap();
        let t = std::thread::spawn(move || {
            job.finish(Outcome::Success(json!({"stdout": "late"})));
        });
        let r = s.result(&id, Some(Duration::from_secs(10))).unwrap();
        t.join().unwrap();
        assert_eq!(r["status"], json!("completed"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.status(&id).is_some() {
            assert!(Instant::now() < deadline, "never expired");
            std::thread::yield_now();
        }
    }
}
