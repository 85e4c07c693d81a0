//! `Server::stop_accepting`, the half of a stop that a job may run on itself (issue 14, "a stop and a start
//! inside one request"): the port is free at once, a new service can bind it while the old one's job is still
//! running, and that job's reply still reaches its client before the old service closes the connection.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bld_remote_core::server::{Config, Server};
use common::{connect, pump, read_reply, start};

#[test]
fn stop_accepting_frees_the_port_while_the_running_jobs_reply_still_arrives() {
    let mut old = start();
    let port = old.local_addr().port();
    let (done, main) = pump(&old);
    let (mut w, mut r) = connect(&old);
    w.write_all(br#"{"id": 1, "type": "sleep", "params": {"ms": 400}}"#)
        .unwrap();
    // A second job, queued behind the first: refused by stop_accepting, never run.
    w.write_all(br#"{"id": 2, "type": "sleep", "params": {"ms": 1}}"#)
        .unwrap();
    // Wait until the first job runs (get_status's running_job), as a job calling stop would be.
    let began = std::time::Instant::now();
    while old.shared().status()["running_job"].is_null() {
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "the job never started"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    old.stop_accepting();
    // The port is free now: bind it again, as start_mcp_service() inside the job does.
    let new = Server::start(Config {
        port,
        ..Config::default()
    })
    .unwrap();
    assert_eq!(new.local_addr().port(), port);
    let mut replies = vec![read_reply(&mut r), read_reply(&mut r)];
    replies.sort_by_key(|v| v["id"].as_u64());
    assert_eq!(replies[0]["status"], "success", "{replies:?}");
    assert_eq!(replies[1]["ran"], false, "{replies:?}");
    // Refused at the gate: a request sent now on the old connection is not run.
    w.write_all(br#"{"id": 3, "type": "echo", "params": {}}"#)
        .unwrap();
    assert_eq!(read_reply(&mut r)["ran"], false);
    done.store(true, Ordering::SeqCst);
    main.join().unwrap();
    old.stop();
    old.stop(); // idempotent
                // The new one serves; the old connection is closed.
    let (mut w2, mut r2) = {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let r = std::io::BufReader::new(s.try_clone().unwrap());
        (s, r)
    };
    w2.write_all(br#"{"type": "ping"}"#).unwrap();
    assert_eq!(read_reply(&mut r2)["result"]["pong"], true);
    drop(new);
    assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
}
