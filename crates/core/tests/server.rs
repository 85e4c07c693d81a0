//! Integration tests of the pure-Rust service: a Rust thread plays Blender's main thread, so the server's
//! threading, ordering and shutdown are checked without Python or Blender.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bld_remote_core::server::{Config, Server};
use serde_json::json;

mod common;
use common::{connect, pump, read_reply, start};

#[test]
fn pipelined_replies_match_ids_and_jobs_keep_their_order() {
    // Framed replies leave as soon as they are ready: control replies may overtake job replies, but every
    // reply carries its request's id and jobs (one main thread, FIFO) still finish in request order.
    let mut server = start();
    let (done, main) = pump(&server);
    let (mut w, mut r) = connect(&server);
    let mut batch = String::new();
    for i in 0..200 {
        let req = match i % 3 {
            0 => json!({"type": "echo", "params": {"i": i}, "id": i}),
            1 => json!({"type": "ping", "id": i}),
            _ => json!({"type": "sleep", "params": {"ms": 1, "i": i}, "id": i}),
        };
        batch.push_str(&req.to_string());
    }
    w.write_all(batch.as_bytes()).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut last_job = -1;
    for _ in 0..200 {
        let v = read_reply(&mut r);
        let i = v["id"].as_i64().unwrap_or(-1);
        assert!(seen.insert(i), "duplicate reply {v}");
        assert_eq!(v["status"], json!("success"), "{v}");
        if i % 3 != 1 {
            assert_eq!(v["result"]["i"], json!(i));
            assert!(
                i > last_job,
                "job replies out of order: {i} after {last_job}"
            );
            last_job = i;
        }
    }
    assert_eq!(seen.len(), 200);
    done.store(true, Ordering::SeqCst);
    main.join().ok();
    server.stop();
}

#[test]
fn framed_control_replies_overtake_a_slow_job_plain_ones_wait() {
    let mut server = start();
    let (done, main) = pump(&server);
    let (mut w, mut r) = connect(&server);
    let t0 = Instant::now();
    w.write_all(br#"{"type":"sleep","params":{"ms":600},"id":"slow"}{"type":"ping","id":"p"}"#)
        .ok();
    assert_eq!(read_reply(&mut r)["id"], json!("p"));
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "ping waited for the job"
    );
    assert_eq!(read_reply(&mut r)["id"], json!("slow"));
    // Without ids, replies stay in request order.
    let t0 = Instant::now();
    w.write_all(br#"{"type":"sleep","params":{"ms":300,"n":1}}{"type":"ping"}"#)
        .ok();
    assert_eq!(read_reply(&mut r)["result"]["n"], json!(1));
    assert_eq!(read_reply(&mut r)["result"]["pong"], json!(true));
    assert!(t0.elapsed() >= Duration::from_millis(300));
    done.store(true, Ordering::SeqCst);
    main.join().ok();
    server.stop();
}

#[test]
fn deadline_reply_is_not_held_behind_a_slow_job() {
    // A framed request whose deadline passes while an earlier job runs gets its timeout reply on time,
    // says it never ran, and indeed never runs.
    let mut server = start();
    let (done, main) = pump(&server);
    let (mut w, mut r) = connect(&server);
    let t0 = Instant::now();
    w.write_all(
        br#"{"type":"sleep","params":{"ms":800},"id":1}{"type":"echo","params":{"x":1},"id":2,"timeout":0.2}"#,
    )
    .ok();
    let v = read_reply(&mut r);
    assert_eq!(v["id"], json!(2), "{v}");
    assert_eq!(v["ran"], json!(false), "{v}");
    assert_eq!(v["timeout"], json!(true), "{v}");
    assert!(t0.elapsed() < Duration::from_millis(600));
    assert_eq!(read_reply(&mut r)["id"], json!(1));
    // A running job past its deadline: "may still be running".
    w.write_all(br#"{"type":"sleep","params":{"ms":500},"id":3,"timeout":0.1}"#)
        .ok();
    let v = read_reply(&mut r);
    assert_eq!(v["ran"], json!("unknown"), "{v}");
    assert_eq!(v["state"], json!("running"), "{v}");
    // Cancel a queued job on the same connection while another runs.
    w.write_all(
        br#"{"type":"sleep","params":{"ms":300},"id":4}{"type":"echo","id":5}{"type":"cancel","params":{"id":5},"id":6}"#,
    )
    .ok();
    // The cancelled job is answered at once ("ran": false), before the job ahead of it finishes.
    let t0 = Instant::now();
    let mut got = [read_reply(&mut r), read_reply(&mut r)];
    assert!(t0.elapsed() < Duration::from_millis(250));
    got.sort_by_key(|v| v["id"].as_i64());
    assert_eq!(got[0]["id"], json!(5));
    assert_eq!(got[0]["ran"], json!(false), "{}", got[0]);
    assert_eq!(got[1]["id"], json!(6));
    assert_eq!(got[1]["result"]["cancelled"], json!(true), "{}", got[1]);
    assert_eq!(read_reply(&mut r)["id"], json!(4));
    done.store(true, Ordering::SeqCst);
    main.join().ok();
    server.stop();
}

#[test]
fn control_requests_do_not_need_the_main_thread() {
    // No pump at all: ping and status still answer; a main-thread command waits until its deadline.
    let mut server = start();
    let (mut w, mut r) = connect(&server);
    w.write_all(br#"{"type":"ping"}{"type":"get_status"}"#).ok();
    assert_eq!(read_reply(&mut r)["result"]["pong"], json!(true));
    assert_eq!(read_reply(&mut r)["result"]["queue_length"], json!(0));
    let t0 = Instant::now();
    w.write_all(br#"{"type":"echo","timeout":0.2}"#).ok();
    let v = read_reply(&mut r);
    assert_eq!(v["ran"], json!(false), "{v}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    server.stop();
}

#[test]
fn queued_jobs_are_refused_not_dropped_on_stop() {
    let mut server = start();
    let (mut w, mut r) = connect(&server);
    w.write_all(br#"{"type":"echo","id":1}{"type":"echo","id":2}"#)
        .ok();
    std::thread::sleep(Duration::from_millis(100));
    server.stop();
    for id in [1, 2] {
        let v = read_reply(&mut r);
        assert_eq!(v["id"], json!(id));
        assert_eq!(v["ran"], json!(false), "{v}");
    }
}

/// A large `execute_code` reply carries its output twice (`result`, `output.stdout`) from one buffer,
/// written with vectored writes. Through a slow reader with a small receive buffer those writes are
/// partial many times over: every byte must still arrive once, in order, for plain text (sent from the
/// output's own buffer) and for text that needs escaping; replies to id-less requests keep their order.
#[test]
fn large_execute_code_replies_survive_partial_vectored_writes() {
    let cfg = Config {
        port: 0,
        main_thread_commands: vec!["execute_code".into()],
        ..Config::default()
    };
    let mut server = bld_remote_core::server::Server::start(cfg).unwrap();
    let (done, main) = pump(&server);
    let (mut w, mut r) = connect(&server);
    w.set_read_timeout(Some(Duration::from_secs(60))).ok();
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok();
    let plain: String = (0..3_000_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let escaped: String = (0..1_000_000)
        .map(|i| ["x", "\n", "\"", "\\", "é", "\u{1}", "\t"][i % 7])
        .collect();
    // The test pump answers with the params: `stdout` becomes the captured output.
    for out in [&plain, &escaped] {
        let req =
            json!({"type": "execute_code", "params": {"code": "x", "stdout": out, "stderr": "e"}});
        w.write_all(req.to_string().as_bytes()).ok();
    }
    w.write_all(br#"{"type":"execute_code","id":"b64","params":{"code":"x","stdout":"hi\n","return_as_base64":true}}"#)
        .ok();
    w.write_all(br#"{"type":"ping"}"#).ok();
    // Read slowly at first, so the writer meets a full socket mid-reply.
    std::thread::sleep(Duration::from_millis(300));
    let mut seen_b64 = false;
    let mut plain_replies = Vec::new();
    for _ in 0..4 {
        let v = read_reply(&mut r);
        if v["id"] == json!("b64") {
            assert_eq!(v["result"]["result"], json!("aGkK"), "{v}");
            assert_eq!(v["result"]["result_is_base64"], json!(true));
            assert_eq!(v["result"]["output"]["stdout"], json!("hi\n"));
            seen_b64 = true;
        } else {
            plain_replies.push(v);
        }
    }
    assert!(seen_b64);
    assert_eq!(plain_replies.len(), 3);
    for (v, want) in plain_replies.iter().zip([&plain, &escaped]) {
        assert_eq!(v["status"], json!("success"));
        assert_eq!(v["result"]["result"].as_str(), Some(want.as_str()));
        assert_eq!(
            v["result"]["output"]["stdout"].as_str(),
            Some(want.as_str())
        );
        assert_eq!(v["result"]["output"]["stderr"], json!("e"));
        assert_eq!(v["result"]["executed"], json!(true));
    }
    assert_eq!(plain_replies[2]["result"]["pong"], json!(true));
    done.store(true, Ordering::SeqCst);
    main.join().ok();
    server.stop();
}

#[test]
fn a_large_read_buffer_goes_to_the_next_connection_and_is_freed_at_stop() {
    // A connection that ended leaves its read buffer to the next one (pages already in memory); one
    // buffer at most, freed when the service stops.
    let mut server = start();
    let big =
        json!({"type": "put_persist_data", "params": {"key": "k", "data": "x".repeat(1 << 20)}});
    {
        let (mut w, mut r) = connect(&server);
        w.write_all(big.to_string().as_bytes()).unwrap();
        assert_eq!(read_reply(&mut r)["status"], json!("success"));
    }
    let shared = std::sync::Arc::clone(server.shared());
    let until = Instant::now() + Duration::from_secs(10);
    while shared.spare_read_buffer_bytes() < 1 << 20 && Instant::now() < until {
        std::thread::yield_now();
    }
    assert!(shared.spare_read_buffer_bytes() >= 1 << 20);
    let (mut w, mut r) = connect(&server);
    w.write_all(br#"{"type":"ping"}"#).unwrap();
    assert_eq!(read_reply(&mut r)["status"], json!("success"));
    assert_eq!(
        shared.spare_read_buffer_bytes(),
        0,
        "the new connection took it"
    );
    drop((w, r));
    server.stop();
    assert_eq!(shared.spare_read_buffer_bytes(), 0, "freed at stop");
}

#[test]
fn a_slot_closed_by_its_client_is_free_for_the_next_connection_at_once() {
    // At the connection limit, a client that has just closed must not cause the next one to be refused
    // while the closed connection's threads are still ending (the listener waits for them, briefly).
    let cfg = Config {
        port: 0,
        max_connections: 2,
        ..Config::default()
    };
    let mut server = Server::start(cfg).unwrap();
    let (mut keep_w, mut keep_r) = connect(&server);
    keep_w.write_all(br#"{"type":"ping"}"#).unwrap();
    assert_eq!(read_reply(&mut keep_r)["status"], json!("success"));
    for round in 0..100 {
        let (mut w, mut r) = connect(&server);
        w.write_all(br#"{"type":"ping"}"#).unwrap();
        let v = read_reply(&mut r);
        assert_eq!(v["status"], json!("success"), "round {round}: {v}");
        drop((w, r));
    }
    // A third live connection is still refused: the wait is for ending connections only.
    let (mut w2, mut r2) = connect(&server);
    w2.write_all(br#"{"type":"ping"}"#).unwrap();
    assert_eq!(read_reply(&mut r2)["status"], json!("success"));
    let (_w3, mut r3) = connect(&server);
    let v = read_reply(&mut r3);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("too many connections"),
        "{v}"
    );
    server.stop();
}
