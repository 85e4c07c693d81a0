//! `SignalGuard`: SIGTERM and SIGINT stop the headless pump (`keep_alive()`), whatever client code does to
//! Python's signal machinery.
//!
//! Python's own route (a Python handler plus `signal.set_wakeup_fd`) is owned by Python code, so client code
//! can switch it off without meaning to: an asyncio loop's `close()` resets the wake-up fd and puts back
//! `SIG_DFL`, and `signal.signal` replaces the handler. So the pump does not use it. While `serve_forever`
//! runs, a native handler (sigaction, async-signal-safe: an atomic store and a `write(2)`) records the signal
//! and writes a byte into a socket pair that Rust owns; this module's thread (`bld_remote-signals`, never the
//! GIL) turns the byte into a pump wake-up. After every job and every wake-up the pump calls `reassert`,
//! which puts the native handler back if a job replaced it (a Python handler, `SIG_DFL`), and leaves a
//! `SIG_IGN` alone: ignoring a signal on purpose is respected (and logged). A second signal while the pump
//! still runs gets the signal's default action at once (SIGTERM: killed, rc 143), for a job that never ends.
//!
//! Log lines go to Blender's own stderr: fd 2 duplicated when the guard is installed, so neither a job's
//! `sys.stderr` (`execute_code`'s capture) nor a job closing fd 2 can swallow or misroute them.
//!
//! `install`, `reassert`, `take_received` and `close` run on the pump's thread (Blender's main thread); the
//! handler on whichever thread the kernel picks. The previous dispositions are restored in `close`, and the
//! forwarder thread is joined there.

#![allow(unsafe_code)]

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::thread::JoinHandle;

use pyo3::prelude::*;

/// The signals `keep_alive()` stops on.
const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// The write end of the guard's socket pair (-1: none). Read by the handler.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The first stop signal not yet taken by the pump (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// Stop signals since the guard was installed: from the second on, the default action.
static COUNT: AtomicU32 = AtomicU32::new(0);
/// Blender's stderr as it was when the guard was installed (a duplicate; -1: none).
static LOG_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let saved = errno();
    if COUNT.fetch_add(1, Ordering::SeqCst) >= 1 {
        // A second signal: the pump has not managed to stop (a job that never ends). Do what the signal
        // would have done without us. SAFETY: sigaction, sigemptyset and raise are async-signal-safe; `dfl`
        // is a zeroed plain-data struct that lives for the call. The raised signal is blocked while this
        // handler runs and is delivered, with its default action, as it returns.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&raw mut dfl.sa_mask);
            libc::sigaction(sig, &raw const dfl, std::ptr::null_mut());
            libc::raise(sig);
        }
    } else {
        let _ = RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
        let fd = WAKE_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            let byte = 1u8;
            // SAFETY: write(2) is async-signal-safe; the buffer is one byte on this stack. The fd is
            // non-blocking, so a full buffer (signals already pending) only drops the byte.
            unsafe {
                libc::write(fd, (&raw const byte).cast(), 1);
            }
        }
    }
    set_errno(saved);
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn errno_location() -> *mut libc::c_int {
    // SAFETY: returns this thread's errno slot; no preconditions.
    unsafe { libc::__errno_location() }
}

#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
fn errno_location() -> *mut libc::c_int {
    // SAFETY: returns this thread's errno slot; no preconditions.
    unsafe { libc::__error() }
}

/// A signal handler must leave `errno` as it found it (the interrupted code may be about to read it).
fn errno() -> libc::c_int {
    // SAFETY: the slot is this thread's and valid for the thread's life.
    unsafe { *errno_location() }
}

fn set_errno(v: libc::c_int) {
    // SAFETY: as in `errno`.
    unsafe { *errno_location() = v }
}

/// The current disposition of `sig` (None if it cannot be read).
fn current(sig: libc::c_int) -> Option<libc::sigaction> {
    // SAFETY: a null new action only reads the disposition into `old`, a zeroed plain-data struct.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        (libc::sigaction(sig, std::ptr::null(), &raw mut old) == 0).then_some(old)
    }
}

fn handler_address() -> libc::sighandler_t {
    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t
}

/// Install the native handler for `sig`; returns the disposition it replaced.
fn install_handler(sig: libc::c_int) -> Option<libc::sigaction> {
    // SAFETY: `new` and `old` are zeroed plain-data structs living for the call; the handler only does
    // async-signal-safe work. SA_RESTART: interrupted reads and writes elsewhere in Blender resume.
    unsafe {
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = handler_address();
        new.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut new.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        (libc::sigaction(sig, &raw const new, &raw mut old) == 0).then_some(old)
    }
}

fn restore(sig: libc::c_int, previous: &libc::sigaction) {
    // SAFETY: `previous` was read by sigaction for this signal; restoring it is what it was made for.
    unsafe {
        libc::sigaction(sig, std::ptr::from_ref(previous), std::ptr::null_mut());
    }
}

fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

/// One line on Blender's own stderr (the duplicate taken at install), honouring `BLD_REMOTE_LOG_LEVEL`.
pub fn log(level: &str, message: &str) {
    let rank = |l: &str| match l {
        "DEBUG" => 10,
        "WARNING" => 30,
        "ERROR" => 40,
        "CRITICAL" => 50,
        _ => 20,
    };
    let wanted = bld_remote_core::config::StartupOptions::from_env()
        .map_or(20, |o| rank(o.log_level.as_str()));
    if rank(level) < wanted {
        return;
    }
    let fd = LOG_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    let line = format!("bld_remote [{level}] {message}\n");
    // SAFETY: write(2) on our own duplicate of stderr, from a buffer that lives for the call. One write, so
    // the line is not interleaved with Blender's own output.
    unsafe {
        libc::write(fd, line.as_ptr().cast(), line.len());
    }
}

/// What a stop signal's disposition is now, as the pump sees it.
enum Disposition {
    Ours,
    Ignored,
    Other,
}

fn disposition(sig: libc::c_int) -> Disposition {
    match current(sig) {
        Some(a) if a.sa_sigaction == handler_address() => Disposition::Ours,
        Some(a) if a.sa_sigaction == libc::SIG_IGN => Disposition::Ignored,
        _ => Disposition::Other,
    }
}

/// What the installed guard took over: each stop signal with the disposition it had before (None: it was
/// ignored then, and stays so), and the signals `reassert` found ignored (logged once each). Static, so
/// that the pump can reassert at the end of every job, before its reply leaves (`reassert`).
struct Taken {
    previous: Vec<(libc::c_int, Option<libc::sigaction>)>,
    ignored_logged: Vec<libc::c_int>,
}

static TAKEN: parking_lot::Mutex<Option<Taken>> = parking_lot::Mutex::new(None);

/// Owns SIGTERM and SIGINT while the headless pump runs (see the module docs).
pub struct SignalGuard {
    forwarder: Option<(UnixStream, UnixStream, JoinHandle<()>)>,
}

impl SignalGuard {
    /// Install the native handlers and the forwarder that turns a signal into `wake()`. A signal ignored
    /// when the pump starts (`nohup`, a non-interactive shell's `&`) stays ignored. Returns None when the
    /// socket pair or the thread cannot be made (the pump then polls: see `pump::serve_forever`).
    pub fn install(wake: impl Fn() + Send + 'static) -> Option<Self> {
        let (mut reader, writer) = UnixStream::pair().ok()?;
        // A signal handler must never block on a full buffer.
        writer.set_nonblocking(true).ok()?;
        let keep_reader = reader.try_clone().ok()?;
        let handle = std::thread::Builder::new()
            .name("bld_remote-signals".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => wake(),
                    }
                }
            })
            .ok()?;
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) duplicates fd 2 (if open) to a new fd >= 3; plain integers.
        let log_fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
        let old_log = LOG_FD.swap(log_fd, Ordering::SeqCst);
        close_fd(old_log);
        RECEIVED.store(0, Ordering::SeqCst);
        COUNT.store(0, Ordering::SeqCst);
        WAKE_FD.store(writer.as_raw_fd(), Ordering::SeqCst);
        let mut previous = Vec::new();
        for sig in STOP_SIGNALS {
            if matches!(disposition(sig), Disposition::Ignored) {
                previous.push((sig, None));
            } else if let Some(old) = install_handler(sig) {
                previous.push((sig, Some(old)));
            }
        }
        *TAKEN.lock() = Some(Taken {
            previous,
            ignored_logged: Vec::new(),
        });
        Some(Self {
            forwarder: Some((keep_reader, writer, handle)),
        })
    }

    /// The stop signal that arrived since the last call, if any (its log line written). A method, though
    /// the state is static: only the guard's owner, the pump, may take it.
    #[allow(clippy::unused_self)]
    pub fn take_received(&self) -> Option<libc::c_int> {
        let sig = RECEIVED.swap(0, Ordering::SeqCst);
        (sig != 0).then(|| {
            log("INFO", &format!("received {}: stopping", name(sig)));
            sig
        })
    }

    /// Restore the dispositions found at install (where the signal is still ours), end and join the
    /// forwarder, and close the fds.
    pub fn close(mut self, py: Python<'_>) {
        let taken = TAKEN.lock().take();
        for (sig, previous) in taken.map(|t| t.previous).unwrap_or_default() {
            if let Some(previous) = previous {
                if matches!(disposition(sig), Disposition::Ours) {
                    restore(sig, &previous);
                }
            }
        }
        WAKE_FD.store(-1, Ordering::SeqCst);
        if let Some((reader, writer, handle)) = self.forwarder.take() {
            let _ = reader.shutdown(std::net::Shutdown::Both);
            py.detach(|| {
                let _ = handle.join();
            });
            drop(writer);
        }
        close_fd(LOG_FD.swap(-1, Ordering::SeqCst));
    }
}

/// Put the native handler back where a job replaced it; leave a deliberate `SIG_IGN` alone. Does nothing
/// unless a guard is installed. The pump calls it after every job, before the job's reply is handed over:
/// a client that sends SIGTERM the moment it has its reply must find the handler back in place.
pub fn reassert() {
    let mut taken = TAKEN.lock();
    let Some(Taken {
        previous,
        ignored_logged,
    }) = taken.as_mut()
    else {
        return;
    };
    for &(sig, ref previous) in previous.iter() {
        if previous.is_none() {
            continue; // ignored before the pump started: not ours to take
        }
        match disposition(sig) {
            Disposition::Ours => {}
            Disposition::Ignored => {
                if !ignored_logged.contains(&sig) {
                    ignored_logged.push(sig);
                    log(
                        "WARNING",
                        &format!(
                            "{} is ignored now (set by code in a request): keep_alive() will not stop on \
                             it; use server_shutdown, stop_mcp_service() or the other signal",
                            name(sig)
                        ),
                    );
                }
            }
            Disposition::Other => {
                if install_handler(sig).is_some() {
                    ignored_logged.retain(|&s| s != sig);
                    log(
                        "WARNING",
                        &format!(
                            "code in a request replaced the {} handler; keep_alive() took it back",
                            name(sig)
                        ),
                    );
                }
            }
        }
    }
}

fn close_fd(fd: libc::c_int) {
    if fd >= 0 {
        // SAFETY: `fd` is our own duplicate, closed once (it was swapped out of LOG_FD).
        unsafe {
            libc::close(fd);
        }
    }
}
