//! Jobs: requests that need Blender's main thread, handed over from connection threads through one bounded
//! crossbeam channel, and their replies handed back through a one-slot channel per job. Pure Rust.
//!
//! Threads: connection threads create jobs and wait on their reply slot; Blender's main thread (the pump,
//! driven from Python) takes jobs and fulfils them.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde_json::{Map, Value};

use crate::protocol::Outcome;

/// What the main thread receives: a job, or a nudge to return to Python (a signal arrived, or a stop was
/// requested) without any work.
#[derive(Debug)]
pub enum Msg {
    Job(Job),
    Wake,
}

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;
const SKIPPED: u8 = 3;

/// State a job shares with the connection waiting for it: whether it started, and whether it was cancelled.
#[derive(Debug, Default)]
pub struct JobState {
    phase: AtomicU8,
    cancelled: AtomicBool,
}

impl JobState {
    /// Ask that the job not run. Returns true when it had not started yet (it never will).
    pub fn cancel(&self) -> bool {
        self.cancelled.store(true, Ordering::SeqCst);
        self.phase
            .compare_exchange(QUEUED, SKIPPED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    pub fn started(&self) -> bool {
        matches!(self.phase.load(Ordering::SeqCst), RUNNING | DONE)
    }

    pub fn finished(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == DONE
    }
}

/// One request for the main thread.
#[derive(Debug)]
pub struct Job {
    pub seq: u64,
    pub command: String,
    pub params: Map<String, Value>,
    pub deadline: Option<Instant>,
    pub state: Arc<JobState>,
    reply: Sender<Outcome>,
}

/// The connection's side of a job: where its outcome arrives.
#[derive(Debug)]
pub struct Ticket {
    pub seq: u64,
    pub state: Arc<JobState>,
    pub reply: Receiver<Outcome>,
}

impl Job {
    pub fn new(
        seq: u64,
        command: String,
        params: Map<String, Value>,
        deadline: Option<Instant>,
    ) -> (Job, Ticket) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let state = Arc::new(JobState::default());
        (
            Job {
                seq,
                command,
                params,
                deadline,
                state: Arc::clone(&state),
                reply: tx,
            },
            Ticket {
                seq,
                state,
                reply: rx,
            },
        )
    }

    /// Claim the job for running now. `Err` carries the reply to send instead: the job was cancelled or its
    /// deadline passed while it was queued, so it must never run late.
    pub fn begin(&self) -> Result<(), Outcome> {
        if self
            .state
            .phase
            .compare_exchange(QUEUED, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
            || self.state.cancelled.load(Ordering::SeqCst)
        {
            self.state.phase.store(SKIPPED, Ordering::SeqCst);
            return Err(not_run("the request was cancelled before it started"));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.state.phase.store(SKIPPED, Ordering::SeqCst);
            return Err(not_run(
                "the request timed out while queued and was not run",
            ));
        }
        Ok(())
    }

    /// Hand the outcome back. Never blocks (the slot holds one reply); a vanished connection is fine.
    pub fn finish(self, outcome: Outcome) {
        if self.state.phase.load(Ordering::SeqCst) == RUNNING {
            self.state.phase.store(DONE, Ordering::SeqCst);
        }
        let _ = self.reply.try_send(outcome);
    }

    /// Reply without running (service stopping, cancelled...).
    pub fn refuse(self, outcome: Outcome) {
        let _ =
            self.state
                .phase
                .compare_exchange(QUEUED, SKIPPED, Ordering::SeqCst, Ordering::SeqCst);
        let _ = self.reply.try_send(outcome);
    }
}

/// An error reply for work that did not run, with `"ran": false` so clients know it is safe to retry.
pub fn not_run(message: &str) -> Outcome {
    let mut extra = Map::new();
    extra.insert("ran".into(), Value::Bool(false));
    Outcome::error_with(message, extra)
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

    /// Queue a job. On error the job is dropped; the caller answers through its ticket's request instead.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.tx.len() >= self.capacity {
            return Err(SubmitError::Busy);
        }
        self.tx.try_send(Msg::Job(job)).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Busy,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
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

    #[test]
    fn job_round_trip() {
        let q = JobQueue::new(4);
        let (job, ticket) = Job::new(1, "ping".into(), Map::new(), None);
        assert!(q.submit(job).is_ok());
        let Some(Msg::Job(job)) = q.recv(Some(Duration::from_millis(100))) else {
            panic!("no job")
        };
        assert!(job.begin().is_ok());
        assert!(ticket.state.started());
        job.finish(Outcome::Success(json!(1)));
        assert_eq!(ticket.reply.recv().ok(), Some(Outcome::Success(json!(1))));
        assert!(ticket.state.finished());
    }

    #[test]
    fn cancelled_or_expired_jobs_never_begin() {
        let (job, ticket) = Job::new(1, "x".into(), Map::new(), None);
        assert!(ticket.state.cancel());
        assert!(job.begin().is_err());
        assert!(!ticket.state.started());

        let (job, ticket) = Job::new(2, "x".into(), Map::new(), Some(Instant::now()));
        let err = job.begin().err();
        assert!(
            matches!(err, Some(Outcome::Error { ref extra, .. }) if extra["ran"] == json!(false))
        );
        assert!(!ticket.state.started());

        // Cancelling a running job does not un-start it.
        let (job, ticket) = Job::new(3, "x".into(), Map::new(), None);
        assert!(job.begin().is_ok());
        assert!(!ticket.state.cancel());
        assert!(ticket.state.started());
    }

    #[test]
    fn full_queue_is_busy_but_can_still_be_woken() {
        let q = JobQueue::new(2);
        for i in 0..2 {
            assert!(q
                .submit(Job::new(i, "x".into(), Map::new(), None).0)
                .is_ok());
        }
        let r = q.submit(Job::new(9, "x".into(), Map::new(), None).0);
        assert_eq!(r, Err(SubmitError::Busy));
        q.wake();
        assert_eq!(q.len(), 3);
        assert_eq!(q.drain().len(), 2);
        assert!(q.is_empty());
    }
}
