//! Shared by the Rust integration tests: a Rust thread that plays Blender's main thread, and a raw client.
#![allow(dead_code)] // each test binary uses its own subset
#![allow(clippy::unwrap_used)] // test helpers: clippy's allow-unwrap-in-tests covers only #[test] functions

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bld_remote_core::jobs::Msg;
use bld_remote_core::protocol::Outcome;
use bld_remote_core::server::{Config, Server};
use serde_json::Value;

/// A "main thread" that answers `echo` with its params and `sleep` after `params.ms` milliseconds.
pub fn pump(server: &Server) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let shared = Arc::clone(server.shared());
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let handle = std::thread::spawn(move || {
        while !d.load(Ordering::SeqCst) {
            let Some(Msg::Job(mut job)) = shared.next_message(Some(Duration::from_millis(20)))
            else {
                continue;
            };
            if let Err(o) = shared.begin(&job) {
                job.refuse(o);
                continue;
            }
            let params = std::mem::take(&mut job.params);
            if job.command == "sleep" {
                let ms = params.get("ms").and_then(Value::as_u64).unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
            }
            shared.finish(job, Outcome::Success(Value::Object(params)));
        }
    });
    (done, handle)
}

pub fn start() -> Server {
    let cfg = Config {
        port: 0,
        main_thread_commands: vec!["echo".into(), "sleep".into()],
        ..Config::default()
    };
    match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => panic!("start: {e}"),
    }
}

pub fn connect(server: &Server) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

pub fn read_reply(r: &mut BufReader<TcpStream>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}
