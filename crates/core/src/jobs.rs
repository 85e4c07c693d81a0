//! Jobs: requests that need Blender's main thread, handed over from connection threads through one bounded
//! queue with a lane per connection, served round-robin (`JobQueue`, `Lane`), and each connection's reply
//! budget (`Flow`). Each job's outcome goes back through its connection's completion channel, tagged
//! with the job's sequence number, so one writer thread can wait for all of its connection's jobs (and
//! their deadlines) at once. Pure Rust.
//!
//! Threads: connection threads create jobs and collect completions; Blender's main thread (the pump,
//! driven from Python) takes jobs and completes them. Completing never blocks the main thread.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};
use serde_json::{Map, Value};

use crate::protocol::Outcome;

/// What the main thread receives: a job, or a nudge to return to Python (a signal arrived, or a stop was
/// requested) without any work.
#[derive(Debug)]
pub enum Msg {
    Job(Job),
    Wake,
}

/// Where a job is in its life. Stored in [`JobState`]'s `AtomicU8` (as `Phase as u8`) so that the
/// connection and the main thread change it by compare-and-swap, without a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Phase {
    /// Waiting in the queue for the main thread.
    #[default]
    Queued = 0,
    /// Claimed by the main thread and running.
    Running = 1,
    /// Ran and finished.
    Done = 2,
    /// Never ran and never will (cancelled, expired, refused).
    Skipped = 3,
}

impl Phase {
    /// The phase stored as `byte`. Only `Phase as u8` values are ever stored; anything else reads as
    /// `Skipped` (the answer that never claims work ran).
    pub fn from_u8(byte: u8) -> Self {
        match byte {
            0 => Self::Queued,
            1 => Self::Running,
            2 => Self::Done,
            _ => Self::Skipped,
        }
    }

    /// The name clients see in `cancel` replies: `queued`, `running`, `finished` or `skipped`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "finished",
            Self::Skipped => "skipped",
        }
    }

    /// Still owed work or a result (queued or running).
    pub fn is_pending(self) -> bool {
        matches!(self, Self::Queued | Self::Running)
    }
}

/// Where a job stands when its deadline passes (see [`JobState::expire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// It had not started; it is now marked so that it never will.
    NotRun,
    /// It is running on the main thread; its result will be discarded.
    Running,
    /// It already finished or was skipped: its completion is on the way.
    Settled,
}

/// State a job shares with the connection waiting for it: whether it started, and whether it was cancelled.
#[derive(Debug, Default)]
pub struct JobState {
    phase: AtomicU8,
    cancelled: AtomicBool,
    /// When the main thread claimed it (Unix time in ms; 0: not yet).
    started_unix_ms: AtomicU64,
    /// How long it may run before `check_cancelled()` raises (ms; 0: no limit): a job's
    /// `job_timeout_seconds`.
    run_budget_ms: AtomicU64,
}

impl JobState {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::SeqCst))
    }

    fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    /// Move from `from` to `to` if the job is still in `from`; `Err` holds the phase it was in instead.
    fn swap(&self, from: Phase, to: Phase) -> Result<(), Phase> {
        self.phase
            .compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ())
            .map_err(Phase::from_u8)
    }

    /// Ask that the job not run. Returns true when it had not started yet (it never will).
    pub fn cancel(&self) -> bool {
        self.cancelled.store(true, Ordering::SeqCst);
        self.swap(Phase::Queued, Phase::Skipped).is_ok()
    }

    /// The deadline passed: make sure a job that has not started never does, and say where it stands.
    pub fn expire(&self) -> Expiry {
        match self.swap(Phase::Queued, Phase::Skipped) {
            Ok(()) => Expiry::NotRun,
            Err(Phase::Running) => Expiry::Running,
            Err(_) => Expiry::Settled,
        }
    }

    pub fn started(&self) -> bool {
        matches!(self.phase(), Phase::Running | Phase::Done)
    }

    /// Whether a cancel was asked for (queued or running).
    pub fn cancel_requested(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// When the main thread claimed it, as Unix seconds.
    pub fn started_at(&self) -> Option<f64> {
        let ms = self.started_unix_ms.load(Ordering::SeqCst);
        #[allow(clippy::cast_precision_loss)] // ms since 1970 fit f64's 52 bits for 100k years
        (ms != 0).then(|| ms as f64 / 1000.0)
    }

    /// Let the job run for at most `budget` (checked cooperatively, by `check_cancelled()`).
    pub fn set_run_budget(&self, budget: Duration) {
        let ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX).max(1);
        self.run_budget_ms.store(ms, Ordering::SeqCst);
    }

    /// True when the job has run longer than its budget.
    pub fn over_budget(&self) -> bool {
        let budget = self.run_budget_ms.load(Ordering::SeqCst);
        let started = self.started_unix_ms.load(Ordering::SeqCst);
        budget != 0 && started != 0 && unix_ms().saturating_sub(started) > budget
    }

    pub fn finished(&self) -> bool {
        self.phase() == Phase::Done
    }

    /// `queued`, `running`, `finished` or `skipped` (cancelled or expired before it started).
    pub fn phase_name(&self) -> &'static str {
        self.phase().name()
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where a job's outcome goes: its connection's completion channel, or something else that keeps it (the
/// job store, for jobs that outlive their connection). `complete` runs on the main thread: it must not
/// block.
pub trait CompletionSink: Send + Sync + std::fmt::Debug {
    fn complete(&self, completion: Completion);
}

impl CompletionSink for Sender<Completion> {
    fn complete(&self, completion: Completion) {
        let _ = self.send(completion);
    }
}

/// A job's outcome, tagged with its sequence number, on its connection's completion channel.
#[derive(Debug)]
pub struct Completion {
    pub seq: u64,
    pub outcome: Outcome,
}

/// One request for the main thread. Dropped without an outcome (a bug, or a service torn down with jobs
/// still queued), it still completes, so no connection ever waits for it forever.
#[derive(Debug)]
pub struct Job {
    pub seq: u64,
    pub command: String,
    pub params: Map<String, Value>,
    pub deadline: Option<Instant>,
    pub state: Arc<JobState>,
    reply: Option<Arc<dyn CompletionSink>>,
    /// Where progress reports go while the job runs (framed requests only; see [`Job::with_progress`]).
    progress: Option<Sender<Progress>>,
}

/// A progress report from a running job (`{"progress": p, "total": t, "message": m}`), on its
/// connection's progress channel. The writer sends it as `{"id": N, "progress": {...}}`.
#[derive(Debug)]
pub struct Progress {
    pub seq: u64,
    pub value: Value,
}

/// What the main thread (or a render thread of Blender's) holds to report a running job's progress.
#[derive(Debug, Clone)]
pub struct ProgressSink {
    seq: u64,
    tx: Sender<Progress>,
    state: Arc<JobState>,
}

impl ProgressSink {
    /// Send a report if the job is still running. Never blocks: a full channel drops the report.
    pub fn report(&self, value: Value) -> bool {
        self.state.phase() == Phase::Running
            && self
                .tx
                .try_send(Progress {
                    seq: self.seq,
                    value,
                })
                .is_ok()
    }
}

impl Job {
    /// A job whose outcome goes to `reply` (its connection's completion channel, which must be unbounded
    /// so that completing never blocks the main thread).
    pub fn new(
        seq: u64,
        command: String,
        params: Map<String, Value>,
        deadline: Option<Instant>,
        reply: Sender<Completion>,
    ) -> (Job, Arc<JobState>) {
        Self::with_sink(seq, command, params, deadline, Arc::new(reply))
    }

    /// A job whose outcome goes to `sink` (which must never block).
    pub fn with_sink(
        seq: u64,
        command: String,
        params: Map<String, Value>,
        deadline: Option<Instant>,
        sink: Arc<dyn CompletionSink>,
    ) -> (Job, Arc<JobState>) {
        let state = Arc::new(JobState::default());
        (
            Job {
                seq,
                command,
                params,
                deadline,
                state: Arc::clone(&state),
                reply: Some(sink),
                progress: None,
            },
            state,
        )
    }

    /// Let the job report progress to `tx` (a bounded channel: reports never block the main thread).
    #[must_use]
    pub fn with_progress(mut self, tx: Sender<Progress>) -> Self {
        self.progress = Some(tx);
        self
    }

    /// A handle for reporting this job's progress while it runs; `None` when nobody listens.
    pub fn progress_sink(&self) -> Option<ProgressSink> {
        self.progress.as_ref().map(|tx| ProgressSink {
            seq: self.seq,
            tx: tx.clone(),
            state: Arc::clone(&self.state),
        })
    }

    /// Claim the job for running now. `Err` carries the reply to send instead: the job was cancelled or its
    /// deadline passed while it was queued, so it must never run late.
    pub fn begin(&self) -> Result<(), Outcome> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.state.set(Phase::Skipped);
            return Err(timed_out_not_run(
                "timed out while queued: the request was not run and never will be",
            ));
        }
        if self.state.swap(Phase::Queued, Phase::Running).is_err()
            || self.state.cancelled.load(Ordering::SeqCst)
        {
            self.state.set(Phase::Skipped);
            return Err(not_run("the request was cancelled before it started"));
        }
        self.state
            .started_unix_ms
            .store(unix_ms().max(1), Ordering::SeqCst);
        Ok(())
    }

    /// Hand the outcome back. Never blocks; a vanished connection is fine.
    pub fn finish(mut self, outcome: Outcome) {
        // Only a running job becomes done: one skipped meanwhile stays skipped.
        let _ = self.state.swap(Phase::Running, Phase::Done);
        self.send(outcome);
    }

    /// Reply without running (service stopping, cancelled...).
    pub fn refuse(mut self, outcome: Outcome) {
        let _ = self.state.swap(Phase::Queued, Phase::Skipped);
        self.send(outcome);
    }

    fn send(&mut self, outcome: Outcome) {
        if let Some(sink) = self.reply.take() {
            sink.complete(Completion {
                seq: self.seq,
                outcome,
            });
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.reply.is_none() {
            return;
        }
        let outcome = if self.state.expire() == Expiry::NotRun {
            not_run("the request was dropped before it ran (the service is stopping)")
        } else {
            let mut extra = Map::new();
            extra.insert("ran".into(), Value::from("unknown"));
            Outcome::error_with("the request was lost while running (internal error)", extra)
        };
        self.send(outcome);
    }
}

/// An error reply for work that did not run, with `"ran": false` so clients know it is safe to retry.
pub fn not_run(message: &str) -> Outcome {
    let mut extra = Map::new();
    extra.insert("ran".into(), Value::Bool(false));
    Outcome::error_with(message, extra)
}

/// A deadline passed before the work started: `"ran": false, "timeout": true`.
pub fn timed_out_not_run(message: &str) -> Outcome {
    let mut extra = Map::new();
    extra.insert("ran".into(), Value::Bool(false));
    extra.insert("timeout".into(), Value::Bool(true));
    Outcome::error_with(message, extra)
}

/// A deadline passed while the work was running: `"ran": "unknown", "state": "running", "timeout": true`.
pub fn timed_out_running() -> Outcome {
    let mut extra = Map::new();
    extra.insert("ran".into(), Value::from("unknown"));
    extra.insert("state".into(), Value::from(Phase::Running.name()));
    extra.insert("timeout".into(), Value::Bool(true));
    Outcome::error_with(
        "timed out: the request started in Blender and may still be running; its result will be discarded",
        extra,
    )
}

/// Why a job could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The whole queue is full.
    Busy,
    /// This connection already has its share of queued jobs (`max_queued_per_connection`).
    ConnectionBusy,
    Stopped,
}

/// Flow control of one connection's replies: the encoded bytes its writer holds that the client has not
/// read yet, against a budget. Over budget, the connection's reader stops reading requests and the queue
/// stops starting its jobs, until the client reads (or the connection dies: then everything proceeds, to
/// be refused). Shared by the connection's threads and the job queue; lock-free except while waiting.
#[derive(Debug)]
pub struct Flow {
    budget: usize,
    held: AtomicUsize,
    closed: AtomicBool,
    lock: Mutex<()>,
    room: Condvar,
}

impl Flow {
    pub fn new(budget: usize) -> Self {
        Self {
            budget: budget.max(1),
            held: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            lock: Mutex::new(()),
            room: Condvar::new(),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes held unwritten now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// `n` more bytes are waiting to be written.
    pub fn hold(&self, n: usize) {
        self.held.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` held bytes were written (or dropped). True when this brought the connection back under budget.
    pub fn release(&self, n: usize) -> bool {
        let before = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                Some(h.saturating_sub(n))
            })
            .unwrap_or(0);
        let crossed = before >= self.budget && before.saturating_sub(n) < self.budget;
        if crossed {
            // Taken after the change, so a waiter that re-checks under the lock cannot miss it.
            let _guard = self.lock.lock();
            self.room.notify_all();
        }
        crossed
    }

    /// Under budget (or closed: nothing will be written any more, so nothing should wait for it).
    pub fn has_room(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.held() < self.budget
    }

    /// The connection is ending: wake whoever waits for room.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _guard = self.lock.lock();
        self.room.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Wait at most `timeout` for room; returns whether there is room now.
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        if self.has_room() {
            return true;
        }
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            return self.has_room();
        };
        let mut guard = self.lock.lock();
        while !self.has_room() {
            if self.room.wait_until(&mut guard, deadline).timed_out() {
                break;
            }
        }
        self.has_room()
    }
}

/// One connection's jobs in the queue.
#[derive(Debug, Default)]
struct LaneJobs {
    jobs: VecDeque<Job>,
    flow: Option<Arc<Flow>>,
    /// In the ring, or the lane served last (`QueueState::current`). A lane with jobs that is not
    /// scheduled is paused: its writer is over budget; `Lane::release` reschedules it.
    scheduled: bool,
}

#[derive(Debug, Default)]
struct QueueState {
    lanes: HashMap<u64, LaneJobs>,
    /// Lanes with jobs, in the order they are served.
    ring: VecDeque<u64>,
    /// The lane whose job was taken last: it goes to the back of the ring at the next take, so a lane that
    /// gains a job meanwhile is served before it again.
    current: Option<u64>,
    len: usize,
    woken: bool,
    next_lane: u64,
}

impl QueueState {
    /// The next job, round-robin between lanes, first-in first-out within one; lanes over their reply
    /// budget are skipped (paused).
    fn take(&mut self) -> Option<Job> {
        if let Some(last) = self.current.take() {
            if let Some(lane) = self.lanes.get_mut(&last) {
                if lane.jobs.is_empty() {
                    lane.scheduled = false;
                } else {
                    self.ring.push_back(last);
                }
            }
        }
        while let Some(id) = self.ring.pop_front() {
            let Some(lane) = self.lanes.get_mut(&id) else {
                continue;
            };
            if lane.jobs.is_empty() || lane.flow.as_ref().is_some_and(|f| !f.has_room()) {
                lane.scheduled = false;
                continue;
            }
            let job = lane.jobs.pop_front();
            if job.is_some() {
                self.len -= 1;
                self.current = Some(id);
            }
            return job;
        }
        None
    }

    fn schedule(&mut self, id: u64) -> bool {
        match self.lanes.get_mut(&id) {
            Some(lane) if !lane.scheduled && !lane.jobs.is_empty() => {
                lane.scheduled = true;
                self.ring.push_back(id);
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
struct QueueInner {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
}

/// The queue between connection threads and the main thread: one lane per connection, served
/// round-robin (a connection with 1000 jobs queued delays another's next job by at most the job running
/// now), first-in first-out within a lane (replies leave in request order). Bounded as a whole
/// (`capacity`) and per lane (the cap given to [`Lane::submit`]).
#[derive(Debug, Clone)]
pub struct JobQueue {
    inner: Arc<QueueInner>,
}

/// Lane 0: jobs submitted without a connection of their own ([`JobQueue::submit`]).
const DEFAULT_LANE: u64 = 0;

impl JobQueue {
    pub fn new(capacity: usize) -> Self {
        let mut state = QueueState {
            next_lane: DEFAULT_LANE + 1,
            ..QueueState::default()
        };
        state.lanes.insert(DEFAULT_LANE, LaneJobs::default());
        Self {
            inner: Arc::new(QueueInner {
                state: Mutex::new(state),
                ready: Condvar::new(),
                capacity: capacity.max(1),
            }),
        }
    }

    /// A lane for one connection, whose jobs wait while `flow` is over budget. Dropping the lane drops its
    /// queued jobs (each still completes, as not run).
    pub fn lane(&self, flow: Arc<Flow>) -> Lane {
        let mut st = self.inner.state.lock();
        let id = st.next_lane;
        st.next_lane += 1;
        st.lanes.insert(
            id,
            LaneJobs {
                flow: Some(Arc::clone(&flow)),
                ..LaneJobs::default()
            },
        );
        Lane {
            id,
            flow,
            queue: self.clone(),
        }
    }

    /// Queue a job on the default lane (no per-lane cap). On error the job comes back, so the caller can
    /// refuse it with the right message.
    pub fn submit(&self, job: Job) -> Result<(), (SubmitError, Job)> {
        self.submit_to(DEFAULT_LANE, job, usize::MAX)
    }

    fn submit_to(&self, id: u64, job: Job, cap: usize) -> Result<(), (SubmitError, Job)> {
        let mut st = self.inner.state.lock();
        if st.len >= self.inner.capacity {
            return Err((SubmitError::Busy, job));
        }
        let Some(lane) = st.lanes.get_mut(&id) else {
            return Err((SubmitError::Stopped, job));
        };
        if lane.jobs.len() >= cap {
            return Err((SubmitError::ConnectionBusy, job));
        }
        lane.jobs.push_back(job);
        st.len += 1;
        st.schedule(id);
        drop(st);
        self.inner.ready.notify_one();
        Ok(())
    }

    fn resume(&self, id: u64) {
        let scheduled = self.inner.state.lock().schedule(id);
        if scheduled {
            self.inner.ready.notify_one();
        }
    }

    fn close_lane(&self, id: u64) {
        let lane = {
            let mut st = self.inner.state.lock();
            let lane = st.lanes.remove(&id);
            if let Some(l) = &lane {
                st.len -= l.jobs.len();
            }
            lane
        };
        // Dropped outside the lock: each job's `Drop` completes it (as not run).
        drop(lane);
    }

    /// Make a blocked pump return to its caller. Harmless if it is not blocked.
    pub fn wake(&self) {
        self.inner.state.lock().woken = true;
        self.inner.ready.notify_all();
    }

    /// Jobs queued (not yet taken by the main thread).
    pub fn len(&self) -> usize {
        self.inner.state.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Next message, waiting at most `timeout` (`None` = until one arrives). A pending wake-up comes
    /// before any job.
    pub fn recv(&self, timeout: Option<Duration>) -> Option<Msg> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = self.inner.state.lock();
        loop {
            if st.woken {
                st.woken = false;
                return Some(Msg::Wake);
            }
            if let Some(job) = st.take() {
                return Some(Msg::Job(job));
            }
            match (timeout, deadline) {
                (None, _) | (Some(_), None) => self.inner.ready.wait(&mut st),
                (Some(_), Some(d)) => {
                    if self.inner.ready.wait_until(&mut st, d).timed_out() {
                        if std::mem::take(&mut st.woken) {
                            return Some(Msg::Wake);
                        }
                        return st.take().map(Msg::Job);
                    }
                }
            }
        }
    }

    /// Take every queued job without running it (used while stopping).
    pub fn drain(&self) -> Vec<Job> {
        let mut st = self.inner.state.lock();
        let mut jobs = Vec::with_capacity(st.len);
        for lane in st.lanes.values_mut() {
            jobs.extend(lane.jobs.drain(..));
            lane.scheduled = false;
        }
        st.ring.clear();
        st.current = None;
        st.len = 0;
        jobs
    }
}

/// A connection's place in the [`JobQueue`]: submits its jobs, and reschedules them when its writer
/// drains below budget. Dropped when the connection ends; its queued jobs are dropped with it.
#[derive(Debug)]
pub struct Lane {
    id: u64,
    flow: Arc<Flow>,
    queue: JobQueue,
}

impl Lane {
    /// Queue a job; at most `cap` of this lane's jobs may wait at once.
    pub fn submit(&self, job: Job, cap: usize) -> Result<(), (SubmitError, Job)> {
        self.queue.submit_to(self.id, job, cap)
    }

    pub fn flow(&self) -> &Arc<Flow> {
        &self.flow
    }

    /// Held reply bytes were written: release them, and restart this lane's jobs if that brought the
    /// connection back under budget.
    pub fn release(&self, n: usize) {
        if self.flow.release(n) {
            self.queue.resume(self.id);
        }
    }

    /// The connection is ending: nothing waits for its writer any more.
    pub fn close(&self) {
        self.flow.close();
        self.queue.resume(self.id);
    }

    /// This lane's jobs waiting for the main thread.
    pub fn queued(&self) -> usize {
        self.queue
            .inner
            .state
            .lock()
            .lanes
            .get(&self.id)
            .map_or(0, |l| l.jobs.len())
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.queue.close_lane(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::Receiver;
    use serde_json::json;

    fn job(seq: u64, deadline: Option<Instant>) -> (Job, Arc<JobState>, Receiver<Completion>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (job, state) = Job::new(seq, "x".into(), Map::new(), deadline, tx);
        (job, state, rx)
    }

    #[test]
    fn phases_round_trip_through_their_byte() {
        for phase in [Phase::Queued, Phase::Running, Phase::Done, Phase::Skipped] {
            assert_eq!(Phase::from_u8(phase as u8), phase);
        }
        assert_eq!(Phase::from_u8(200), Phase::Skipped);
        assert_eq!(JobState::default().phase(), Phase::Queued);
    }

    #[test]
    fn job_round_trip() {
        let q = JobQueue::new(4);
        let (j, state, done) = job(1, None);
        assert!(q.submit(j).is_ok());
        let Some(Msg::Job(j)) = q.recv(Some(Duration::from_millis(100))) else {
            panic!("no job")
        };
        assert!(j.begin().is_ok());
        assert!(state.started());
        assert_eq!(state.phase(), Phase::Running);
        j.finish(Outcome::Success(json!(1)));
        let c = done.try_recv().ok();
        assert!(
            matches!(c, Some(Completion { seq: 1, outcome: Outcome::Success(ref v) }) if *v == json!(1))
        );
        assert!(state.finished());
    }

    #[test]
    fn cancelled_or_expired_jobs_never_begin() {
        let (j, state, _done) = job(1, None);
        assert!(state.cancel());
        assert!(j.begin().is_err());
        assert!(!state.started());

        let (j, state, _done) = job(2, Some(Instant::now()));
        let err = j.begin().err();
        assert!(
            matches!(err, Some(Outcome::Error { ref extra, .. }) if extra["ran"] == json!(false))
        );
        assert!(!state.started());

        // Cancelling a running job does not un-start it.
        let (j, state, _done) = job(3, None);
        assert!(j.begin().is_ok());
        assert!(!state.cancel());
        assert!(state.started());
    }

    #[test]
    fn expiry_says_where_the_job_stands() {
        let (j, state, _done) = job(1, None);
        assert_eq!(state.expire(), Expiry::NotRun);
        assert!(j.begin().is_err(), "an expired job must never start");
        let (j, state, _done) = job(2, None);
        assert!(j.begin().is_ok());
        assert_eq!(state.expire(), Expiry::Running);
        j.finish(Outcome::Success(Value::Null));
        assert_eq!(state.expire(), Expiry::Settled);
    }

    #[test]
    fn a_dropped_job_still_completes() {
        let (j, _state, done) = job(7, None);
        drop(j);
        let c = done.try_recv().ok();
        assert!(
            matches!(c, Some(Completion { seq: 7, outcome: Outcome::Error { ref extra, .. } }) if extra["ran"] == json!(false))
        );
        // ...exactly once.
        let (j, _state, done) = job(8, None);
        j.finish(Outcome::Success(Value::Null));
        assert!(done.try_recv().is_ok());
        assert!(done.try_recv().is_err());
    }

    #[test]
    fn progress_reaches_the_listener_only_while_the_job_runs() {
        let (j, _state, _done) = job(5, None);
        assert!(
            j.progress_sink().is_none(),
            "plain jobs have no progress listener"
        );
        let (ptx, prx) = crossbeam_channel::bounded(4);
        let j = j.with_progress(ptx);
        let sink = j.progress_sink();
        assert!(
            sink.as_ref()
                .is_some_and(|s| !s.report(json!({"progress": 0}))),
            "not running yet"
        );
        assert!(j.begin().is_ok());
        assert!(sink
            .as_ref()
            .is_some_and(|s| s.report(json!({"progress": 1}))));
        let p = prx.try_recv().ok();
        assert!(
            matches!(p, Some(Progress { seq: 5, ref value }) if *value == json!({"progress": 1}))
        );
        j.finish(Outcome::Success(Value::Null));
        assert!(
            sink.is_some_and(|s| !s.report(json!({"progress": 2}))),
            "finished"
        );
    }

    #[test]
    fn full_queue_is_busy_and_gives_the_job_back_but_can_still_be_woken() {
        let q = JobQueue::new(2);
        for i in 0..2 {
            assert!(q.submit(job(i, None).0).is_ok());
        }
        let r = q.submit(job(9, None).0);
        assert!(matches!(r, Err((SubmitError::Busy, ref j)) if j.seq == 9));
        q.wake();
        assert_eq!(q.len(), 2);
        assert!(matches!(q.recv(Some(Duration::ZERO)), Some(Msg::Wake)));
        assert_eq!(q.drain().len(), 2);
        assert!(q.is_empty());
        assert!(q.recv(Some(Duration::ZERO)).is_none());
    }

    fn seq_of(m: Option<Msg>) -> u64 {
        match m {
            Some(Msg::Job(j)) => j.seq,
            other => panic!("expected a job, got {other:?}"),
        }
    }

    #[test]
    fn lanes_are_served_round_robin_and_fifo_within_each() {
        let q = JobQueue::new(100);
        let a = q.lane(Arc::new(Flow::new(1 << 20)));
        let b = q.lane(Arc::new(Flow::new(1 << 20)));
        for i in 0..5 {
            assert!(a.submit(job(i, None).0, 100).is_ok());
        }
        assert_eq!(seq_of(q.recv(Some(Duration::ZERO))), 0);
        // b arrives while a's job 0 "runs": b goes next, before a's job 1.
        assert!(b.submit(job(100, None).0, 100).is_ok());
        assert!(b.submit(job(101, None).0, 100).is_ok());
        let order: Vec<u64> = (0..6)
            .map(|_| seq_of(q.recv(Some(Duration::ZERO))))
            .collect();
        assert_eq!(order, [100, 1, 101, 2, 3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_lane_has_its_own_cap() {
        let q = JobQueue::new(100);
        let a = q.lane(Arc::new(Flow::new(1 << 20)));
        let b = q.lane(Arc::new(Flow::new(1 << 20)));
        for i in 0..3 {
            assert!(a.submit(job(i, None).0, 3).is_ok());
        }
        assert!(matches!(
            a.submit(job(3, None).0, 3),
            Err((SubmitError::ConnectionBusy, _))
        ));
        assert!(b.submit(job(10, None).0, 3).is_ok());
        assert_eq!(a.queued(), 3);
        // Dropping a lane drops its jobs, and each still completes (as not run).
        let (dropped, _state, done) = job(20, None);
        let third = q.lane(Arc::new(Flow::new(1 << 20)));
        assert!(third.submit(dropped, 3).is_ok());
        drop(third);
        assert_eq!(q.len(), 4);
        assert!(done.try_recv().is_ok());
    }

    #[test]
    fn a_lane_over_its_reply_budget_waits_until_released() {
        let q = JobQueue::new(100);
        let flow = Arc::new(Flow::new(1000));
        let a = q.lane(Arc::clone(&flow));
        let b = q.lane(Arc::new(Flow::new(1000)));
        flow.hold(1500);
        assert!(!flow.has_room());
        assert!(a.submit(job(1, None).0, 10).is_ok());
        assert!(b.submit(job(2, None).0, 10).is_ok());
        assert_eq!(seq_of(q.recv(Some(Duration::ZERO))), 2);
        assert!(q.recv(Some(Duration::ZERO)).is_none(), "a is paused");
        assert_eq!(q.len(), 1);
        a.release(400);
        assert!(q.recv(Some(Duration::ZERO)).is_none(), "still over budget");
        a.release(400);
        assert!(flow.has_room());
        assert_eq!(seq_of(q.recv(Some(Duration::ZERO))), 1);
        // A closed flow never holds jobs back.
        flow.hold(5000);
        assert!(a.submit(job(3, None).0, 10).is_ok());
        assert!(q.recv(Some(Duration::ZERO)).is_none());
        a.close();
        assert_eq!(seq_of(q.recv(Some(Duration::ZERO))), 3);
    }

    #[test]
    fn waiting_for_room_wakes_on_release() {
        let flow = Arc::new(Flow::new(10));
        flow.hold(20);
        assert!(!flow.wait_for_room(Duration::from_millis(10)));
        let f = Arc::clone(&flow);
        let t = std::thread::spawn(move || f.wait_for_room(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        flow.release(15);
        assert!(t.join().unwrap_or(false));
    }
}
