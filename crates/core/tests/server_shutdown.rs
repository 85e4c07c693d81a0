//! Shutdown joins every thread: alone in its own test binary so the process's thread count is exact.
//! A Rust thread plays Blender's main thread.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bld_remote_core::server::{Config, Server};
use serde_json::json;

mod common;
use common::{connect, pump, read_reply, start};

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
