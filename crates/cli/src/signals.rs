//! SIGINT, SIGTERM and SIGHUP set one flag that every wait of the command polls (at least every 100 ms),
//! so that `bld-remote start` shuts Blender down gracefully on any of them. A signal that was ignored when
//! the command started (`nohup`, a shell's `&`) stays ignored, as Python's own start-up does.
//! Runs on the main thread at start-up; the handlers only store to an atomic (signal-safe).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Counts stop signals as Python's `check_signals` does: asking consumes what arrived, so a supervisor
/// that saw one signal can tell a second one apart.
#[derive(Clone, Default)]
pub struct Interrupted(Arc<AtomicBool>);

impl Interrupted {
    /// Install the handlers. A signal whose handler cannot be installed keeps its default action
    /// (it then ends the command at once, as it would without us).
    pub fn install() -> Self {
        let flag = Interrupted::default();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            if !inherited_ignore(sig) {
                let _ = signal_hook::flag::register(sig, Arc::clone(&flag.0));
            }
        }
        flag
    }

    /// Whether a signal arrived since the last call.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

/// Whether `sig` is ignored in this process right now (inherited from the parent).
#[allow(unsafe_code)]
fn inherited_ignore(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current disposition into `old`, a zeroed
    // plain-data struct that lives for the call.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &raw mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Send SIGTERM to `pid`; false when that failed (no such process, not ours).
#[allow(unsafe_code)]
pub fn terminate(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) takes plain integers and has no memory effects on this process.
    unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
}
