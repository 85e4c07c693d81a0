//! The writer half of a connection: every reply the connection owes, in the order it goes out, and the
//! sending side of the socket. Runs on two threads: the connection's `bld_remote-writer` (spawned and
//! joined by its reader) decides what is sent when, and writes a reply itself only while the socket takes
//! it at once (at most `DIRECT_WRITE`); its `bld_remote-sender` (spawned and joined by the writer) writes
//! the rest, each reply within a total deadline, so the writer never waits on a client that does not read.
//! Unwritten reply bytes are counted against the connection's reply budget (`jobs::Flow`), so such a
//! client stops its own requests being read and its jobs being started.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, IoSlice, Write};
use std::net::{Shutdown, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};
use serde_json::{Map, Value};

use super::reader::{InFlight, ToWriter};
use super::reply::shape_reply;
use super::slots::Activity;
use crate::jobs::{timed_out_not_run, timed_out_running, Completion, Expiry, Lane, Progress};
use crate::protocol::{self, Outcome, Reply};

/// Replies a connection may have outstanding (pipelined) before its reader stops reading: backpressure.
pub(super) const MAX_PIPELINED: usize = 4096;

/// How long the writer itself may spend writing a reply when its sender is idle (the common case: the
/// socket has room, the write returns at once, and no thread hand-off is paid). A write that takes longer
/// (the client is not reading) is handed to the sender, which finishes it within the reply's deadline;
/// so completions go unprocessed (and uncounted against the budget) for at most this long.
const DIRECT_WRITE: Duration = Duration::from_millis(5);

/// The writer half: one per connection. Hands each reply, serialised once, to its sender. Replies to requests
/// without an id leave in request order (plain clients match replies by order); replies to framed
/// requests leave as soon as they are ready. Enforces deadlines: at a job's deadline it answers with a
/// timeout reply that says whether the work ran.
pub(super) struct Writer {
    stream: TcpStream,
    lane: Arc<Lane>,
    activity: Arc<Activity>,
    write_timeout: Duration,
    /// To the sender thread (set while `run` runs).
    out: Option<Sender<Outgoing>>,
    /// Replies handed to the sender and not yet finished: while any is, the writer must not write itself.
    busy: Arc<AtomicUsize>,
    /// The socket's write timeout as last set (nanoseconds; 0 unknown), shared with the sender: the two
    /// take turns on the socket, never at once.
    timeout_set: Arc<AtomicU64>,
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
    /// Ready bytes; `true` when they answer a request.
    Bytes(Vec<u8>, bool),
    Job(u64),
}

/// What the writer hands its sender: a reply, its size (held against the budget until written), and
/// whether it answers a request (for the connection's activity) or is a progress line or a farewell.
struct Outgoing {
    reply: Reply,
    len: usize,
    request: bool,
    /// Bytes the writer already wrote itself.
    offset: usize,
    /// When the reply's first write began: its total deadline runs from here.
    started: Instant,
}

impl Writer {
    pub(super) fn new(
        stream: TcpStream,
        lane: Arc<Lane>,
        activity: Arc<Activity>,
        write_timeout: Duration,
    ) -> Self {
        Self {
            stream,
            lane,
            activity,
            write_timeout,
            out: None,
            busy: Arc::new(AtomicUsize::new(0)),
            timeout_set: Arc::new(AtomicU64::new(0)),
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

    pub(super) fn run(
        mut self,
        rx: &Receiver<ToWriter>,
        done: &Receiver<Completion>,
        progress: &Receiver<Progress>,
    ) {
        let (out_tx, out_rx) = crossbeam_channel::unbounded::<Outgoing>();
        // Never sent on: the sender drops it as it ends, which wakes this thread's select.
        let (gone_tx, gone_rx) = crossbeam_channel::bounded::<()>(0);
        let sender = match self.stream.try_clone() {
            Ok(stream) => {
                let lane = Arc::clone(&self.lane);
                let activity = Arc::clone(&self.activity);
                let limit = self.write_timeout;
                let busy = Arc::clone(&self.busy);
                let timeout_set = Arc::clone(&self.timeout_set);
                std::thread::Builder::new()
                    .name("bld_remote-sender".into())
                    .spawn(move || {
                        let _ = catch_unwind(AssertUnwindSafe(|| {
                            send_loop(
                                &stream,
                                &out_rx,
                                &lane,
                                &activity,
                                limit,
                                &busy,
                                &timeout_set,
                            );
                        }));
                        // However it ended, nothing waits for this connection's writes any more.
                        lane.close();
                        drop(gone_tx);
                    })
                    .ok()
            }
            Err(_) => None,
        };
        if sender.is_some() {
            self.out = Some(out_tx);
        } else {
            drop(out_tx);
            self.dead = true;
        }
        self.serve(rx, done, progress, &gone_rx);
        // Everything owed is handed over (or the client is gone): the sender writes what it has, closes
        // the sending side, and ends.
        self.out = None;
        if let Some(h) = sender {
            let _ = h.join();
        }
        if self.dead {
            // Nobody will read these replies: queued work for them must never run.
            for job in self.in_flight.values() {
                job.state.cancel();
            }
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }

    fn serve(
        &mut self,
        rx: &Receiver<ToWriter>,
        done: &Receiver<Completion>,
        progress: &Receiver<Progress>,
        gone: &Receiver<()>,
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
            let gone_index = sel.recv(gone);
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
                        request,
                    }) => {
                        if let Some((seq, outcome)) = settle {
                            self.settle(seq, outcome);
                        }
                        if framed && bytes.is_empty() {
                            // A quiet success (`"quiet": true`) that also settles a job; the others are
                            // settled by the reader and never come here. Nothing to write, nothing owed.
                            if request {
                                self.activity.replied();
                            }
                        } else if framed {
                            self.write(bytes, request);
                        } else {
                            self.ordered.push_back(Owed::Bytes(bytes, request));
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
            } else if op.index() == gone_index {
                // The sender gave up on the client (write deadline, reset).
                let _ = op.recv(gone);
                self.dead = true;
            }
        }
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
        self.write(protocol::encode_value(&Value::Object(line)), false);
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
            self.write_reply(reply, true);
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
            if let Some((store, job_id)) = &job.job_wait {
                // The wait is over: the job's snapshot as it is now (it may just have ended).
                store.stop_waiting(job_id, seq);
                let outcome = store
                    .result(job_id, None)
                    .map_or_else(|| super::job_commands::unknown(job_id), crate::store::found);
                self.settle(seq, outcome);
                continue;
            }
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
                Owed::Bytes(..) => {
                    if let Some(Owed::Bytes(b, request)) = self.ordered.pop_front() {
                        self.write(b, request);
                    }
                }
                Owed::Job(seq) => match self.parked.remove(seq) {
                    Some(reply) => {
                        self.ordered.pop_front();
                        self.write_reply(reply, true);
                    }
                    None => return,
                },
            }
        }
    }

    fn write(&mut self, bytes: Vec<u8>, request: bool) {
        self.write_reply(Reply::One(bytes), request);
    }

    /// Write a reply, held against the connection's budget until it is written: here when the sender is
    /// idle and the socket takes it within `DIRECT_WRITE`, else (the rest of it) by the sender.
    fn write_reply(&mut self, reply: Reply, request: bool) {
        if self.dead {
            return;
        }
        let len = reply.slices().iter().map(|s| s.len()).sum();
        self.lane.flow().hold(len);
        let started = Instant::now();
        let mut offset = 0;
        if self.busy.load(Ordering::Acquire) == 0 {
            let first = DIRECT_WRITE.min(self.write_timeout);
            match write_until(
                &self.stream,
                &reply,
                0,
                first,
                started + first,
                &self.timeout_set,
            ) {
                Ok(()) => {
                    self.lane.release(len);
                    if request {
                        self.activity.replied();
                    }
                    return;
                }
                Err(Stuck::TimedOut(written)) => offset = written,
                Err(Stuck::Failed) => {
                    self.lane.release(len);
                    let _ = self.stream.shutdown(Shutdown::Both);
                    self.dead = true;
                    return;
                }
            }
        }
        self.busy.fetch_add(1, Ordering::AcqRel);
        let sent = self.out.as_ref().is_some_and(|out| {
            out.send(Outgoing {
                reply,
                len,
                request,
                offset,
                started,
            })
            .is_ok()
        });
        if !sent {
            self.busy.fetch_sub(1, Ordering::AcqRel);
            self.lane.release(len);
            self.dead = true;
        }
    }
}

/// The sender: writes (the rest of) each reply it is handed, in order, each within `limit` of its first
/// byte (a total deadline, not one per write call: a client that reads a trickle cannot hold a reply for
/// longer), and releases its bytes from the budget. A reply that misses its deadline, or a failed write,
/// cuts the connection. Once the writer is done, closes the sending side (a client that half-closed learns
/// that no more replies come). Runs on the connection's `bld_remote-sender` thread.
fn send_loop(
    stream: &TcpStream,
    rx: &Receiver<Outgoing>,
    lane: &Lane,
    activity: &Activity,
    limit: Duration,
    busy: &AtomicUsize,
    timeout_set: &AtomicU64,
) {
    for item in rx {
        let until = item.started.checked_add(limit);
        let first = until.map_or(Duration::ZERO, |u| {
            u.saturating_duration_since(Instant::now())
        });
        let written = !first.is_zero()
            && until.is_some_and(|u| {
                write_until(stream, &item.reply, item.offset, first, u, timeout_set).is_ok()
            });
        lane.release(item.len);
        if item.request {
            activity.replied();
        }
        if !written {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        // Only now may the writer write again itself: replies leave in order.
        busy.fetch_sub(1, Ordering::AcqRel);
    }
    let mut s = stream;
    let _ = s.flush();
    let _ = stream.shutdown(Shutdown::Write);
}

/// Why a write did not finish.
enum Stuck {
    /// `until` passed; this many bytes of the reply are written.
    TimedOut(usize),
    /// The connection failed (reset, closed).
    Failed,
}

/// Write `reply` from byte `offset` with vectored writes (one `writev` unless the socket is full), giving up
/// once `until` passes. The first call waits at most `first`: a timeout the socket usually has already, so
/// the common one-write reply costs no extra system call (`timeout_set` is the socket's current one).
fn write_until(
    mut stream: &TcpStream,
    reply: &Reply,
    offset: usize,
    first: Duration,
    until: Instant,
    timeout_set: &AtomicU64,
) -> Result<(), Stuck> {
    let pieces = reply.slices();
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    IoSlice::advance_slices(&mut rest, offset);
    let mut written = offset;
    let mut allowed = first;
    while !rest.is_empty() {
        let nanos = u64::try_from(allowed.as_nanos()).unwrap_or(u64::MAX).max(1);
        if timeout_set.load(Ordering::Acquire) != nanos {
            if stream.set_write_timeout(Some(allowed)).is_err() {
                return Err(Stuck::Failed);
            }
            timeout_set.store(nanos, Ordering::Release);
        }
        match stream.write_vectored(rest) {
            Ok(0) => return Err(Stuck::Failed),
            Ok(n) => {
                IoSlice::advance_slices(&mut rest, n);
                written += n;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Stuck::TimedOut(written));
            }
            Err(_) => return Err(Stuck::Failed),
        }
        allowed = until.saturating_duration_since(Instant::now());
        if allowed.is_zero() && !rest.is_empty() {
            return Err(Stuck::TimedOut(written));
        }
    }
    Ok(())
}
