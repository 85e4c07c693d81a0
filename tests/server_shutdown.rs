//! Shutdown joins every thread: alone in its own test binary so the process's thread count is exact.
//! A Rust thread plays Blender's main thread.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bld_remote::jobs::Msg;
use bld_remote::protocol::Outcome;
use bld_remote::server::{Config, Server};
use serde_json::{json, Value};

/// A "main thread" that answers `echo` with its params and `sleep` after `params.ms` milliseconds.
fn pump(server: &Server) -> (Arc<AtomicBool>, JoinHandle<()>) {
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

fn start() -> Server {
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

fn connect(server: &Server) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(server.local_addr()).unwrap_or_else(|e| panic!("connect: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let r = BufReader::new(s.try_clone().unwrap_or_else(|e| panic!("clone: {e}")));
    (s, r)
}

fn read_reply(r: &mut BufReader<TcpStream>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line)
        .unwrap_or_else(|e| panic!("read: {e}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

#[cfg(target_os = "linux")]
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

#[test]
fn stop_joins_every_thread_and_frees_the_port_with_clients_connected() {
    #[cfg(target_os = "linux")]
    let before = thread_count();
    let mut server = start();
    let addr = server.local_addr();
    let (done, main) = pump(&server);
    let mut clients = Vec::new();
    for _ in 0..10 {
        let (mut w, mut r) = connect(&server);
        w.write_all(br#"{"type":"echo","params":{"x":1}}"#).ok();
        assert_eq!(read_reply(&mut r)["result"]["x"], json!(1));
        clients.push((w, r));
    }
    // One client has a job in flight when the stop begins: it must still get its reply.
    let (mut w, mut r) = connect(&server);
    w.write_all(br#"{"type":"sleep","params":{"ms":300}}"#).ok();
    std::thread::sleep(Duration::from_millis(100));
    done.store(true, Ordering::SeqCst);
    // The pump finishes the running job and exits; stop then refuses what is still queued.
    let stopper = std::thread::spawn(move || {
        main.join().ok();
        server.stop();
        drop(server);
    });
    let v = read_reply(&mut r);
    assert_eq!(v["status"], json!("success"), "{v}");
    stopper.join().ok();
    drop(clients);
    // The port can be bound again at once.
    let again = Server::start(Config {
        port: addr.port(),
        ..Config::default()
    });
    assert!(again.is_ok(), "rebind failed");
    drop(again);
    #[cfg(target_os = "linux")]
    {
        let deadline = Instant::now() + Duration::from_secs(2);
        while thread_count() > before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(thread_count(), before, "threads leaked");
    }
}
