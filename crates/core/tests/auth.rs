//! The token handshake end to end, in pure Rust: a real `Server` with a token (a Rust thread plays Blender's
//! main thread), bld-remote-core's `Client`, raw sockets, and a recording relay that sits on another port
//! and forwards to the real service (the smartest squatter: it can pass the real service's proof along).

#![allow(clippy::unwrap_used)] // the relay helper is outside #[test] functions

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bld_remote_core::client::{Client, ClientError};
use bld_remote_core::server::{Config, Server};
use serde_json::{json, Map, Value};

mod common;
use common::{connect, pump, read_reply};

const TOKEN: &str = "handshake-test-token-0123456789abcdef";

fn start_with_token() -> Server {
    let cfg = Config {
        port: 0,
        token: Some(TOKEN.into()),
        main_thread_commands: vec!["echo".into(), "sleep".into()],
        ..Config::default()
    };
    match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => panic!("start: {e}"),
    }
}

fn echo(c: &mut Client) -> Result<Value, ClientError> {
    let mut p = Map::new();
    p.insert("x".into(), json!(1));
    c.call("echo", p)
}

/// Listens on a port of its own, records every byte clients send, and relays both ways to `target`.
fn relay(target: std::net::SocketAddr) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = Arc::clone(&seen);
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut upstream) = TcpStream::connect(target) else {
                return;
            };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
            });
            let rec = Arc::clone(&rec);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = client.read(&mut buf) {
                    if n == 0 || upstream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (port, seen)
}

#[test]
fn client_with_the_token_authenticates_by_handshake_and_never_sends_it() {
    let mut server = start_with_token();
    let (done, main) = pump(&server);
    let port = server.local_addr().port();

    // The right token: requests work on the authenticated connection, and the token is not on the wire
    // (seen through a relay on the service's own port is impossible, so check what a relay sees below).
    let mut c = Client::new(
        "127.0.0.1",
        port,
        Some(Duration::from_secs(10)),
        Some(TOKEN.into()),
    );
    assert_eq!(echo(&mut c).unwrap()["x"], json!(1));
    assert_eq!(echo(&mut c).unwrap()["x"], json!(1));
    assert_eq!(server.shared().status()["auth_failures"], json!(0));

    // A wrong token: the service cannot prove *that* token, so the client refuses it before sending anything.
    let mut wrong = Client::new(
        "127.0.0.1",
        port,
        Some(Duration::from_secs(10)),
        Some("nope".into()),
    );
    let e = echo(&mut wrong).unwrap_err();
    assert!(matches!(e, ClientError::Unverified { .. }), "{e:?}");
    assert!(e.to_string().contains("could not verify"), "{e}");
    // The client stopped after the service's proof: it never sent a (wrong) proof, so nothing counted.
    assert_eq!(server.shared().status()["auth_failures"], json!(0));

    // A relay on another port passes the real service's proof along: it proves the wrong port, so the client
    // refuses it, and the relay never sees the token (nor a client proof it could replay).
    let (relay_port, seen) = relay(server.local_addr());
    let mut via = Client::new(
        "127.0.0.1",
        relay_port,
        Some(Duration::from_secs(10)),
        Some(TOKEN.into()),
    );
    let e = echo(&mut via).unwrap_err();
    assert!(
        matches!(&e, ClientError::Unverified { detail, .. } if detail.contains("relay")),
        "{e:?}"
    );
    let seen = seen.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("auth_challenge"), "{text}");
    assert!(!text.contains(TOKEN), "the relay saw the token: {text}");
    assert!(
        !text.contains("authenticate\""),
        "the relay saw a client proof: {text}"
    );
    assert!(!text.contains("echo"), "the relay saw the request: {text}");

    done.store(true, std::sync::atomic::Ordering::SeqCst);
    server.stop();
    main.join().unwrap();
}

#[test]
fn plain_tokens_still_work_and_the_raw_handshake_is_one_attempt_per_challenge() {
    let mut server = start_with_token();
    let (done, main) = pump(&server);
    let (mut w, mut r) = connect(&server);
    let mut send = |v: Value| {
        let mut b = serde_json::to_vec(&v).unwrap();
        b.push(b'\n');
        w.write_all(&b).unwrap();
    };
    // Older clients: a plain token per request.
    send(json!({"type": "ping", "id": 1, "token": TOKEN}));
    assert_eq!(read_reply(&mut r)["status"], json!("success"));
    send(json!({"type": "ping", "id": 2}));
    let reply = read_reply(&mut r);
    assert_eq!(reply["auth"], json!(false), "{reply}");
    // A proof without a challenge, then a wrong proof: refused, and counted.
    send(json!({"type": "authenticate", "id": 3, "params": {"proof": "00"}}));
    assert_eq!(read_reply(&mut r)["status"], json!("error"));
    send(json!({"type": "auth_challenge", "id": 4, "params": {"client_nonce": "ab".repeat(32)}}));
    let challenge = read_reply(&mut r);
    assert_eq!(
        challenge["result"]["port"],
        json!(server.local_addr().port())
    );
    assert_eq!(challenge["result"]["pid"], json!(std::process::id()));
    send(json!({"type": "authenticate", "id": 5, "params": {"proof": "00".repeat(32)}}));
    assert_eq!(read_reply(&mut r)["status"], json!("error"));
    send(json!({"type": "ping", "id": 6}));
    assert_eq!(
        read_reply(&mut r)["status"],
        json!("error"),
        "still not authenticated"
    );
    assert_eq!(server.shared().status()["auth_failures"], json!(4));

    done.store(true, std::sync::atomic::Ordering::SeqCst);
    server.stop();
    main.join().unwrap();
}
