//! Flow control and fairness of the pure-Rust service (a Rust thread plays Blender's main thread): jobs of
//! different connections are served round-robin, each connection's queued jobs are capped, replies a
//! client does not read are bounded by a byte budget and a total write deadline, and connection slots are
//! reclaimed from idle connections under pressure.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bld_remote_core::server::{Config, Server};
use serde_json::{json, Value};

mod common;
use common::{connect, pump, read_reply};

fn start_with(cfg: Config) -> Server {
    let cfg = Config {
        port: 0,
        main_thread_commands: vec!["echo".into(), "sleep".into()],
        ..cfg
    };
    match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => panic!("start: {e}"),
    }
}

/// Wait (bounded) for a condition on the service's state.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_fresh_connection_is_served_before_a_flooders_later_jobs() {
    let mut server = start_with(Config::default());
    let (done, main) = pump(&server);
    let (mut flood_w, mut flood_r) = connect(&server);
    let n = 20;
    let batch: String = (0..n)
        .map(|i| json!({"type": "sleep", "params": {"ms": 100, "i": i}, "id": i}).to_string())
        .collect();
    flood_w.write_all(batch.as_bytes()).unwrap();
    let shared = server.shared();
    wait_for("the flood to be queued", || shared.queue_len() >= n - 2);
    let (mut w, mut r) = connect(&server);
    let before = shared.requests_served();
    w.write_all(br#"{"type":"echo","params":{"fresh":true},"id":"fresh"}"#)
        .unwrap();
    let fresh = read_reply(&mut r);
    assert_eq!(fresh["result"]["fresh"], json!(true), "{fresh}");
    // Between sending it and its reply: the flood job running then, the fresh job itself, and (on a slow
    // machine) perhaps the next flood job; first-in first-out it would have been all 18+ queued ones.
    let ran_meanwhile = shared.requests_served() - before;
    assert!(
        ran_meanwhile <= 3,
        "the fresh request waited behind {} flood jobs",
        ran_meanwhile - 1
    );
    for _ in 0..n {
        let v = read_reply(&mut flood_r);
        assert_eq!(v["status"], json!("success"), "{v}");
    }
    done.store(true, Ordering::SeqCst);
    main.join().ok();
    server.stop();
}

#[test]
fn a_connection_past_its_queued_job_cap_gets_busy_errors_that_say_not_run() {
    let mut server = start_with(Config {
        max_queued_per_connection: 4,
        ..Config::default()
    });
    // No pump yet: jobs stay queued.
    let (mut w, mut r) = connect(&server);
    let batch: String = (0..10)
        .map(|i| json!({"type": "echo", "params": {"i": i}, "id": i}).to_string())
        .collect();
    w.write_all(batch.as_bytes()).unwrap();
    let mut busy = Vec::new();
    for _ in 0..6 {
        let v = read_reply(&mut r);
        assert_eq!(v["status"], json!("error"), "{v}");
        assert_eq!(v["ran"], json!(false), "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap_or("")
                .contains("per-connection limit"),
            "{v}"
        );
        busy.push(v["id"].as_i64().unwrap_or(-1));
    }
    assert_eq!(busy, [4, 5, 6, 7, 8, 9]);
    // Another connection still gets its share of the queue.
    let (mut w2, mut r2) = connect(&server);
    w2.write_all(br#"{"type":"echo","params":{"other":1},"id":"o"}"#)
        .unwrap();
    let (done, main) = pump(&server);
    assert_eq!(read_reply(&mut r2)["result"]["other"], json!(1));
    for i in 0..4 {
        assert_eq!(read_reply(&mut r)["result"]["i"], json!(i));
    }
    done.store(true, Ordering::SeqCst);
    main.join().ok();
    server.stop();
}

#[test]
fn replies_a_client_does_not_read_stop_its_jobs_at_the_byte_budget() {
    let budget = 1 << 20;
    let mut server = start_with(Config {
        max_reply_bytes_in_flight: budget,
        ..Config::default()
    });
    let (done, main) = pump(&server);
    let (mut w, mut r) = connect(&server);
    // Each echo reply is ~256 KB; 200 of them would be ~50 MB held if nothing stopped them.
    let blob = "x".repeat(256 * 1024);
    let n = 200;
    let writer = {
        let mut w2 = w.try_clone().unwrap();
        let blob = blob.clone();
        std::thread::spawn(move || {
            for i in 0..n {
                let req = json!({"type": "echo", "params": {"i": i, "blob": blob}, "id": i});
                if w2.write_all(req.to_string().as_bytes()).is_err() {
                    return;
                }
            }
        })
    };
    // The client reads nothing: the service runs jobs until the socket buffers and the budget are full,
    // then stops. Wait for the count to settle, then check it is far below n.
    let shared = server.shared();
    let mut last = u64::MAX;
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_millis(500) {
        let now = shared.requests_served();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Socket buffers on loopback hold a few MB at most; the budget 1 MB; so a few dozen replies.
    assert!(
        last < 60,
        "{last} jobs ran for a client that reads nothing (budget {budget} bytes)"
    );
    // Reading resumes everything, in order.
    for i in 0..n {
        let v = read_reply(&mut r);
        assert_eq!(v["result"]["i"], json!(i), "reply {i}");
    }
    writer.join().ok();
    w.flush().ok();
    done.store(true, Ordering::SeqCst);
    main.join().ok();
    server.stop();
}

#[test]
fn a_reply_read_at_a_trickle_is_cut_at_the_total_write_deadline() {
    let mut server = start_with(Config {
        write_timeout: Duration::from_secs(1),
        ..Config::default()
    });
    let (done, main) = pump(&server);
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    // A 32 MB reply, read 16 KB every 20 ms (0.8 MB/s): each write call makes progress, so only a total
    // deadline cuts it.
    let blob = "y".repeat(32 << 20);
    let req = json!({"type": "echo", "params": {"blob": blob}, "id": 1});
    s.write_all(req.to_string().as_bytes()).unwrap();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let trickle = std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        let mut got = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(n) => {
                    if got == 0 {
                        let _ = first_tx.send(Instant::now());
                    }
                    got += n;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let first = first_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    // The service's side of the connection ends at the deadline (the client may still be reading what
    // the kernel had buffered before the cut).
    wait_for("the connection to be cut", || {
        server.shared().status()["connections"] == json!(0)
    });
    let cut = first.elapsed();
    let got = trickle.join().unwrap();
    assert!(got < 32 << 20, "the whole reply arrived ({got} bytes)");
    assert!(cut < Duration::from_secs(3), "cut after {cut:?}");
    done.store(true, Ordering::SeqCst);
    main.join().ok();
    server.stop();
}

#[test]
fn at_the_limit_the_oldest_idle_connection_is_reclaimed_and_busy_ones_are_kept() {
    let mut server = start_with(Config {
        max_connections: 3,
        ..Config::default()
    });
    let ping = |w: &mut TcpStream, r: &mut std::io::BufReader<TcpStream>| -> Value {
        w.write_all(br#"{"type":"ping"}"#).unwrap();
        read_reply(r)
    };
    let (mut a_w, mut a_r) = connect(&server);
    assert_eq!(ping(&mut a_w, &mut a_r)["status"], json!("success"));
    let (mut b_w, mut b_r) = connect(&server);
    assert_eq!(ping(&mut b_w, &mut b_r)["status"], json!("success"));
    // c owes a reply (its job waits: no pump): busy, never reclaimed.
    let (mut c_w, mut c_r) = connect(&server);
    c_w.write_all(br#"{"type":"echo","params":{"c":1}}"#)
        .unwrap();
    wait_for("c's job to be queued", || server.shared().queue_len() == 1);
    let (mut d_w, mut d_r) = connect(&server);
    assert_eq!(ping(&mut d_w, &mut d_r)["status"], json!("success"));
    let v = read_reply(&mut a_r);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("closed to make room: idle for"),
        "{v}"
    );
    let mut rest = Vec::new();
    assert_eq!(a_r.read_to_end(&mut rest).unwrap_or(0), 0, "then closed");
    // b is still served.
    assert_eq!(ping(&mut b_w, &mut b_r)["status"], json!("success"));
    // Make b and d busy too: then a newcomer is refused.
    b_w.write_all(br#"{"type":"echo","params":{"b":1}}"#)
        .unwrap();
    d_w.write_all(br#"{"type":"echo","params":{"d":1}}"#)
        .unwrap();
    wait_for("three jobs queued", || server.shared().queue_len() == 3);
    let (_e_w, mut e_r) = connect(&server);
    let v = read_reply(&mut e_r);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("every one busy"),
        "{v}"
    );
    assert_eq!(server.shared().status()["connections_reclaimed"], json!(1));
    let (done, main) = pump(&server);
    assert_eq!(read_reply(&mut c_r)["result"]["c"], json!(1));
    assert_eq!(read_reply(&mut b_r)["result"]["b"], json!(1));
    assert_eq!(read_reply(&mut d_r)["result"]["d"], json!(1));
    done.store(true, Ordering::SeqCst);
    main.join().ok();
    server.stop();
}
