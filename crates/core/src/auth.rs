//! The challenge-response handshake: both ends of a connection prove that they hold the service token
//! without the token ever crossing the wire (the OpenSSH idea: prove a shared secret, never send it). The
//! service proves itself first, so a client never gives anything to a process that has not proved it holds
//! the token (a port squatter after a crash, a wrong address, an older service).
//!
//! Pure Rust. The proof functions and [`ClientHandshake`] run in whatever process talks to a service (the
//! CLI, `bld_remote.Client`, the MCP server's connection, the descriptor checks in `instances`);
//! [`ConnAuth`] is the per-connection state the service's reader thread (`bld_remote-conn`) keeps.
//!
//! On the wire (see docs/PROTOCOL.md, *Authentication*):
//! 1. client → `auth_challenge {client_nonce}`; service → `{auth: true, version: 1, alg: "hmac-sha256",
//!    server_nonce, addr, port, pid, proof}` with `proof = HMAC-SHA256(token, message("service"))`.
//! 2. The client checks the proof (in constant time), that `port` is the port it dialed, and that a
//!    loopback `addr` is the loopback address it dialed (a relay from a squatted port or address to the
//!    real service proves the wrong one), and only then sends
//!    `authenticate {proof: HMAC-SHA256(token, message("client"))}`; the service checks it and marks the
//!    connection authenticated: later requests on it need no `token` field.
//!
//! `message(role) = "bld_remote-auth-v1|" + role + "|" + client_nonce + "|" + server_nonce + "|" + addr +
//! "|" + port + "|" + pid` (the strings exactly as sent, port and pid in decimal). The role label keeps a
//! service's
//! proof from ever being usable as a client's (no reflection); fresh nonces on both sides keep a recorded
//! proof from being replayed.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{KeyInit, Mac};
use serde_json::{json, Map, Value};

use crate::protocol::{Outcome, Request};
use crate::server::constant_time_eq;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The command that opens the handshake (answered without a token).
pub const CHALLENGE: &str = "auth_challenge";
/// The command that completes it.
pub const AUTHENTICATE: &str = "authenticate";
/// The handshake's version, in the proof's message and the challenge reply.
pub const VERSION: u64 = 1;
const ALG: &str = "hmac-sha256";
/// Random bytes in each nonce (the service's, and ours as a client).
const NONCE_BYTES: usize = 32;
/// Accepted length of a peer's nonce, in hex digits: at least 16 random bytes, at most 64.
const NONCE_HEX: std::ops::RangeInclusive<usize> = 32..=128;

/// `n` bytes from the operating system's random source (`getrandom(2)` on Linux), as lowercase hex.
pub fn random_hex(n: usize) -> Result<String, String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes)
        .map_err(|e| format!("the operating system's random source failed: {e}"))?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

fn valid_nonce(s: &str) -> bool {
    NONCE_HEX.contains(&s.len()) && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Which end a proof speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Service,
    Client,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Client => "client",
        }
    }
}

/// What a proof covers: who speaks, both nonces, and the service's address and port (as the connection
/// reached it) and pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript<'a> {
    pub client_nonce: &'a str,
    pub server_nonce: &'a str,
    pub addr: &'a str,
    pub port: u16,
    pub pid: u32,
}

impl Transcript<'_> {
    fn message(&self, role: Role) -> String {
        format!(
            "bld_remote-auth-v{VERSION}|{}|{}|{}|{}|{}|{}",
            role.label(),
            self.client_nonce,
            self.server_nonce,
            self.addr,
            self.port,
            self.pid
        )
    }

    fn mac(&self, token: &str, role: Role) -> HmacSha256 {
        // HMAC accepts keys of any length; this arm cannot fail, and an empty key is still a key.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(token.as_bytes())
            .unwrap_or_else(|_| HmacSha256::new(&hmac::digest::Key::<HmacSha256>::default()));
        mac.update(self.message(role).as_bytes());
        mac
    }

    /// The proof `role` sends: HMAC-SHA256 keyed by the token over [`Transcript::message`], lowercase hex.
    pub fn proof(&self, token: &str, role: Role) -> String {
        hex(&self.mac(token, role).finalize().into_bytes())
    }

    /// Whether `given` (hex) is `role`'s proof, compared in constant time.
    pub fn verify(&self, token: &str, role: Role, given: &str) -> bool {
        unhex(given).is_some_and(|bytes| self.mac(token, role).verify_slice(&bytes).is_ok())
    }
}

// --- the client's side ------------------------------------------------------------------------------------

/// One handshake as a client: make the challenge, check the service's answer, produce our proof.
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    client_nonce: String,
}

impl ClientHandshake {
    pub fn new() -> Result<Self, String> {
        Ok(Self {
            client_nonce: random_hex(NONCE_BYTES)?,
        })
    }

    /// The `params` of the `auth_challenge` request.
    pub fn challenge_params(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            "client_nonce".into(),
            Value::String(self.client_nonce.clone()),
        );
        m
    }

    /// Check the `auth_challenge` result: the service must prove it holds `token` for the address we
    /// dialed (`dialed`: the connection's peer address). Returns the `params` of our `authenticate`
    /// request; `Err` says why the service is not trusted (then nothing more may be sent to it).
    pub fn answer(
        &self,
        token: &str,
        dialed: SocketAddr,
        result: &Value,
    ) -> Result<Map<String, Value>, String> {
        let field = |k: &str| result.get(k);
        if field("auth").and_then(Value::as_bool) == Some(false) {
            return Err(
                "it says it requires no token, but a service that needs none cannot prove anything, \
                 and this client holds a token for it (a squatter would say the same)"
                    .into(),
            );
        }
        let version = field("version").and_then(Value::as_u64);
        if version != Some(VERSION) || field("alg").and_then(Value::as_str) != Some(ALG) {
            return Err(format!(
                "it offers handshake version {} / {}, not {VERSION} / {ALG}",
                version.map_or_else(|| "none".into(), |v| v.to_string()),
                field("alg").and_then(Value::as_str).unwrap_or("none")
            ));
        }
        let (Some(server_nonce), Some(proof), Some(addr), Some(port), Some(pid)) = (
            field("server_nonce").and_then(Value::as_str),
            field("proof").and_then(Value::as_str),
            field("addr").and_then(Value::as_str),
            field("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok()),
            field("pid")
                .and_then(Value::as_u64)
                .and_then(|p| u32::try_from(p).ok()),
        ) else {
            return Err("its challenge reply lacks server_nonce, proof, addr, port or pid".into());
        };
        if !valid_nonce(server_nonce) {
            return Err("its server_nonce is not 32 to 128 lowercase hex digits".into());
        }
        if server_nonce == self.client_nonce {
            return Err("it echoed our nonce back as its own".into());
        }
        let t = Transcript {
            client_nonce: &self.client_nonce,
            server_nonce,
            addr,
            port,
            pid,
        };
        // `read_proof` (present when the service has both tokens) is the read token's: a client holding
        // the read token checks that one.
        let read_proof = field("read_proof").and_then(Value::as_str);
        if !t.verify(token, Role::Service, proof)
            && !read_proof.is_some_and(|p| t.verify(token, Role::Service, p))
        {
            return Err("its proof is wrong: it does not hold the token".into());
        }
        // It holds the token; it must also be where we dialed, else something there relays to it.
        if port != dialed.port() {
            return Err(format!(
                "it proved the token for port {port}, but this client dialed port {} (a relay?)",
                dialed.port()
            ));
        }
        let Ok(served) = addr.parse::<IpAddr>().map(|a| a.to_canonical()) else {
            return Err(format!("its addr {addr:?} is not an IP address"));
        };
        let dialed_ip = dialed.ip().to_canonical();
        // Two loopback addresses must match (a squatter on [::1]:P relaying to 127.0.0.1:P); a loopback
        // dial that reaches another address is a port forward (docker -p, ssh -L), as is any other pair.
        if served.is_loopback() && dialed_ip.is_loopback() && served != dialed_ip {
            return Err(format!(
                "it proved the token for {served}, but this client dialed {dialed_ip} (a relay?)"
            ));
        }
        let mut m = Map::new();
        m.insert("proof".into(), Value::String(t.proof(token, Role::Client)));
        Ok(m)
    }
}

// --- the service's side -----------------------------------------------------------------------------------

/// What a request may do, decided by the token it (or its connection) proved: everything, or only the
/// commands that read (docs/PROTOCOL.md, *Roles*; the list is in `server::rights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rights {
    Full,
    Read,
}

impl Rights {
    /// Its name on the wire (`role` in the `authenticate` and `get_status` replies).
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Read => "read",
        }
    }
}

/// The service's tokens: the full one (`token`) and the read-only one (`read_token`), each optional.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokens<'a> {
    pub full: Option<&'a str>,
    pub read: Option<&'a str>,
}

impl<'a> Tokens<'a> {
    pub fn new(full: Option<&'a str>, read: Option<&'a str>) -> Self {
        Self {
            full: full.filter(|t| !t.is_empty()),
            read: read.filter(|t| !t.is_empty()),
        }
    }

    /// Whether the service needs any token (a read token alone makes every request need one).
    pub fn any(&self) -> bool {
        self.full.is_some() || self.read.is_some()
    }

    /// The rights `given` grants, compared in constant time against both tokens.
    fn rights_of(&self, given: &str) -> Option<Rights> {
        let full = self
            .full
            .is_some_and(|t| constant_time_eq(given.as_bytes(), t.as_bytes()));
        let read = self
            .read
            .is_some_and(|t| constant_time_eq(given.as_bytes(), t.as_bytes()));
        if full {
            Some(Rights::Full)
        } else if read {
            Some(Rights::Read)
        } else {
            None
        }
    }
}

/// What [`ConnAuth::gate`] decided for one request.
#[derive(Debug)]
pub enum Verdict {
    /// Serve it, with these rights (checked next against the read-only allow-list).
    Pass(Rights),
    /// Send this reply and nothing else: the handshake's own replies, or a refusal.
    Answer(Outcome),
}

/// A connection's authentication state, kept by its reader thread.
#[derive(Debug)]
pub struct ConnAuth {
    /// The address and port this connection reached (the service's, as seen on this connection): part of
    /// every proof.
    addr: String,
    port: u16,
    /// The rights the connection proved in the handshake (`None`: not authenticated).
    authenticated: Option<Rights>,
    /// The last challenge's nonces, until one `authenticate` uses them up.
    pending: Option<(String, String)>,
}

impl ConnAuth {
    /// `local`: the connection's local address (`TcpStream::local_addr`).
    pub fn new(local: Option<SocketAddr>) -> Self {
        Self {
            addr: local.map_or_else(String::new, |a| a.ip().to_canonical().to_string()),
            port: local.map_or(0, |a| a.port()),
            authenticated: None,
            pending: None,
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated.is_some()
    }

    /// The rights the handshake proved on this connection, if it ran.
    pub fn rights(&self) -> Option<Rights> {
        self.authenticated
    }

    /// The service's half, for one request: the handshake commands get their reply here; any other
    /// request passes with full rights when the service needs no token, else with the rights of the
    /// connection's handshake or of the request's plain `token` (older clients; the full token on a
    /// connection authenticated read-only raises that one request), and gets an auth error otherwise.
    /// Failures count in `failures` (`get_status`'s `auth_failures`).
    pub fn gate(&mut self, tokens: Tokens<'_>, request: &Request, failures: &AtomicU64) -> Verdict {
        if !request.legacy {
            match request.command.as_str() {
                CHALLENGE => return Verdict::Answer(self.challenge(tokens, &request.params)),
                AUTHENTICATE => {
                    let outcome = self.authenticate(tokens, &request.params);
                    if matches!(outcome, Outcome::Error { .. }) {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    return Verdict::Answer(outcome);
                }
                _ => {}
            }
        }
        if !tokens.any() {
            return Verdict::Pass(Rights::Full);
        }
        let given = request.token.as_deref().unwrap_or("");
        match (self.authenticated, tokens.rights_of(given)) {
            (_, Some(Rights::Full)) | (Some(Rights::Full), _) => {
                return Verdict::Pass(Rights::Full)
            }
            (Some(Rights::Read), _) | (None, Some(Rights::Read)) => {
                return Verdict::Pass(Rights::Read)
            }
            (None, None) => {}
        }
        failures.fetch_add(1, Ordering::Relaxed);
        Verdict::Answer(refusal(if given.is_empty() {
            "authentication required: this service needs a token (add \"token\" to the request, or \
             authenticate the connection first with auth_challenge / authenticate)"
        } else {
            "authentication failed: wrong token"
        }))
    }

    fn challenge(&mut self, tokens: Tokens<'_>, params: &Map<String, Value>) -> Outcome {
        // `proof` is made with the full token (else the read token, so that a client holding the only
        // token there is can verify it); `read_proof` with the read token when both exist. A client
        // checks the one its token makes.
        let Some(first) = tokens.full.or(tokens.read) else {
            return Outcome::Success(json!({
                "auth": false,
                "version": VERSION,
                "message": "this service requires no token: there is nothing to prove",
            }));
        };
        let client_nonce = match params.get("client_nonce") {
            Some(Value::String(n)) if valid_nonce(n) => n.clone(),
            _ => {
                return Outcome::error(
                    "auth_challenge needs 'client_nonce': 32 to 128 lowercase hex digits (16 to 64 fresh \
                     random bytes)",
                )
            }
        };
        let server_nonce = match random_hex(NONCE_BYTES) {
            Ok(n) => n,
            Err(e) => return Outcome::error(format!("cannot make a challenge: {e}")),
        };
        let pid = std::process::id();
        let t = Transcript {
            client_nonce: &client_nonce,
            server_nonce: &server_nonce,
            addr: &self.addr,
            port: self.port,
            pid,
        };
        let mut reply = json!({
            "auth": true,
            "version": VERSION,
            "alg": ALG,
            "server_nonce": server_nonce,
            "addr": self.addr,
            "port": self.port,
            "pid": pid,
            "proof": t.proof(first, Role::Service),
        });
        if let (Some(_), Some(read), Value::Object(m)) = (tokens.full, tokens.read, &mut reply) {
            m.insert(
                "read_proof".into(),
                Value::String(t.proof(read, Role::Service)),
            );
        }
        self.pending = Some((client_nonce, server_nonce));
        Outcome::Success(reply)
    }

    fn authenticate(&mut self, tokens: Tokens<'_>, params: &Map<String, Value>) -> Outcome {
        if !tokens.any() {
            return Outcome::error(
                "this service requires no token: there is nothing to authenticate",
            );
        }
        // One attempt per challenge: a wrong proof needs a new challenge (with a new server nonce).
        let Some((client_nonce, server_nonce)) = self.pending.take() else {
            return refusal(
                "authentication failed: no challenge is pending on this connection (send auth_challenge \
                 first; each challenge allows one authenticate)",
            );
        };
        let Some(Value::String(proof)) = params.get("proof") else {
            return refusal("authentication failed: authenticate needs 'proof' (hex)");
        };
        let t = Transcript {
            client_nonce: &client_nonce,
            server_nonce: &server_nonce,
            addr: &self.addr,
            port: self.port,
            pid: std::process::id(),
        };
        let verifies =
            |token: Option<&str>| token.is_some_and(|k| t.verify(k, Role::Client, proof));
        let rights = if verifies(tokens.full) {
            Rights::Full
        } else if verifies(tokens.read) {
            Rights::Read
        } else {
            return refusal(
                "authentication failed: wrong proof (the client does not hold this service's token)",
            );
        };
        self.authenticated = Some(rights);
        Outcome::Success(json!({"authenticated": true, "role": rights.name()}))
    }
}

/// An auth error reply: nothing ran.
fn refusal(message: &str) -> Outcome {
    let mut extra = Map::new();
    extra.insert("ran".into(), Value::Bool(false));
    extra.insert("auth".into(), Value::Bool(false));
    Outcome::error_with(message, extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn request(command: &str, params: Value, token: Option<&str>) -> Request {
        Request {
            id: Some(json!(1)),
            command: command.into(),
            params: match params {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            token: token.map(str::to_string),
            timeout: None,
            legacy: false,
        }
    }

    fn success(o: Option<Outcome>) -> Value {
        match o {
            Some(Outcome::Success(v)) => v,
            other => panic!("not a success: {other:?}"),
        }
    }

    fn is_error(o: Option<&Outcome>) -> bool {
        matches!(o, Some(Outcome::Error { .. }))
    }

    /// The gate with one full token, as before read tokens: `None` = passed with full rights.
    trait Gate {
        fn g(&mut self, token: Option<&str>, r: &Request, f: &AtomicU64) -> Option<Outcome>;
    }

    impl Gate for ConnAuth {
        fn g(&mut self, token: Option<&str>, r: &Request, f: &AtomicU64) -> Option<Outcome> {
            match self.gate(Tokens::new(token, None), r, f) {
                Verdict::Pass(Rights::Full) => None,
                Verdict::Pass(Rights::Read) => panic!("read rights without a read token"),
                Verdict::Answer(o) => Some(o),
            }
        }
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(unhex("00ff7a"), Some(vec![0, 255, 0x7a]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn proofs_differ_by_role_nonce_port_pid_and_token() {
        let t = Transcript {
            client_nonce: "aa",
            server_nonce: "bb",
            addr: "127.0.0.1",
            port: 6688,
            pid: 42,
        };
        let p = t.proof("tok", Role::Service);
        assert_eq!(p.len(), 64);
        assert!(t.verify("tok", Role::Service, &p));
        assert!(t.verify("tok", Role::Service, &p.to_uppercase()));
        assert!(
            !t.verify("tok", Role::Client, &p),
            "a service proof is no client proof"
        );
        assert!(!t.verify("tok2", Role::Service, &p));
        assert!(!t.verify("tok", Role::Service, &p[..62]));
        assert!(!t.verify("tok", Role::Service, "not hex"));
        for other in [
            Transcript {
                port: 6689,
                ..t.clone()
            },
            Transcript {
                pid: 43,
                ..t.clone()
            },
            Transcript {
                client_nonce: "ab",
                ..t.clone()
            },
            Transcript {
                server_nonce: "ba",
                ..t.clone()
            },
            Transcript {
                addr: "::1",
                ..t.clone()
            },
        ] {
            assert!(!other.verify("tok", Role::Service, &p), "{other:?}");
        }
        // The documented message, so third-party clients can check their implementation against it.
        assert_eq!(
            t.message(Role::Client),
            "bld_remote-auth-v1|client|aa|bb|127.0.0.1|6688|42"
        );
    }

    #[test]
    fn full_handshake_authenticates_the_connection_without_the_token_on_the_wire() {
        let failures = AtomicU64::new(0);
        let mut conn = ConnAuth::new(Some(at(7000)));
        let token = Some("s3cret-token");
        // Before: a request without a token is refused.
        assert!(is_error(
            conn.g(token, &request("ping", json!({}), None), &failures)
                .as_ref()
        ));
        let hs = ClientHandshake::new().unwrap();
        let challenge = request(CHALLENGE, Value::Object(hs.challenge_params()), None);
        let reply = success(conn.g(token, &challenge, &failures));
        assert!(!reply.to_string().contains("s3cret-token"));
        let params = hs.answer("s3cret-token", at(7000), &reply).unwrap();
        assert!(!Value::Object(params.clone())
            .to_string()
            .contains("s3cret-token"));
        let auth = request(AUTHENTICATE, Value::Object(params.clone()), None);
        assert_eq!(
            success(conn.g(token, &auth, &failures))["authenticated"],
            json!(true)
        );
        assert!(conn.is_authenticated());
        assert!(conn
            .g(token, &request("ping", json!({}), None), &failures)
            .is_none());
        assert_eq!(failures.load(Ordering::Relaxed), 1);
        // The same proof again (a replay) needs a pending challenge: refused.
        let mut fresh = ConnAuth::new(Some(at(7000)));
        assert!(is_error(fresh.g(token, &auth, &failures).as_ref()));
        assert!(!fresh.is_authenticated());
    }

    #[test]
    fn client_refuses_a_service_that_cannot_prove_the_token() {
        let hs = ClientHandshake::new().unwrap();
        // The real service with another token, on the right port.
        let mut conn = ConnAuth::new(Some(at(7000)));
        let failures = AtomicU64::new(0);
        let challenge = request(CHALLENGE, Value::Object(hs.challenge_params()), None);
        let reply = success(conn.g(Some("other"), &challenge, &failures));
        assert!(hs
            .answer("mine", at(7000), &reply)
            .unwrap_err()
            .contains("proof is wrong"));
        // The right token but another port: a relay.
        let reply = success(conn.g(Some("mine"), &challenge, &failures));
        assert!(hs
            .answer("mine", at(7001), &reply)
            .unwrap_err()
            .contains("relay"));
        // The right port on another loopback address: a squatter on [::1]:7000 relaying to 127.0.0.1:7000.
        let v6: SocketAddr = "[::1]:7000".parse().unwrap();
        assert!(hs.answer("mine", v6, &reply).unwrap_err().contains("relay"));
        // A dual-stack service sees an IPv4-mapped address: the same address.
        let mut mapped = ConnAuth::new(Some("[::ffff:127.0.0.1]:7000".parse().unwrap()));
        let reply = success(mapped.g(Some("mine"), &challenge, &failures));
        assert_eq!(reply["addr"], json!("127.0.0.1"));
        assert!(hs.answer("mine", at(7000), &reply).is_ok());
        // A loopback dial that reaches another address is a port forward (docker -p): accepted.
        let mut docker = ConnAuth::new(Some("172.17.0.2:7000".parse().unwrap()));
        let reply = success(docker.g(Some("mine"), &challenge, &failures));
        assert!(hs.answer("mine", at(7000), &reply).is_ok());
        // A squatter's fakes.
        let nonce = "ab".repeat(32);
        for fake in [
            json!({"auth": false}),
            json!({"pong": true}),
            json!({"auth": true, "version": 1, "alg": "hmac-sha256", "server_nonce": nonce, "addr": "127.0.0.1", "port": 7000, "pid": 1, "proof": "00".repeat(32)}),
            json!({"auth": true, "version": 1, "alg": "hmac-sha256", "server_nonce": "xyz", "addr": "127.0.0.1", "port": 7000, "pid": 1, "proof": "00"}),
            json!({"auth": true, "version": 2, "alg": "hmac-sha256"}),
            json!(null),
        ] {
            assert!(hs.answer("mine", at(7000), &fake).is_err(), "{fake}");
        }
        // Its own nonce echoed back, with a proof made by... nobody who knows the token.
        let echo = json!({"auth": true, "version": 1, "alg": "hmac-sha256", "server_nonce": hs.client_nonce,
                          "addr": "127.0.0.1", "port": 7000, "pid": 1, "proof": "00".repeat(32)});
        assert!(hs.answer("mine", at(7000), &echo).is_err());
    }

    #[test]
    fn service_side_refusals() {
        let failures = AtomicU64::new(0);
        let mut conn = ConnAuth::new(Some(at(7000)));
        // Bad client nonces.
        for bad in [
            json!({}),
            json!({"client_nonce": 5}),
            json!({"client_nonce": "ab"}),
            json!({"client_nonce": "Z".repeat(64)}),
            json!({"client_nonce": "a".repeat(130)}),
        ] {
            assert!(is_error(
                conn.g(Some("t"), &request(CHALLENGE, bad, None), &failures)
                    .as_ref()
            ));
        }
        // A wrong proof uses up the challenge.
        let hs = ClientHandshake::new().unwrap();
        let challenge = request(CHALLENGE, Value::Object(hs.challenge_params()), None);
        let _ = success(conn.g(Some("t"), &challenge, &failures));
        let wrong = request(AUTHENTICATE, json!({"proof": "00".repeat(32)}), None);
        assert!(is_error(conn.g(Some("t"), &wrong, &failures).as_ref()));
        assert!(!conn.is_authenticated());
        assert_eq!(failures.load(Ordering::Relaxed), 1);
        // Plain tokens keep working; a wrong one is refused.
        assert!(conn
            .g(Some("t"), &request("ping", json!({}), Some("t")), &failures)
            .is_none());
        assert!(is_error(
            conn.g(Some("t"), &request("ping", json!({}), Some("u")), &failures)
                .as_ref()
        ));
        // No token configured: everything passes, the challenge says there is nothing to prove.
        let mut open = ConnAuth::new(Some(at(7000)));
        assert!(open
            .g(None, &request("ping", json!({}), None), &failures)
            .is_none());
        assert_eq!(
            success(open.g(None, &challenge, &failures))["auth"],
            json!(false)
        );
        assert!(is_error(open.g(None, &wrong, &failures).as_ref()));
    }

    #[test]
    fn a_read_token_grants_read_rights_on_both_paths_and_never_full() {
        let failures = AtomicU64::new(0);
        let both = Tokens::new(Some("full-tok"), Some("read-tok"));
        let mut conn = ConnAuth::new(Some(at(7000)));
        let rights = |v: Verdict| match v {
            Verdict::Pass(r) => Some(r),
            Verdict::Answer(_) => None,
        };
        // Plain tokens: each request its own rights; no token or a wrong one is refused.
        let ping = |t: Option<&str>| request("ping", json!({}), t);
        assert_eq!(
            rights(conn.gate(both, &ping(Some("read-tok")), &failures)),
            Some(Rights::Read)
        );
        assert_eq!(
            rights(conn.gate(both, &ping(Some("full-tok")), &failures)),
            Some(Rights::Full)
        );
        assert_eq!(rights(conn.gate(both, &ping(None), &failures)), None);
        assert_eq!(
            rights(conn.gate(both, &ping(Some("nope")), &failures)),
            None
        );
        // The handshake with the read token: the client verifies `read_proof`, the connection is read.
        let hs = ClientHandshake::new().unwrap();
        let challenge = request(CHALLENGE, Value::Object(hs.challenge_params()), None);
        let Verdict::Answer(Outcome::Success(reply)) = conn.gate(both, &challenge, &failures)
        else {
            panic!("no challenge reply");
        };
        assert!(reply.get("read_proof").is_some());
        let params = hs.answer("read-tok", at(7000), &reply).unwrap();
        let auth = request(AUTHENTICATE, Value::Object(params), None);
        let Verdict::Answer(Outcome::Success(ok)) = conn.gate(both, &auth, &failures) else {
            panic!("not authenticated");
        };
        assert_eq!(ok["role"], json!("read"));
        assert_eq!(conn.rights(), Some(Rights::Read));
        assert_eq!(
            rights(conn.gate(both, &ping(None), &failures)),
            Some(Rights::Read)
        );
        // The full token on the request raises that request only.
        assert_eq!(
            rights(conn.gate(both, &ping(Some("full-tok")), &failures)),
            Some(Rights::Full)
        );
        assert_eq!(conn.rights(), Some(Rights::Read));
        // The full token's handshake still says full; a third token verifies neither proof.
        let mut conn2 = ConnAuth::new(Some(at(7000)));
        let Verdict::Answer(Outcome::Success(reply)) = conn2.gate(both, &challenge, &failures)
        else {
            panic!("no challenge reply");
        };
        assert!(hs.answer("other", at(7000), &reply).is_err());
        let params = hs.answer("full-tok", at(7000), &reply).unwrap();
        let auth = request(AUTHENTICATE, Value::Object(params), None);
        let Verdict::Answer(Outcome::Success(ok)) = conn2.gate(both, &auth, &failures) else {
            panic!("not authenticated");
        };
        assert_eq!(ok["role"], json!("full"));
        // A read token alone: tokenless requests are refused (a read token never widens access), and the
        // only proof there is is the read token's, in `proof` (no `read_proof`).
        let read_only = Tokens::new(None, Some("read-tok"));
        let mut conn3 = ConnAuth::new(Some(at(7000)));
        assert_eq!(rights(conn3.gate(read_only, &ping(None), &failures)), None);
        let Verdict::Answer(Outcome::Success(reply)) = conn3.gate(read_only, &challenge, &failures)
        else {
            panic!("no challenge reply");
        };
        assert_eq!(reply["auth"], json!(true));
        assert!(reply.get("read_proof").is_none());
        assert!(hs.answer("read-tok", at(7000), &reply).is_ok());
    }
}
