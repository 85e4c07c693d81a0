//! Jobs: requests that need Blender's main thread, handed over from connection threads through one bounded
//! crossbeam channel. Each job's outcome goes back through its connection's completion channel, tagged
//! with the job's sequence number, so one writer thread can wait for all of its connection's jobs (and
//! their deadlines) at once. Pure Rust.
//!
//! Threads: connection threads create jobs and collect completions; Blender's main thread (the pump,
//! driven from Python) takes jobs and completes them. Completing never blocks the main thread.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
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

    pub fn finished(&self) -> bool {
        self.phase() == Phase::Done
    }

    /// `queued`, `running`, `finished` or `skipped` (cancelled or expired before it started).
    pub fn phase_name(&self) -> &'static str {
        self.phase().name()
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
    reply: Option<Sender<Completion>>,
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
        let state = Arc::new(JobState::default());
        (
            Job {
                seq,
                command,
                params,
                deadline,
                state: Arc::clone(&state),
                reply: Some(reply),
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
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(Completion {
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
    Busy,
    Stopped,
}

/// The channel between connection threads and the main thread.
#[derive(Debug, Clone)]
pub struct JobQueue {
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    capacity: usize,
}

impl JobQueue {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // One slot above capacity is kept for Wake, so a full queue can still be woken.
        let (tx, rx) = crossbeam_channel::bounded(capacity + 1);
        Self { tx, rx, capacity }
    }

    /// Queue a job. On error the job comes back, so the caller can refuse it with the right message.
    pub fn submit(&self, job: Job) -> Result<(), (SubmitError, Job)> {
        if self.tx.len() >= self.capacity {
            return Err((SubmitError::Busy, job));
        }
        match self.tx.try_send(Msg::Job(job)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let why = if e.is_full() {
                    SubmitError::Busy
                } else {
                    SubmitError::Stopped
                };
                match e.into_inner() {
                    Msg::Job(job) => Err((why, job)),
                    // Only a job was sent; nothing to give back.
                    Msg::Wake => Ok(()),
                }
            }
        }
    }

    /// Make a blocked pump return to its caller. Harmless if it is not blocked.
    pub fn wake(&self) {
        let _ = self.tx.try_send(Msg::Wake);
    }

    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Next message, waiting at most `timeout` (`None` = until one arrives).
    pub fn recv(&self, timeout: Option<Duration>) -> Option<Msg> {
        match timeout {
            None => self.rx.recv().ok(),
            Some(t) if t.is_zero() => self.rx.try_recv().ok(),
            Some(t) => self.rx.recv_timeout(t).ok(),
        }
    }

    /// Take every queued job without running it (used while stopping).
    pub fn drain(&self) -> Vec<Job> {
        let mut jobs = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            if let Msg::Job(j) = m {
                jobs.push(j);
            }
        }
        jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(q.len(), 3);
        assert_eq!(q.drain().len(), 2);
        assert!(q.is_empty());
    }
}
