//! Facts written once and read everywhere: the version, the default host and port, and the service's
//! configuration, from explicit settings, else the environment, else the defaults. The extension
//! (`bld_remote._core`, and through it `start_mcp_service()` and the add-on), the CLI and the MCP server all
//! read these; nothing else parses a `BLD_REMOTE_*` service variable. Pure data; runs on the caller's thread.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::protocol;

/// The version of every crate and both wheels (the workspace's `Cargo.toml` is its only source).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The default service port (blender-remote's).
pub const DEFAULT_PORT: u16 = 6688;

/// The default bind address: loopback. Any other address requires a token.
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// The service's default deadline for a request that carries no `timeout` of its own.
pub const DEFAULT_REQUEST_DEADLINE: Duration = Duration::from_secs(300);

/// The client side's default wait for one reply (`bld_remote.Client(timeout=...)`): distinct from
/// [`DEFAULT_REQUEST_DEADLINE`], which is how long the service lets a request without its own `timeout` run.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Default time a request may take to arrive, from its first byte to its last.
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest a timeout setting may be (a day); 0 means "none" where a limit can be off.
pub const MAX_SECONDS: f64 = 86_400.0;

/// The longest timeout anything accepts: a request's `"timeout"`, a client's, the CLI's (30 days).
/// Larger numbers are errors rather than "forever": `Duration::from_secs_f64` panics past ~5.8e11 years.
pub const MAX_TIMEOUT_SECONDS: f64 = 2_592_000.0;

/// `s` seconds as a `Duration`: finite, more than 0 and at most [`MAX_TIMEOUT_SECONDS`]. Anything else
/// (0, negative, NaN, ±inf, 1e20) is an error naming `what`. Every timeout from a client, a Python caller
/// or the command line goes through here (or [`non_negative_seconds`]) where it enters.
pub fn positive_seconds(what: &str, s: f64) -> Result<Duration, ConfigError> {
    if s.is_finite() && s > 0.0 && s <= MAX_TIMEOUT_SECONDS {
        if let Ok(d) = Duration::try_from_secs_f64(s) {
            return Ok(d);
        }
    }
    Err(ConfigError(format!(
        "{what} must be a positive number of seconds, at most {MAX_TIMEOUT_SECONDS} (30 days), got {s}"
    )))
}

/// Like [`positive_seconds`], but 0 is allowed (a zero wait).
pub fn non_negative_seconds(what: &str, s: f64) -> Result<Duration, ConfigError> {
    if s == 0.0 {
        return Ok(Duration::ZERO);
    }
    positive_seconds(what, s).map_err(|_| {
        ConfigError(format!(
            "{what} must be 0 or a positive number of seconds, at most {MAX_TIMEOUT_SECONDS} (30 days), \
             got {s}"
        ))
    })
}

/// The environment variables, in one place.
pub mod env {
    pub const PORT: &str = "BLD_REMOTE_MCP_PORT";
    pub const START_NOW: &str = "BLD_REMOTE_MCP_START_NOW";
    pub const LOG_LEVEL: &str = "BLD_REMOTE_LOG_LEVEL";
    pub const TOKEN: &str = "BLD_REMOTE_TOKEN";
    pub const READ_TOKEN: &str = "BLD_REMOTE_READ_TOKEN";
    pub const MAX_REQUEST_BYTES: &str = "BLD_REMOTE_MAX_REQUEST_BYTES";
    pub const MAX_CONNECTIONS: &str = "BLD_REMOTE_MAX_CONNECTIONS";
    pub const QUEUE_CAPACITY: &str = "BLD_REMOTE_QUEUE_CAPACITY";
    pub const MAX_DEPTH: &str = "BLD_REMOTE_MAX_DEPTH";
    pub const IDLE_TIMEOUT: &str = "BLD_REMOTE_IDLE_TIMEOUT";
    pub const DEFAULT_TIMEOUT: &str = "BLD_REMOTE_DEFAULT_TIMEOUT";
    pub const REQUEST_READ_TIMEOUT: &str = "BLD_REMOTE_REQUEST_READ_TIMEOUT";
    pub const PERSIST_MAX_VALUE_BYTES: &str = "BLD_REMOTE_PERSIST_MAX_VALUE_BYTES";
    pub const PERSIST_MAX_TOTAL_BYTES: &str = "BLD_REMOTE_PERSIST_MAX_TOTAL_BYTES";
    pub const PERSIST_MAX_KEYS: &str = "BLD_REMOTE_PERSIST_MAX_KEYS";
    pub const WRITE_TIMEOUT: &str = "BLD_REMOTE_WRITE_TIMEOUT";
    pub const MAX_QUEUED_PER_CONNECTION: &str = "BLD_REMOTE_MAX_QUEUED_PER_CONNECTION";
    pub const MAX_REPLY_BYTES_IN_FLIGHT: &str = "BLD_REMOTE_MAX_REPLY_BYTES_IN_FLIGHT";
    pub const MAX_JOBS: &str = "BLD_REMOTE_MAX_JOBS";
    pub const MAX_JOB_RESULT_BYTES: &str = "BLD_REMOTE_MAX_JOB_RESULT_BYTES";
    pub const JOB_RESULT_TTL: &str = "BLD_REMOTE_JOB_RESULT_TTL";
}

/// Default capacity of the job queue (all connections together).
pub const DEFAULT_QUEUE_CAPACITY: usize = 16_384;

/// Default cap on one connection's jobs waiting for the main thread: a quarter of the default queue, so
/// one client alone never fills it, yet a pipelining client may still have 4096 requests queued (as it
/// could before the cap existed).
pub const DEFAULT_MAX_QUEUED_PER_CONNECTION: usize = 4096;

/// Default budget of encoded reply bytes a connection may hold unwritten before its requests stop being
/// read and its queued jobs stop being started.
pub const DEFAULT_MAX_REPLY_BYTES_IN_FLIGHT: usize = 64 << 20;

/// Everything that shapes a service. `Config::default()` is the safe default: loopback, port 6688.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// Required on every request when set; always required when `host` is not loopback.
    pub token: Option<String>,
    /// A second token that grants only the commands that read (`server::rights`). When it is set without
    /// `token`, every request needs it and nothing can be changed over the network: a read token never
    /// makes token-less access wider. Must differ from `token`.
    pub read_token: Option<String>,
    pub max_request_bytes: usize,
    pub max_depth: usize,
    pub max_connections: usize,
    pub queue_capacity: usize,
    /// Jobs one connection may have waiting for the main thread; more are refused as busy (`ran: false`).
    pub max_queued_per_connection: usize,
    /// Encoded reply bytes one connection may hold unwritten (its client is not reading them). At the
    /// budget its requests stop being read (TCP backpressure) and its queued jobs wait, until the client
    /// reads. A single reply larger than the budget still goes out whole.
    pub max_reply_bytes_in_flight: usize,
    /// Close a connection that sends nothing between requests for this long (`None`: never, the default:
    /// existing clients keep one connection open and idle for hours; see docs/PROTOCOL.md).
    pub idle_timeout: Option<Duration>,
    /// A request must arrive completely within this time of its first byte (slow-client protection).
    pub request_read_timeout: Duration,
    /// Deadline for requests that carry no `timeout` (`None`: wait as long as the work takes).
    pub default_timeout: Option<Duration>,
    /// Each reply must be written completely within this time of its first byte (a total deadline per
    /// reply, not per write call): a client that does not read it in time is disconnected.
    pub write_timeout: Duration,
    /// Bounds of the persist store (`put_persist_data`): one value, all values, the number of keys.
    pub persist: crate::persist::Limits,
    /// `gui` or `background`: reported by `get_status`.
    pub mode: String,
    /// Commands the main thread handles (registered by the Python side). Others are unknown.
    pub main_thread_commands: Vec<String>,
    /// Extra fields for `get_status` (Blender version, open file...), set by the embedding side.
    pub info: Map<String, Value>,
    /// Extra fields for `get_status` read each time it is answered (the embedding side's live counters).
    pub live_info: LiveInfo,
    /// Bounds of the job store (`submit_code_job`): records, result bytes, TTL.
    pub jobs: crate::store::StoreLimits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: DEFAULT_HOST.into(),
            port: DEFAULT_PORT,
            token: None,
            read_token: None,
            max_request_bytes: protocol::DEFAULT_MAX_REQUEST_BYTES,
            max_depth: protocol::DEFAULT_MAX_DEPTH,
            max_connections: 256,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_queued_per_connection: DEFAULT_MAX_QUEUED_PER_CONNECTION,
            max_reply_bytes_in_flight: DEFAULT_MAX_REPLY_BYTES_IN_FLIGHT,
            idle_timeout: None,
            request_read_timeout: DEFAULT_REQUEST_READ_TIMEOUT,
            default_timeout: Some(DEFAULT_REQUEST_DEADLINE),
            write_timeout: Duration::from_secs(30),
            persist: crate::persist::Limits::default(),
            mode: "background".into(),
            main_thread_commands: Vec::new(),
            info: Map::new(),
            live_info: LiveInfo::default(),
            jobs: crate::store::StoreLimits::default(),
        }
    }
}

/// Fields `get_status` adds each time it is answered, on the network thread (e.g. the extension's
/// `scene_generation`). The function must be cheap, and must never block or take the GIL.
#[derive(Clone, Default)]
pub struct LiveInfo(pub Option<std::sync::Arc<LiveInfoFn>>);

/// What a [`LiveInfo`] calls: adds its fields to the status object.
pub type LiveInfoFn = dyn Fn(&mut Map<String, Value>) + Send + Sync;

impl LiveInfo {
    /// Add the live fields to `status`.
    pub fn fill(&self, status: &mut Map<String, Value>) {
        if let Some(f) = &self.0 {
            f(status);
        }
    }
}

impl std::fmt::Debug for LiveInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "LiveInfo(set)"
        } else {
            "LiveInfo(none)"
        })
    }
}

/// Settings given explicitly (keyword arguments of `start_mcp_service()`, the add-on's preferences).
/// `None` falls back to the environment, then to the default. Timeouts are seconds; 0 turns a limit off.
/// Counts are `i128` so that any number a caller passes (negative, past `u64`) reaches the range check
/// and gets its message.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub token: Option<String>,
    pub read_token: Option<String>,
    pub max_request_bytes: Option<i128>,
    pub max_connections: Option<i128>,
    pub queue_capacity: Option<i128>,
    pub max_depth: Option<i128>,
    pub idle_timeout: Option<f64>,
    pub default_timeout: Option<f64>,
    pub request_read_timeout: Option<f64>,
    pub persist_max_value_bytes: Option<i128>,
    pub persist_max_total_bytes: Option<i128>,
    pub persist_max_keys: Option<i128>,
    pub write_timeout: Option<f64>,
    pub max_queued_per_connection: Option<i128>,
    pub max_reply_bytes_in_flight: Option<i128>,
    pub max_jobs: Option<i128>,
    pub max_job_result_bytes: Option<i128>,
    pub job_result_ttl: Option<f64>,
}

/// A variable or setting that is out of range: the message names it and says what it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Where the values come from: the process environment, or a map (tests).
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment. Empty variables count as unset.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<S: std::hash::BuildHasher> Source for std::collections::HashMap<&str, &str, S> {
    fn get(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| (*v).to_string())
            .filter(|v| !v.trim().is_empty())
    }
}

/// A port number: 0 (pick a free one) to 65535.
pub fn parse_port(name: &str, raw: &str) -> Result<u16, ConfigError> {
    raw.trim().parse::<u16>().map_err(|_| {
        ConfigError(format!(
            "{name} must be a port number (0-65535), got {raw:?}"
        ))
    })
}

fn parse_count(name: &str, raw: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    match raw.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError(format!(
            "{name} must be a whole number from {min} to {max}, got {raw:?}"
        ))),
    }
}

/// A count given as a number (from Python: any `int`, so it may be negative or past `u64`).
fn check_count(name: &str, n: i128, min: u64, max: u64) -> Result<u64, ConfigError> {
    match u64::try_from(n) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(ConfigError(format!(
            "{name} must be a whole number from {min} to {max}, got {n}"
        ))),
    }
}

/// A port given as a number: 0 (pick a free one) to 65535.
pub fn check_port(name: &str, n: i128) -> Result<u16, ConfigError> {
    u16::try_from(n)
        .map_err(|_| ConfigError(format!("{name} must be a port number (0-65535), got {n}")))
}

/// Seconds for a timeout setting: 0 means none (`Ok(None)`); otherwise a finite number from 1 ms to a day.
pub fn seconds(name: &str, s: f64) -> Result<Option<Duration>, ConfigError> {
    if s == 0.0 {
        return Ok(None);
    }
    if s.is_finite() && (0.001..=MAX_SECONDS).contains(&s) {
        return Ok(Some(Duration::from_secs_f64(s)));
    }
    Err(ConfigError(format!(
        "{name} must be a number of seconds from 0.001 to {MAX_SECONDS} (or 0 for no limit), got {s}"
    )))
}

fn parse_seconds(name: &str, raw: &str) -> Result<Option<Duration>, ConfigError> {
    let s: f64 = raw
        .trim()
        .parse()
        .map_err(|_| ConfigError(format!("{name} must be a number of seconds, got {raw:?}")))?;
    seconds(name, s)
}

/// `1/true/yes/on` (any case) is true; anything else false.
pub fn truthy(raw: &str) -> bool {
    matches!(
        raw.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// The port from `BLD_REMOTE_MCP_PORT`, if set. An unusable value is an error, never ignored.
pub fn port_from(src: &dyn Source) -> Result<Option<u16>, ConfigError> {
    src.get(env::PORT)
        .map(|raw| parse_port(env::PORT, &raw))
        .transpose()
}

/// What the add-on and blender-remote's `get_startup_options()` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupOptions {
    pub host: String,
    pub port: u16,
    /// `BLD_REMOTE_MCP_START_NOW`: start the service when the add-on registers.
    pub start_now: bool,
    /// `BLD_REMOTE_LOG_LEVEL`, upper-cased (DEBUG, INFO, WARNING, ERROR, CRITICAL); INFO by default.
    pub log_level: String,
}

impl StartupOptions {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let log_level = src
            .get(env::LOG_LEVEL)
            .map_or_else(|| "INFO".to_string(), |l| l.trim().to_ascii_uppercase());
        if !matches!(
            log_level.as_str(),
            "DEBUG" | "INFO" | "WARNING" | "ERROR" | "CRITICAL"
        ) {
            return Err(ConfigError(format!(
                "{} must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {log_level:?}",
                env::LOG_LEVEL
            )));
        }
        Ok(Self {
            host: DEFAULT_HOST.into(),
            port: port_from(src)?.unwrap_or(DEFAULT_PORT),
            start_now: src.get(env::START_NOW).is_some_and(|v| truthy(&v)),
            log_level,
        })
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&ProcessEnv)
    }
}

/// The two tokens must differ (`auto` makes a fresh one each, so two `auto`s are fine): a read token equal
/// to the full one would grant everything.
pub fn check_tokens(token: Option<&str>, read_token: Option<&str>) -> Result<(), ConfigError> {
    let auto = |t: &str| t.trim().eq_ignore_ascii_case("auto");
    match (token, read_token) {
        (Some(t), Some(r)) if t == r && !auto(t) => Err(ConfigError(format!(
            "read_token ({}) must differ from token ({}): the read-only token would grant everything",
            env::READ_TOKEN,
            env::TOKEN
        ))),
        _ => Ok(()),
    }
}

impl Config {
    /// The service's configuration: each explicit setting, else its environment variable, else the
    /// default. Every number is range-checked here, where it enters; the message names the culprit.
    #[allow(clippy::too_many_lines)] // one entry per setting, each checked the same way
    pub fn resolve(settings: &Settings, src: &dyn Source) -> Result<Config, ConfigError> {
        let d = Config::default();
        let count = |given: Option<i128>,
                     name: &str,
                     var: &str,
                     min: u64,
                     max: u64,
                     default: usize|
         -> Result<usize, ConfigError> {
            let n = match (given, src.get(var)) {
                (Some(n), _) => check_count(name, n, min, max)?,
                (None, Some(raw)) => parse_count(var, &raw, min, max)?,
                (None, None) => return Ok(default),
            };
            usize::try_from(n).map_err(|_| ConfigError(format!("{name} is too large")))
        };
        let timeout = |given: Option<f64>,
                       name: &str,
                       var: &str,
                       default: Option<Duration>|
         -> Result<Option<Duration>, ConfigError> {
            match (given, src.get(var)) {
                (Some(s), _) => seconds(name, s),
                (None, Some(raw)) => parse_seconds(var, &raw),
                (None, None) => Ok(default),
            }
        };
        let port = match settings.port {
            Some(p) => p,
            None => port_from(src)?.unwrap_or(DEFAULT_PORT),
        };
        let host = settings
            .host
            .clone()
            .filter(|h| !h.trim().is_empty())
            .unwrap_or(d.host);
        let token = settings
            .token
            .clone()
            .or_else(|| src.get(env::TOKEN))
            .filter(|t| !t.is_empty());
        let read_token = settings
            .read_token
            .clone()
            .or_else(|| src.get(env::READ_TOKEN))
            .filter(|t| !t.is_empty());
        check_tokens(token.as_deref(), read_token.as_deref())?;
        Ok(Config {
            host,
            port,
            token,
            read_token,
            max_request_bytes: count(
                settings.max_request_bytes,
                "max_request_bytes",
                env::MAX_REQUEST_BYTES,
                1024,
                1 << 40,
                d.max_request_bytes,
            )?,
            max_connections: count(
                settings.max_connections,
                "max_connections",
                env::MAX_CONNECTIONS,
                1,
                65_536,
                d.max_connections,
            )?,
            queue_capacity: count(
                settings.queue_capacity,
                "queue_capacity",
                env::QUEUE_CAPACITY,
                1,
                1 << 20,
                d.queue_capacity,
            )?,
            max_depth: count(
                settings.max_depth,
                "max_depth",
                env::MAX_DEPTH,
                1,
                10_000,
                d.max_depth,
            )?,
            idle_timeout: timeout(
                settings.idle_timeout,
                "idle_timeout",
                env::IDLE_TIMEOUT,
                d.idle_timeout,
            )?,
            default_timeout: timeout(
                settings.default_timeout,
                "default_timeout",
                env::DEFAULT_TIMEOUT,
                d.default_timeout,
            )?,
            // 0 = no limit: a day is as good as none, and keeps the reader's arithmetic simple.
            request_read_timeout: timeout(
                settings.request_read_timeout,
                "request_read_timeout",
                env::REQUEST_READ_TIMEOUT,
                Some(d.request_read_timeout),
            )?
            .unwrap_or(Duration::from_secs(86_400)),
            persist: crate::persist::Limits {
                max_value_bytes: count(
                    settings.persist_max_value_bytes,
                    "persist_max_value_bytes",
                    env::PERSIST_MAX_VALUE_BYTES,
                    1,
                    1 << 40,
                    d.persist.max_value_bytes,
                )?,
                max_total_bytes: count(
                    settings.persist_max_total_bytes,
                    "persist_max_total_bytes",
                    env::PERSIST_MAX_TOTAL_BYTES,
                    1,
                    1 << 40,
                    d.persist.max_total_bytes,
                )?,
                max_keys: count(
                    settings.persist_max_keys,
                    "persist_max_keys",
                    env::PERSIST_MAX_KEYS,
                    1,
                    1 << 32,
                    d.persist.max_keys,
                )?,
            },
            // 0 = no limit, likewise: a day.
            write_timeout: timeout(
                settings.write_timeout,
                "write_timeout",
                env::WRITE_TIMEOUT,
                Some(d.write_timeout),
            )?
            .unwrap_or(Duration::from_secs(86_400)),
            max_queued_per_connection: count(
                settings.max_queued_per_connection,
                "max_queued_per_connection",
                env::MAX_QUEUED_PER_CONNECTION,
                1,
                1 << 20,
                d.max_queued_per_connection,
            )?,
            max_reply_bytes_in_flight: count(
                settings.max_reply_bytes_in_flight,
                "max_reply_bytes_in_flight",
                env::MAX_REPLY_BYTES_IN_FLIGHT,
                1024,
                1 << 40,
                d.max_reply_bytes_in_flight,
            )?,
            jobs: crate::store::StoreLimits {
                max_jobs: count(
                    settings.max_jobs,
                    "max_jobs",
                    env::MAX_JOBS,
                    1,
                    1 << 20,
                    d.jobs.max_jobs,
                )?,
                max_bytes: count(
                    settings.max_job_result_bytes,
                    "max_job_result_bytes",
                    env::MAX_JOB_RESULT_BYTES,
                    1024,
                    1 << 40,
                    d.jobs.max_bytes,
                )?,
                // 0 = keep until Blender exits (bounded by the counts anyway): a year stands for it.
                ttl: timeout(
                    settings.job_result_ttl,
                    "job_result_ttl",
                    env::JOB_RESULT_TTL,
                    Some(d.jobs.ttl),
                )?
                .unwrap_or(Duration::from_secs(365 * 86_400)),
            },
            ..d
        })
    }

    /// [`Config::resolve`] against the process environment.
    pub fn from_env(settings: &Settings) -> Result<Config, ConfigError> {
        Self::resolve(settings, &ProcessEnv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn explicit_beats_env_beats_default() {
        let env = HashMap::from([(env::PORT, "7000"), (env::MAX_CONNECTIONS, "9")]);
        let c = Config::resolve(&Settings::default(), &env).unwrap();
        assert_eq!((c.port, c.max_connections), (7000, 9));
        let s = Settings {
            port: Some(0),
            max_connections: Some(3),
            ..Settings::default()
        };
        let c = Config::resolve(&s, &env).unwrap();
        assert_eq!((c.port, c.max_connections), (0, 3));
        let c = Config::resolve(&Settings::default(), &HashMap::new()).unwrap();
        assert_eq!((c.port, c.max_connections), (DEFAULT_PORT, 256));
    }

    #[test]
    fn bad_numbers_are_errors_that_name_the_culprit() {
        for (var, raw) in [
            (env::PORT, "70000"),
            (env::PORT, "-1"),
            (env::MAX_CONNECTIONS, "0"),
            (env::IDLE_TIMEOUT, "1e20"),
            (env::IDLE_TIMEOUT, "nan"),
            (env::DEFAULT_TIMEOUT, "-5"),
            (env::MAX_REQUEST_BYTES, "lots"),
            (env::MAX_QUEUED_PER_CONNECTION, "0"),
            (env::MAX_REPLY_BYTES_IN_FLIGHT, "10"),
            (env::WRITE_TIMEOUT, "inf"),
        ] {
            let env = HashMap::from([(var, raw)]);
            let e = Config::resolve(&Settings::default(), &env).unwrap_err();
            assert!(e.0.contains(var), "{e}");
        }
        let s = Settings {
            idle_timeout: Some(f64::INFINITY),
            ..Settings::default()
        };
        assert!(Config::resolve(&s, &HashMap::new())
            .unwrap_err()
            .0
            .contains("idle_timeout"));
    }

    #[test]
    fn extreme_seconds_are_errors_never_panics() {
        let extremes = [
            0.0,
            -0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e20,
            18_446_744_073_709_551_616.0, // 2^64
            f64::MAX,
            MAX_TIMEOUT_SECONDS * 1.000_001,
        ];
        for (i, s) in extremes.into_iter().enumerate() {
            assert!(
                positive_seconds("timeout", s)
                    .unwrap_err()
                    .0
                    .contains("timeout"),
                "{s}"
            );
            // The first two are zeros: a zero wait is fine, a zero timeout is not.
            assert_eq!(non_negative_seconds("wait", s).is_ok(), i < 2, "{s}");
            assert_eq!(seconds("idle_timeout", s).is_ok(), i < 2, "{s}");
        }
        // Positive but below a nanosecond: a zero-length Duration, not a panic.
        assert!(positive_seconds("t", f64::MIN_POSITIVE).is_ok_and(|d| d.is_zero()));
        assert_eq!(non_negative_seconds("wait", 0.0), Ok(Duration::ZERO));
        assert_eq!(positive_seconds("t", 1.5), Ok(Duration::from_millis(1500)));
        assert!(positive_seconds("t", MAX_TIMEOUT_SECONDS).is_ok());
    }

    #[test]
    fn zero_turns_a_timeout_off() {
        let env = HashMap::from([(env::DEFAULT_TIMEOUT, "0"), (env::IDLE_TIMEOUT, "2.5")]);
        let c = Config::resolve(&Settings::default(), &env).unwrap();
        assert_eq!(c.default_timeout, None);
        assert_eq!(c.idle_timeout, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn read_token_from_settings_or_env_and_never_equal_to_token() {
        let env = HashMap::from([(env::READ_TOKEN, "r"), (env::TOKEN, "t")]);
        let c = Config::resolve(&Settings::default(), &env).unwrap();
        assert_eq!(
            (c.token.as_deref(), c.read_token.as_deref()),
            (Some("t"), Some("r"))
        );
        let s = Settings {
            read_token: Some("t".into()),
            ..Settings::default()
        };
        let e = Config::resolve(&s, &env).unwrap_err();
        assert!(e.0.contains("read_token") && e.0.contains("differ"), "{e}");
        let s = Settings {
            token: Some("auto".into()),
            read_token: Some("AUTO".into()),
            ..Settings::default()
        };
        assert!(Config::resolve(&s, &HashMap::new()).is_ok());
    }

    #[test]
    fn startup_options() {
        let env = HashMap::from([(env::START_NOW, "Yes"), (env::LOG_LEVEL, "debug")]);
        let o = StartupOptions::from_source(&env).unwrap();
        assert!(o.start_now && o.log_level == "DEBUG" && o.port == DEFAULT_PORT);
        let env = HashMap::from([(env::LOG_LEVEL, "LOUD")]);
        assert!(StartupOptions::from_source(&env).is_err());
    }
}
