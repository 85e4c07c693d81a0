//! The reader half of a connection: reads the socket, splits the stream into requests
//! (`protocol::Decoder`), checks the token, answers control commands, and queues the rest as jobs for
//! Blender's main thread; what it decides goes to the writer, in request order. Runs on the connection's
//! `bld_remote-conn` thread, which spawns and joins the connection's writer.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde_json::Value;

use super::accept::refuse_connection;
use super::control::{self, control, id_key};
use super::reply::{prepare_execute_code, truthy, Shape};
use super::rights;
use super::slots::Activity;
use super::writer::{Writer, MAX_PIPELINED};
use super::{Config, Shared};
use crate::auth::{ConnAuth, Tokens, Verdict};
use crate::jobs::{not_run, Completion, Flow, Job, JobState, Lane, Progress, SubmitError};
use crate::protocol::{self, Decoder, Outcome, Request, StreamError};

/// Room offered to each read of the socket (the read buffer grows past it for larger requests).
const READ_CHUNK: usize = 256 * 1024;
/// After an error that ends a connection, how long to keep discarding what the client still sends so
/// the error reply is not destroyed by a reset.
const LINGER: Duration = Duration::from_secs(2);
/// Progress reports a connection may have waiting for its writer; more are dropped (never blocking).
const PROGRESS_BACKLOG: usize = 256;
/// While its replies are over budget, how often a waiting reader checks whether the service is stopping.
const ROOM_POLL: Duration = Duration::from_millis(200);

/// What the reader hands the writer, in request order.
pub(super) enum ToWriter {
    /// A reply that is ready now (control commands, errors). `framed` replies (the request had an id)
    /// may leave before replies to earlier requests.
    Ready {
        bytes: Vec<u8>,
        framed: bool,
        /// Answer this in-flight job now with this outcome first (a `cancel`).
        settle: Option<(u64, Outcome)>,
        /// It answers a request (rather than ending the stream): counted in the connection's activity.
        request: bool,
    },
    /// A job the reader is about to queue for the main thread; its outcome arrives as a `Completion`.
    Job(InFlight),
    /// The stream cannot be decoded further: send what is owed, then close the sending side.
    Close,
}

/// A job whose reply this connection owes.
pub(super) struct InFlight {
    pub(super) seq: u64,
    pub(super) id: Option<Value>,
    pub(super) shape: Shape,
    pub(super) deadline: Option<Instant>,
    pub(super) state: Arc<JobState>,
    /// Not a main-thread job but a `get_job_result` wait for the job of this id in this store: at its
    /// deadline the reply is the job's snapshot as it is then, not a timeout.
    pub(super) job_wait: Option<(Arc<crate::store::JobStore>, String)>,
}

/// The reader half. Runs on the connection's thread; spawns and joins the writer.
pub(super) fn serve_connection(shared: &Arc<Shared>, stream: TcpStream, activity: &Arc<Activity>) {
    let Ok(write_stream) = stream.try_clone() else {
        return;
    };
    // This connection's place in the job queue, and the budget of reply bytes it may hold unread.
    let lane = Arc::new(
        shared
            .queue
            .lane(Arc::new(Flow::new(shared.config.max_reply_bytes_in_flight))),
    );
    let (tx, rx) = crossbeam_channel::bounded::<ToWriter>(MAX_PIPELINED);
    // Unbounded so the main thread never blocks completing a job; at most MAX_PIPELINED are in flight.
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
    // Progress reports of this connection's framed jobs. Bounded: a report that finds it full is dropped,
    // so reporting never blocks the main thread.
    let (progress_tx, progress_rx) = crossbeam_channel::bounded::<Progress>(PROGRESS_BACKLOG);
    let (writer_lane, writer_activity) = (Arc::clone(&lane), Arc::clone(activity));
    let write_timeout = shared.config.write_timeout;
    let writer = std::thread::Builder::new()
        .name("bld_remote-writer".into())
        .spawn(move || {
            let _ = catch_unwind(AssertUnwindSafe(|| {
                Writer::new(write_stream, writer_lane, writer_activity, write_timeout).run(
                    &rx,
                    &done_rx,
                    &progress_rx,
                );
            }));
        });
    let Ok(writer) = writer else {
        refuse_connection(stream, "cannot serve this connection (out of threads)");
        return;
    };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        read_loop(
            shared,
            &stream,
            &tx,
            &done_tx,
            &progress_tx,
            &lane,
            activity,
        );
    }));
    activity.ending();
    // A listener at the connection limit may be waiting to see whether a slot is about to free.
    let _ = shared.ended_tx.try_send(());
    drop(tx);
    let _ = writer.join();
    // Dropping the lane (with the writer's copy gone) drops any job still queued for this connection.
    drop(lane);
}

/// The connection holds replies over its budget (its client is not reading them): wait until it reads,
/// the connection dies, or the service stops. The socket is not read meanwhile, so TCP slows the client.
fn wait_for_room(shared: &Shared, lane: &Lane) {
    while !lane.flow().wait_for_room(ROOM_POLL) {
        if shared.is_stopping() {
            return;
        }
    }
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

/// The farewell of a connection the listener reclaimed to make room for a newcomer.
fn reclaimed_reply(why: &str) -> ReadEnd {
    ReadEnd::Error(protocol::encode_reply(None, &Outcome::error(why)))
}

#[allow(clippy::too_many_lines)] // one loop: wait for room, read, split into requests, hand them over
fn read_loop(
    shared: &Arc<Shared>,
    mut stream: &TcpStream,
    tx: &Sender<ToWriter>,
    done_tx: &Sender<Completion>,
    progress_tx: &Sender<Progress>,
    lane: &Lane,
    activity: &Activity,
) {
    let config = &shared.config;
    // The connection's read buffer: the socket is read straight into it, requests are parsed where they
    // lie, and it keeps its size between requests (bounded by the request size limit; freed with the
    // connection).
    let spare = std::mem::take(&mut *shared.spare_read_buffer.lock());
    let mut decoder = Decoder::with_buffer(config.max_request_bytes, config.max_depth, spare);
    // Jobs of this connection by request id, for `cancel`.
    let mut by_id: HashMap<String, (u64, Arc<JobState>)> = HashMap::new();
    // Whether this connection proved the token (auth_challenge / authenticate); its local address is in the
    // proofs.
    let mut auth = ConnAuth::new(stream.local_addr().ok());
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
        if request_began.is_none() && !lane.flow().has_room() {
            // Between requests only, so a request's arrival clock never runs while we do not read.
            wait_for_room(shared, lane);
        }
        if socket_timeout != Some(wanted) {
            let _ = stream.set_read_timeout(wanted);
            socket_timeout = Some(wanted);
        }
        let read = decoder.read_from(&mut stream, READ_CHUNK);
        // A reclaimed connection serves nothing more: what arrived (if anything) is not read as a request.
        if let Err(why) = activity.reading() {
            break reclaimed_reply(&why);
        }
        match read {
            Ok(0) => break ReadEnd::Eof,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if request_began.is_some() {
                    break ReadEnd::Error(slow_request_reply(config));
                }
                // `ran: false`: a client whose request crossed this notice knows it was never read.
                break ReadEnd::Error(protocol::encode_reply(
                    None,
                    &not_run(&format!(
                        "idle timeout: nothing received for {} s; closing the connection",
                        config.idle_timeout.map_or(0.0, |d| d.as_secs_f64())
                    )),
                ));
            }
            Err(_) => break ReadEnd::Eof,
        }
        let mut writer_gone = false;
        let stream_error = loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    request_began = None;
                    activity.owe();
                    let msg = handle_frame(
                        shared,
                        frame,
                        &mut auth,
                        &mut by_id,
                        done_tx,
                        progress_tx,
                        lane,
                    );
                    // A quiet success (`"quiet": true`) owes nothing: settled here, so the writer is
                    // not woken for it (on a 2-core machine that wake-up competes with the job's run).
                    if let ToWriter::Ready {
                        framed: true,
                        bytes,
                        settle: None,
                        request: true,
                    } = &msg
                    {
                        if bytes.is_empty() {
                            activity.replied();
                            continue;
                        }
                    }
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
            if !lane.flow().has_room() {
                wait_for_room(shared, lane);
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
        activity.received(request_began);
        if by_id.len() > 1024 {
            by_id.retain(|_, (_, s)| s.phase().is_pending());
        }
    };
    shared.keep_read_buffer(decoder.into_buffer());
    activity.ending();
    let _ = shared.ended_tx.try_send(());
    if let ReadEnd::Error(bytes) = end {
        let _ = tx.send(ToWriter::Ready {
            bytes,
            framed: false,
            settle: None,
            request: false,
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

/// Turn one frame into what the writer must send for it.
#[allow(clippy::too_many_lines)] // one linear path: parse, auth, control, validate, queue
fn handle_frame(
    shared: &Arc<Shared>,
    frame: &[u8],
    auth: &mut ConnAuth,
    by_id: &mut HashMap<String, (u64, Arc<JobState>)>,
    done_tx: &Sender<Completion>,
    progress_tx: &Sender<Progress>,
    lane: &Lane,
) -> ToWriter {
    let mut request = match protocol::parse_request(frame) {
        Ok(r) => r,
        Err(bad) => {
            return ToWriter::Ready {
                framed: bad.id.is_some(),
                bytes: protocol::encode_reply(bad.id.as_ref(), &Outcome::error(bad.message)),
                settle: None,
                request: true,
            }
        }
    };
    let read_at = Instant::now();
    let id = request.id.clone();
    let ready = |outcome: Outcome| ToWriter::Ready {
        framed: id.is_some(),
        bytes: protocol::encode_reply(id.as_ref(), &outcome),
        settle: None,
        request: true,
    };
    // The token check and the challenge-response handshake (crate::auth): per connection. Then the
    // rights: a read-only token's request that is not on the allow-list is refused here, before any job
    // exists (super::rights).
    let rights = match auth.gate(
        Tokens::new(
            shared.config.token.as_deref(),
            shared.config.read_token.as_deref(),
        ),
        &request,
        &shared.auth_failures,
    ) {
        Verdict::Pass(rights) => rights,
        Verdict::Answer(outcome) => return ready(outcome),
    };
    if let Some(outcome) = rights::refusal(rights, &request) {
        return ready(outcome);
    }
    if let Some(bytes) = control::persist_get_reply(shared, &request, id.as_ref()) {
        shared.served.fetch_add(1, Ordering::Relaxed);
        return ToWriter::Ready {
            framed: id.is_some(),
            bytes,
            settle: None,
            request: true,
        };
    }
    // A wait for a job's result: the writer gets the result when the job ends, the reader reads on.
    if let Some(msg) = super::job_commands::result_wait(shared, &request, done_tx) {
        shared.served.fetch_add(1, Ordering::Relaxed);
        return msg;
    }
    // `"quiet": true` on a framed submit_code_job: no reply when it succeeds, only when it is refused (a
    // client that sends its next request right behind it learns of success from that one's reply).
    let quiet = if request.command == "submit_code_job" {
        match request.params.remove("quiet") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(q)) => q && id.is_some(),
            Some(other) => {
                return ready(Outcome::error(format!(
                    "'quiet' must be true or false (true: no reply when the job is accepted), got {other}"
                )))
            }
        }
    } else {
        false
    };
    let mut settle = None;
    if let Some(mut outcome) = control(shared, &mut request, by_id, &mut settle) {
        shared.served.fetch_add(1, Ordering::Relaxed);
        if request.command == "get_status" {
            // What this request may do: clients (the MCP server) list only the tools they may call.
            if let Outcome::Success(Value::Object(m)) = &mut outcome {
                m.insert("role".into(), Value::from(rights.name()));
            }
        }
        let silent = quiet && matches!(outcome, Outcome::Success(_));
        return ToWriter::Ready {
            framed: id.is_some(),
            bytes: if silent {
                Vec::new()
            } else {
                protocol::encode_reply(id.as_ref(), &outcome)
            },
            settle,
            request: true,
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
        // Its reply ({"response", "message", "output"}) has no place for what changed: not computed.
        params.insert("changes".into(), Value::Bool(false));
        Shape::Legacy
    } else if command == "execute_code" {
        match prepare_execute_code(&mut params, id.is_some()) {
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
    let timeout = timeout.or(shared.config.default_timeout);
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
        job_wait: None,
    });
    let submitted = {
        let stopping = shared.gate.read();
        if *stopping {
            Err((SubmitError::Stopped, job))
        } else {
            lane.submit(job, shared.config.max_queued_per_connection)
        }
    };
    // A refused job completes through the same channel as any other, with its reason.
    match submitted {
        Ok(()) => {}
        Err((SubmitError::Busy, job)) => job.refuse(not_run(&format!(
            "busy: {} requests are already queued for Blender's main thread; try again later",
            shared.queue.capacity()
        ))),
        Err((SubmitError::ConnectionBusy, job)) => job.refuse(not_run(&format!(
            "busy: this connection already has {} requests queued for Blender's main thread (the \
             per-connection limit); wait for some replies before sending more",
            shared.config.max_queued_per_connection
        ))),
        Err((SubmitError::Stopped, job)) => {
            job.refuse(not_run("the service is stopping; the request was not run"));
        }
    }
    // The completion may reach the writer before this message does; the writer keeps it until then.
    in_flight
}
