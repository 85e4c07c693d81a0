//! The listener: accepts connections, reaps ended ones, and spawns each connection's thread
//! (`reader::serve_connection`). At `max_connections` it makes room: it waits briefly for a connection
//! that is already ending, else reclaims the connection idle the longest (or else one whose request has
//! been trickling in for a while; see `slots`), which gets an error reply saying why; it refuses the
//! newcomer (with an error reply) only when every connection is busy. Runs on the service's
//! `bld_remote-listener` thread until `Server::stop` wakes it.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::reader::serve_connection;
use super::slots::{Activity, Candidate};
use super::{ConnectionHandle, Shared};
use crate::protocol::{self, Outcome};

/// At the connection limit, how long the listener waits for a connection whose client has closed to
/// finish ending before it refuses a newcomer. Only spent when every slot is taken.
const ENDING_GRACE: Duration = Duration::from_millis(250);
/// At the connection limit with no connection known to be ending, how long to give readers to notice a
/// close that has just happened (a client that closes and reconnects at once) before reclaiming another.
const NOTICE: Duration = Duration::from_millis(5);

pub(super) fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for incoming in listener.incoming() {
        if shared.is_stopping() {
            break;
        }
        let Ok(stream) = incoming else {
            // EMFILE and friends: back off briefly rather than spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let stream = super::fds::off_std_fds(stream); // never fd 0-2: see fds.rs
        let max = shared.config.max_connections;
        // A client that has just closed still holds its slot until its threads end, which takes moments:
        // at the limit, wait that long (no more) for one to end before reclaiming or refusing. Only
        // worth it when some connection is known to be ending: its reader saw the end, or its client's FIN
        // is already waiting on the socket (seen at once, however long the reader takes to get to it).
        let grace_end = Instant::now() + ENDING_GRACE;
        let at_limit = || shared.active_conns.load(Ordering::Acquire) >= max;
        let any_ending = || {
            shared.conns.lock().iter().any(|c| {
                !c.thread.is_finished()
                    && (c.activity.is_ending() || super::fds::peer_closed(&c.stream))
            })
        };
        let mut wait_for_ending = at_limit() && any_ending();
        if at_limit() && !wait_for_ending {
            let _ = shared.ended_rx.recv_timeout(NOTICE);
            wait_for_ending = at_limit() && any_ending();
        }
        while wait_for_ending && at_limit() {
            let left = grace_end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = shared.ended_rx.recv_timeout(left);
        }
        let mut conns = shared.conns.lock();
        reap(&mut conns);
        // Reclaimed connections still closing count here, so threads stay bounded (twice the limit).
        if shared.active_conns.load(Ordering::Acquire) >= max
            && (conns.len() >= max.saturating_mul(2) || !reclaim_one(shared, &conns))
        {
            drop(conns);
            refuse_connection(
                stream,
                &format!(
                    "too many connections (limit {max}), every one busy: none idle or slow to make room; \
                     try again later"
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
        let activity = Arc::new(Activity::new());
        let act = Arc::clone(&activity);
        // Counted here, before the thread exists, so the next accept already sees the slot taken; the
        // thread gives it back as its last act (unless the listener already did, reclaiming it).
        shared.active_conns.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("bld_remote-conn".into())
            .spawn(move || {
                let _ = catch_unwind(AssertUnwindSafe(|| serve_connection(&s, stream, &act)));
                if act.release_slot() {
                    s.active_conns.fetch_sub(1, Ordering::AcqRel);
                }
                let _ = s.ended_tx.try_send(());
            });
        if let Ok(thread) = spawned {
            conns.push(ConnectionHandle {
                stream: handle_stream,
                thread,
                activity,
            });
        } else {
            shared.active_conns.fetch_sub(1, Ordering::AcqRel);
            drop(conns);
            refuse_connection(
                handle_stream,
                "cannot serve this connection (out of threads)",
            );
        }
    }
}

/// At the limit: reclaim the connection idle the longest, else the one slowest to send its request (for
/// longer than `slots::SLOW_AFTER`). Its slot passes to the newcomer at once; its reader, woken by the
/// read side's shutdown, sends the farewell and closes. False when every connection is busy.
fn reclaim_one(shared: &Shared, conns: &[ConnectionHandle]) -> bool {
    let now = Instant::now();
    let max = shared.config.max_connections;
    let mut candidates: Vec<(Candidate, &ConnectionHandle)> = conns
        .iter()
        .filter(|c| !c.thread.is_finished())
        .filter_map(|c| c.activity.candidate(now).map(|k| (k, c)))
        .collect();
    // Idle before slow, oldest first.
    candidates.sort_by_key(|(k, _)| *k);
    for (kind, c) in candidates {
        let message = |d: Duration| farewell(kind, d, max);
        if c.activity.reclaim(kind, message) {
            if c.activity.release_slot() {
                shared.active_conns.fetch_sub(1, Ordering::AcqRel);
            }
            shared.reclaimed.fetch_add(1, Ordering::Relaxed);
            // Wakes the reader blocked in read(): it finds the connection reclaimed and says goodbye.
            let _ = c.stream.shutdown(Shutdown::Read);
            return true;
        }
    }
    false
}

/// What a reclaimed connection is told before it is closed.
fn farewell(kind: Candidate, for_how_long: Duration, max: usize) -> String {
    let secs = for_how_long.as_secs_f64();
    match kind {
        Candidate::Idle(_) => format!(
            "closed to make room: idle for {secs:.1} s while the service was at its limit of {max} \
             connections (the connection idle the longest is closed for a newcomer); reconnect to continue"
        ),
        Candidate::Slow(_) => format!(
            "closed to make room: a request had been arriving for {secs:.1} s while the service was at its \
             limit of {max} connections (a slow request is closed for a newcomer when none is idle); the \
             request was not run"
        ),
    }
}

/// Drop the handles of connections whose threads have ended (joining them), so the list stays bounded,
/// (The end notices need no draining: the channel holds one, and a stale one only costs a re-check.)
fn reap(conns: &mut Vec<ConnectionHandle>) {
    let (done, live): (Vec<ConnectionHandle>, Vec<ConnectionHandle>) = std::mem::take(conns)
        .into_iter()
        .partition(|c| c.thread.is_finished());
    *conns = live;
    for c in done {
        let _ = c.thread.join();
    }
}

pub(super) fn refuse_connection(mut stream: TcpStream, message: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&protocol::encode_reply(None, &Outcome::error(message)));
    let _ = stream.shutdown(Shutdown::Both);
}
