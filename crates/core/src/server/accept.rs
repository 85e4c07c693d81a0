//! The listener: accepts connections, reaps ended ones, refuses those over `max_connections` (with an
//! error reply), and spawns each connection's thread (`reader::serve_connection`). Runs on the service's
//! `bld_remote-listener` thread until `Server::stop` wakes it.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};


use super::reader::serve_connection;
use super::{ConnectionHandle, Shared};
use crate::protocol::{self, Outcome};

/// At the connection limit, how long the listener waits for a connection whose client has closed to
/// finish ending before it refuses a newcomer. Only spent when every slot is taken.
const ENDING_GRACE: Duration = Duration::from_millis(250);

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
        // at the limit, wait that long (no more) for one to end before refusing the newcomer.
        let grace_end = Instant::now() + ENDING_GRACE;
        while shared.active_conns.load(Ordering::Acquire) >= max {
            let left = grace_end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = shared.ended_rx.recv_timeout(left);
        }
        let mut conns = shared.conns.lock();
        reap(&mut conns);
        if shared.active_conns.load(Ordering::Acquire) >= max {
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
        // Counted here, before the thread exists, so the next accept already sees the slot taken; the
        // thread gives it back as its last act.
        shared.active_conns.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("bld_remote-conn".into())
            .spawn(move || {
                let _ = catch_unwind(AssertUnwindSafe(|| serve_connection(&s, stream)));
                s.active_conns.fetch_sub(1, Ordering::AcqRel);
                let _ = s.ended_tx.try_send(());
            });
        if let Ok(thread) = spawned {
            conns.push(ConnectionHandle {
                stream: handle_stream,
                thread,
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
