//! The listener: accepts connections, reaps ended ones, refuses those over `max_connections` (with an
//! error reply), and spawns each connection's thread (`reader::serve_connection`). Runs on the service's
//! `bld_remote-listener` thread until `Server::stop` wakes it.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::reader::serve_connection;
use super::{ConnectionHandle, Shared};
use crate::protocol::{self, Outcome};

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
        let mut conns = shared.conns.lock();
        // Reap connections that have ended so the list (and their join handles) stays bounded.
        let (done, live): (Vec<ConnectionHandle>, Vec<ConnectionHandle>) =
            std::mem::take(&mut *conns)
                .into_iter()
                .partition(|c| c.thread.is_finished());
        *conns = live;
        for c in done {
            let _ = c.thread.join();
        }
        if conns.len() >= shared.config.max_connections {
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
        let spawned = std::thread::Builder::new()
            .name("bld_remote-conn".into())
            .spawn(move || {
                s.active_conns.fetch_add(1, Ordering::Relaxed);
                let _ = catch_unwind(AssertUnwindSafe(|| serve_connection(&s, stream)));
                s.active_conns.fetch_sub(1, Ordering::Relaxed);
            });
        if let Ok(thread) = spawned {
            conns.push(ConnectionHandle {
                stream: handle_stream,
                thread,
            });
        } else {
            drop(conns);
            refuse_connection(
                handle_stream,
                "cannot serve this connection (out of threads)",
            );
        }
    }
}

pub(super) fn refuse_connection(mut stream: TcpStream, message: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&protocol::encode_reply(None, &Outcome::error(message)));
    let _ = stream.shutdown(Shutdown::Both);
}
