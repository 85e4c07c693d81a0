//! Instance descriptors: each running service writes one small JSON file (pid, host, port, Blender version,
//! open .blend, start time) into the user's runtime directory and removes it when it stops, so that
//! `bld-remote` and `bld_remote.Client()` can find "the" running Blender without being told a port.
//! Pure Rust. Written and removed on the thread that starts/stops the service (Blender's main thread);
//! read by the CLI and the client.
//!
//! Directory: `$BLD_REMOTE_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/bld_remote`, else a per-user folder in the
//! temp dir. The folder is 0700 and each file 0600 on Unix: a descriptor holds the service's token (like a
//! Jupyter connection file), so only its owner may read it. Files are written to a temp file created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` and renamed into place, so a planted symlink is never followed.
//!
//! A file whose process died without cleaning up (crash, SIGKILL) is "stale" (the rule `PostgreSQL` keeps for
//! its lock files: never trust one whose process is gone, nor one whose pid now names another process — the process
//! start time is recorded to tell). Every lookup prunes what it finds stale: [`token_for`] the files whose
//! process is gone, [`live`] (`ls`, `pick`, the MCP server) also those whose port no longer answers as that
//! instance (for a service with a token: cannot prove the token in the handshake).

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::{Client, ClientError};

const PREFIX: &str = "bld_remote-";
const SUFFIX: &str = ".json";

/// One running service, as its descriptor file records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    pub pid: u32,
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub blender_version: Option<String>,
    #[serde(default)]
    pub blend_file: Option<String>,
    /// Seconds since the Unix epoch.
    pub started_at: f64,
    /// The same instant as ISO 8601 (UTC), for humans.
    #[serde(default)]
    pub started: String,
    /// `background` or `gui`.
    #[serde(default)]
    pub mode: String,
    /// Whether requests need a token.
    #[serde(default)]
    pub auth: bool,
    /// The token itself, so the owner's `bld-remote` and `Client()` can authenticate without being told it
    /// (the file is 0600 in a 0700 folder, like Jupyter's connection files). Never printed by `ls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The read-only token (`read_token`), kept the same way: clients that want only read rights
    /// (`bld-remote mcp --read-only`) take it from here. Never printed by `ls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_token: Option<String>,
    /// The `bld_remote` version serving.
    #[serde(default)]
    pub version: String,
    /// When the process started, in clock ticks since boot (Linux `/proc/<pid>/stat`, field 22): a pid
    /// that names a process started at another time is a reused pid, and the descriptor is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_start: Option<u64>,
}

impl Descriptor {
    /// A descriptor for a service of this process.
    pub fn for_this_process(
        host: &str,
        port: u16,
        mode: &str,
        token: Option<&str>,
        info: &serde_json::Map<String, Value>,
    ) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let text = |k: &str| {
            info.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Self {
            pid: std::process::id(),
            host: host.to_string(),
            port,
            blender_version: text("blender_version"),
            blend_file: text("blend_file"),
            started_at: now.as_secs_f64(),
            started: iso8601_utc(now.as_secs()),
            mode: mode.to_string(),
            auth: token.is_some(),
            token: token.map(str::to_string),
            read_token: None,
            version: env!("CARGO_PKG_VERSION").to_string(),
            process_start: process_start(std::process::id()),
        }
    }

    /// The same, with a read-only token beside the full one (`auth` is true when either is set).
    #[must_use]
    pub fn with_read_token(mut self, read_token: Option<&str>) -> Self {
        self.read_token = read_token.map(str::to_string);
        self.auth = self.token.is_some() || self.read_token.is_some();
        self
    }

    pub fn addr_text(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn file_name(&self) -> String {
        format!("{PREFIX}{}-{}{SUFFIX}", self.pid, self.port)
    }
}

/// Where descriptors live (not created by this call).
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BLD_REMOTE_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        if d.is_dir() {
            return d.join("bld_remote");
        }
    }
    // /tmp is shared: a per-user name, and 0700 below.
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "user".into());
    let user: String = user
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    std::env::temp_dir().join(format!("bld_remote-{user}"))
}

fn ensure_dir() -> std::io::Result<PathBuf> {
    let dir = runtime_dir();
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if std::fs::symlink_metadata(&dir).is_err() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
        }
        // The folder itself, never what a link there points to.
        let meta = std::fs::symlink_metadata(&dir)?;
        if !meta.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory (a symlink?): refusing to write an instance descriptor there",
                dir.display()
            )));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            // Fails (and so refuses to write) when the folder belongs to someone else.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Write the descriptor (atomically: a temp file renamed into place). Returns its path.
///
/// The temp file is created new (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600): whatever already sits at its
/// name (a leftover, or a planted symlink) is removed — the name, never a link's target — and creation
/// retried, so no link is ever followed. `rename` then replaces whatever is at the final name, a symlink
/// included, without following it.
pub fn write(d: &Descriptor) -> std::io::Result<PathBuf> {
    write_in(&ensure_dir()?, d)
}

fn write_in(dir: &Path, d: &Descriptor) -> std::io::Result<PathBuf> {
    let path = dir.join(d.file_name());
    let tmp = dir.join(format!(".{}.tmp", d.file_name()));
    let bytes = serde_json::to_vec_pretty(d).map_err(std::io::Error::other)?;
    let mut f = match create_new(&tmp) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            std::fs::remove_file(&tmp)?;
            create_new(&tmp)?
        }
        other => other?,
    };
    let written = f
        .write_all(&bytes)
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(path)
}

/// A new owner-only file that must not exist yet, never through a symlink.
fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    opts.open(path)
}

/// Remove a descriptor written by [`write`]; missing is fine.
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Every descriptor file in the runtime directory, parsed (unreadable ones as `Err`).
pub fn all() -> Vec<(PathBuf, Result<Descriptor, String>)> {
    let Ok(entries) = std::fs::read_dir(runtime_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
        })
        .map(|p| {
            let parsed = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Descriptor>(&b).map_err(|e| e.to_string()));
            (p, parsed)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Why a descriptor is not a live instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    Unreadable(String),
    ProcessGone,
    /// The pid is alive, but names a process started at another time than the service's.
    PidReused,
    NotAnswering(String),
    OtherProcess(u64),
    /// Its port answers, but cannot prove the descriptor's token (the handshake failed).
    Unverified(String),
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable(e) => write!(f, "unreadable: {e}"),
            Self::ProcessGone => f.write_str("its process is gone"),
            Self::PidReused => f.write_str("its pid now names another process"),
            Self::Unverified(e) => write!(f, "its port does not answer as that instance: {e}"),
            Self::NotAnswering(e) => write!(f, "its port does not answer: {e}"),
            Self::OtherProcess(pid) => {
                write!(f, "its port is served by another process (pid {pid})")
            }
        }
    }
}

/// When process `pid` started (clock ticks since boot, `/proc/<pid>/stat` field 22); `None` off Linux or
/// when it cannot be read.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (the command name) is in parentheses and may hold spaces or ')': count after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The process-level verdict, without the network: gone, or its pid reused by another process.
fn process_stale(d: &Descriptor) -> Option<Stale> {
    // Linux: cheap and certain. Elsewhere the port check in [`check`] decides.
    if !Path::new("/proc/self").exists() {
        return None;
    }
    if !Path::new(&format!("/proc/{}", d.pid)).exists() {
        return Some(Stale::ProcessGone);
    }
    match (d.process_start, process_start(d.pid)) {
        (Some(recorded), Some(now)) if recorded != now => Some(Stale::PidReused),
        _ => None,
    }
}

/// Is this descriptor's service alive? Checks the process (pid and start time), then asks its port for
/// `get_status` (answered on the service's network threads, so a busy Blender still answers at once) and
/// checks the pid. With the descriptor's token, the client's handshake first makes the port prove it
/// holds that token: a squatter cannot.
pub fn check(d: &Descriptor, timeout: Duration) -> Result<(), Stale> {
    if let Some(why) = process_stale(d) {
        return Err(why);
    }
    let token = d.token.clone().or_else(|| d.read_token.clone());
    let mut c = Client::new(d.host.clone(), d.port, Some(timeout), token);
    match c.status() {
        Ok(status) => match status.get("pid").and_then(Value::as_u64) {
            Some(pid) if pid != u64::from(d.pid) => Err(Stale::OtherProcess(pid)),
            _ => Ok(()),
        },
        Err(ClientError::Unverified { detail, .. }) => Err(Stale::Unverified(detail)),
        // It answered, just not to us (a descriptor without its token, from an older version): alive.
        Err(ClientError::Remote { .. }) => Ok(()),
        Err(e) => Err(Stale::NotAnswering(e.to_string())),
    }
}

/// The live instances; with `clean`, stale descriptor files are deleted. Returns (live, removed stale).
pub fn live(clean: bool) -> (Vec<Descriptor>, Vec<(PathBuf, Stale)>) {
    let mut alive = Vec::new();
    let mut stale = Vec::new();
    for (path, parsed) in all() {
        let verdict = match parsed {
            Ok(d) => check(&d, Duration::from_secs(2)).map(|()| d),
            Err(e) => Err(Stale::Unreadable(e)),
        };
        match verdict {
            Ok(d) => alive.push(d),
            Err(why) => {
                if clean {
                    remove(&path);
                }
                stale.push((path, why));
            }
        }
    }
    alive.sort_by(|a, b| a.started_at.total_cmp(&b.started_at));
    (alive, stale)
}

/// The descriptors whose process is alive (pid and start time; no network), oldest first; those whose process
/// is gone are deleted. Cheap (a few file reads): for a lookup on every request, where [`live`]'s port check
/// per instance would cost a connection each.
pub fn running() -> Vec<Descriptor> {
    let mut out: Vec<Descriptor> = all()
        .into_iter()
        .filter_map(|(path, d)| {
            let d = d.ok()?;
            if process_stale(&d).is_some() {
                remove(&path);
                return None;
            }
            Some(d)
        })
        .collect();
    out.sort_by(|a, b| a.started_at.total_cmp(&b.started_at));
    out
}

/// The token a client should send to `host:port`: the explicit one, else `$BLD_REMOTE_TOKEN` (unless it is
/// `auto`, which asks a *service* to generate one), else the one in the service's owner-only descriptor.
pub fn resolve_token(explicit: Option<String>, host: &str, port: u16) -> Option<String> {
    explicit
        .filter(|t| !t.is_empty())
        .or_else(|| {
            std::env::var("BLD_REMOTE_TOKEN")
                .ok()
                .filter(|t| !t.is_empty() && t != "auto")
        })
        .or_else(|| token_for(host, port))
}

/// The token of the service on `host:port`, from its descriptor (owner-only), when it has one.
///
/// A lookup prunes: descriptors for that address whose process is gone (or whose pid was reused) are
/// deleted. Their token is still returned when no live descriptor has one, so the client's handshake asks
/// whatever holds the port now to prove it (a restarted service with the same token can; a squatter cannot,
/// and the client then refuses it instead of talking to it without a token). The token itself is never
/// sent (see [`crate::auth`]).
pub fn token_for(host: &str, port: u16) -> Option<String> {
    // A service with only a read token (a read-only service): that one is the token there is.
    token_in(host, port, |d| {
        d.token.clone().or_else(|| d.read_token.clone())
    })
}

/// The read-only token of the service on `host:port`, from its descriptor, when it has one (pruning as
/// [`token_for`] does).
pub fn read_token_for(host: &str, port: u16) -> Option<String> {
    token_in(host, port, |d| d.read_token.clone())
}

fn token_in(host: &str, port: u16, which: fn(&Descriptor) -> Option<String>) -> Option<String> {
    let loopback = |h: &str| {
        h == "localhost"
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    let mut from_live: Option<Option<String>> = None;
    let mut from_stale = None;
    for (path, d) in all() {
        let Ok(d) = d else { continue };
        let same_host = d.host == host || (loopback(&d.host) && loopback(host));
        if d.port != port || !same_host {
            continue;
        }
        if process_stale(&d).is_some() {
            remove(&path);
            from_stale = from_stale.or_else(|| which(&d));
        } else if from_live.as_ref().is_none_or(Option::is_none) {
            // A live instance decides (a live one without a token: the port needs none).
            from_live = Some(which(&d));
        }
    }
    from_live.unwrap_or(from_stale)
}

/// The service to talk to: `port` when given (on `host`, default 127.0.0.1); else the only live instance
/// (on `host`, when given). Several live instances and no port: an error listing them; never a guess.
pub fn pick(host: Option<&str>, port: Option<u16>) -> Result<(String, u16), String> {
    if let Some(port) = port {
        return Ok((host.unwrap_or("127.0.0.1").to_string(), port));
    }
    let (alive, _) = live(true);
    let alive: Vec<Descriptor> = alive
        .into_iter()
        .filter(|d| host.is_none_or(|h| h == d.host))
        .collect();
    match alive.as_slice() {
        [one] => Ok((one.host.clone(), one.port)),
        [] => Err(format!(
            "no running bld_remote instance found (descriptors in {}); start one with `bld-remote start`, \
             or pass --port",
            runtime_dir().display()
        )),
        several => {
            let list: Vec<String> = several
                .iter()
                .map(|d| {
                    format!(
                        "  --port {:<6} pid {} ({}{})",
                        d.port,
                        d.pid,
                        d.blender_version.as_deref().unwrap_or("Blender"),
                        d.blend_file.as_deref().map(|f| format!(", {f}")).unwrap_or_default()
                    )
                })
                .collect();
            Err(format!(
                "{} bld_remote instances are running; say which with --port:\n{}",
                several.len(),
                list.join("\n")
            ))
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` from Unix seconds (proleptic Gregorian; Howard Hinnant's civil-from-days).
pub fn iso8601_utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601_utc(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn writes_never_follow_planted_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("bld_remote-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = Descriptor::for_this_process(
            "127.0.0.1",
            7001,
            "background",
            Some("t"),
            &serde_json::Map::new(),
        );
        let (victim, victim_tmp) = (dir.join("victim"), dir.join("victim_tmp"));
        std::fs::write(&victim, "precious").unwrap();
        std::fs::write(&victim_tmp, "precious too").unwrap();
        let tmp = dir.join(format!(".{}.tmp", d.file_name()));
        std::os::unix::fs::symlink(&victim, dir.join(d.file_name())).unwrap();
        std::os::unix::fs::symlink(&victim_tmp, &tmp).unwrap();
        let path = write_in(&dir, &d).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(
            std::fs::read_to_string(&victim_tmp).unwrap(),
            "precious too"
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            std::fs::symlink_metadata(&tmp).is_err(),
            "no temp file left"
        );
        let back: Descriptor = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, d);
        // The plain O_EXCL create refuses a link, and so would a plain open with O_NOFOLLOW.
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        assert!(create_new(&tmp).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn dead_and_reused_pids_are_stale() {
        let me = Descriptor::for_this_process(
            "127.0.0.1",
            1,
            "background",
            None,
            &serde_json::Map::new(),
        );
        assert!(me.process_start.is_some());
        assert_eq!(process_start(me.pid), me.process_start, "stable");
        assert_eq!(process_stale(&me), None);
        let reused = Descriptor {
            process_start: me.process_start.map(|t| t + 1),
            ..me.clone()
        };
        assert_eq!(process_stale(&reused), Some(Stale::PidReused));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = Descriptor { pid, ..me };
        assert_eq!(process_stale(&gone), Some(Stale::ProcessGone));
    }

    #[test]
    fn descriptor_round_trips_and_tolerates_missing_optional_fields() {
        let d = Descriptor::for_this_process(
            "127.0.0.1",
            7000,
            "background",
            Some("s3cret"),
            &serde_json::Map::new(),
        );
        let text = serde_json::to_string(&d).unwrap_or_default();
        let back: Descriptor = serde_json::from_str(&text).unwrap();
        assert_eq!(back, d);
        // A timestamp that did not survive the round trip before serde_json's float_roundtrip feature.
        let t: f64 = serde_json::from_str("1795895380.1602385").unwrap_or_default();
        assert_eq!(t.to_bits(), 1_795_895_380.160_238_5_f64.to_bits());
        let minimal: Descriptor =
            serde_json::from_str(r#"{"pid": 1, "host": "127.0.0.1", "port": 2, "started_at": 0}"#)
                .unwrap();
        assert_eq!(minimal.port, 2);
        assert!(minimal.blend_file.is_none());
    }
}
