//! Connection slots: what each connection is doing (`Activity`: receiving a request, owing replies, idle
//! since when), so that a listener at `max_connections` can reclaim the oldest idle connection (or else a
//! slow one, whose request has been trickling in for a while) instead of refusing every newcomer. The
//! reader and the writer's sender update a connection's activity; the listener reads it and marks the one
//! it reclaims, under the same lock, so a request that arrives meanwhile is never half served.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Under pressure, a connection whose request has been arriving for this long (with no reply owed) counts
/// as slow and may be reclaimed when no connection is idle.
pub(super) const SLOW_AFTER: Duration = Duration::from_secs(2);

/// What a connection is doing, for reclaiming its slot.
#[derive(Debug)]
pub(super) struct Activity {
    /// Requests read whose reply is not completely written yet (queued, running, or being written).
    owed: AtomicUsize,
    state: Mutex<State>,
    /// Set once by whoever gives the connection's slot back first: the listener when it reclaims the
    /// connection (the newcomer takes the slot at once), else the connection's thread as it ends.
    slot_released: AtomicBool,
}

#[derive(Debug)]
struct State {
    /// The first byte of the request being received, if one is.
    receiving_since: Option<Instant>,
    /// When the connection last became idle (nothing being received, no reply owed).
    idle_since: Instant,
    /// The reader has stopped reading (client closed, error, stop): the slot frees in moments.
    ending: bool,
    /// Reclaimed by the listener: the farewell reply to send before closing.
    reclaimed: Option<String>,
}

/// Why a connection may be reclaimed, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Candidate {
    /// Idle since the instant: preferred, oldest first.
    Idle(Instant),
    /// Receiving one request since the instant, for longer than [`SLOW_AFTER`].
    Slow(Instant),
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            owed: AtomicUsize::new(0),
            state: Mutex::new(State {
                receiving_since: None,
                idle_since: Instant::now(),
                ending: false,
                reclaimed: None,
            }),
            slot_released: AtomicBool::new(false),
        }
    }

    /// Reader: bytes arrived. `Err` holds the farewell when the connection was reclaimed: what arrived
    /// is not served. Until [`Activity::received`], the connection counts as receiving (not idle).
    pub(super) fn reading(&self) -> Result<(), String> {
        let mut s = self.state.lock();
        if let Some(why) = &s.reclaimed {
            return Err(why.clone());
        }
        s.receiving_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Reader: after parsing what arrived: `since` is when the request still being received began.
    pub(super) fn received(&self, since: Option<Instant>) {
        let mut s = self.state.lock();
        s.receiving_since = since;
        if since.is_none() && self.owed.load(Ordering::Acquire) == 0 {
            s.idle_since = Instant::now();
        }
    }

    /// Reader: a complete request was read; its reply is owed.
    pub(super) fn owe(&self) {
        self.owed.fetch_add(1, Ordering::AcqRel);
    }

    /// Writer's sender: a request's reply is completely written.
    pub(super) fn replied(&self) {
        let before = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        if before == 1 {
            let mut s = self.state.lock();
            if s.receiving_since.is_none() {
                s.idle_since = Instant::now();
            }
        }
    }

    /// Reader: no more requests are read.
    pub(super) fn ending(&self) {
        self.state.lock().ending = true;
    }

    /// Ending, and still holding its slot (a reclaimed one gave it back already).
    pub(super) fn is_ending(&self) -> bool {
        self.state.lock().ending && !self.slot_released.load(Ordering::Acquire)
    }

    /// Listener: whether (and why) this connection may be reclaimed now.
    pub(super) fn candidate(&self, now: Instant) -> Option<Candidate> {
        let s = self.state.lock();
        if s.ending || s.reclaimed.is_some() || self.owed.load(Ordering::Acquire) != 0 {
            return None;
        }
        match s.receiving_since {
            None => Some(Candidate::Idle(s.idle_since)),
            Some(since) if now.saturating_duration_since(since) >= SLOW_AFTER => {
                Some(Candidate::Slow(since))
            }
            Some(_) => None,
        }
    }

    /// Listener: reclaim the connection if it is still the candidate it was; `farewell` turns how long
    /// it has been idle (or receiving) into the reply it gets. True when reclaimed.
    pub(super) fn reclaim(
        &self,
        was: Candidate,
        farewell: impl FnOnce(Duration) -> String,
    ) -> bool {
        let now = Instant::now();
        let mut s = self.state.lock();
        let still = !s.ending
            && s.reclaimed.is_none()
            && self.owed.load(Ordering::Acquire) == 0
            && match (was, s.receiving_since) {
                (Candidate::Idle(_), None) => true,
                (Candidate::Slow(a), Some(b)) => a == b,
                _ => false,
            };
        if !still {
            return false;
        }
        let since = s.receiving_since.unwrap_or(s.idle_since);
        s.reclaimed = Some(farewell(now.saturating_duration_since(since)));
        s.ending = true;
        true
    }

    /// True for the first caller only: that one gives the connection's slot back.
    pub(super) fn release_slot(&self) -> bool {
        !self.slot_released.swap(true, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_until_a_request_arrives_and_again_once_its_reply_is_written() {
        let a = Activity::new();
        assert!(matches!(
            a.candidate(Instant::now()),
            Some(Candidate::Idle(_))
        ));
        assert!(a.reading().is_ok());
        assert_eq!(a.candidate(Instant::now()), None, "receiving, not slow yet");
        a.owe();
        a.received(None);
        assert_eq!(a.candidate(Instant::now()), None, "a reply is owed");
        a.replied();
        let Some(c) = a.candidate(Instant::now()) else {
            panic!("idle again")
        };
        assert!(a.reclaim(c, |d| format!("idle for {d:?}")));
        assert!(
            a.reading().is_err_and(|m| m.starts_with("idle for")),
            "a reclaimed connection serves nothing more"
        );
        assert!(a.release_slot());
        assert!(!a.release_slot(), "the slot is given back once");
    }

    #[test]
    fn a_request_arriving_first_wins_over_a_reclaim() {
        let a = Activity::new();
        let Some(c) = a.candidate(Instant::now()) else {
            panic!("idle")
        };
        assert!(a.reading().is_ok());
        assert!(!a.reclaim(c, |_| String::new()));
        let later = Instant::now() + SLOW_AFTER;
        assert!(matches!(a.candidate(later), Some(Candidate::Slow(_))));
    }
}
