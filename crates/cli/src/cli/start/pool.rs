//! `bld-remote start --background --instances N`: the pool supervisor. N headless Blenders, each on its own
//! free port with its own descriptor (and token with `--token auto`). Each one's ready line says
//! `instance=K/N restarts=R`; `bld_remote pool ready: N instances` follows the first time all are up.
//!
//! - An instance that dies before its first ready line fails the whole start (a bad scene or Blender would
//!   fail them all): the others are stopped and the status is that Blender's.
//! - One that dies later is restarted on the same port, up to `--max-restarts` times, with a new ready line;
//!   its descriptor is removed first (a SIGKILL leaves it behind). Past that it stays down; when every
//!   instance is down the command exits 1.
//! - A stop signal (or the parent's exit with `--stop-with-parent`) stops all of them gracefully; a second
//!   one, or 30 s, kills them. Exit status 0 when each one exited cleanly.
//!
//! Runs on the main thread, which spawns every Blender (see `blender::stop_with_spawner`); each Blender's
//! stdout has one relay thread, joined when that Blender has exited.

use std::path::Path;
use std::process::Child;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bld_remote_core::config::positive_seconds;

use super::super::{errln, outln, Host, EXIT_FAILURE};
use super::{blender_command, exit_code, parent_gone, port_busy, relay, request_stop, Relay};
use crate::cli::args::StartArgs;
use crate::instances;

/// How long a stop may take before the remaining Blenders are killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

#[allow(clippy::struct_excessive_bools)] // independent facts about one Blender's life
struct Slot {
    /// 1-based, stable across restarts.
    k: usize,
    /// 0 until its first ready line; then kept for every restart.
    port: u16,
    child: Option<Child>,
    pid: u32,
    relay: Option<JoinHandle<()>>,
    /// The current Blender's service, once ready.
    ready: Option<(String, u16, u32)>,
    ever_ready: bool,
    restarts: u32,
    spawned: Instant,
    /// Killed by us for not becoming ready in time.
    timed_out: bool,
    /// Left down (restarts used up, or its port taken).
    down: bool,
    /// Exit status during a stop.
    stop_rc: Option<i32>,
    /// The stop reached it as SIGTERM (it was not serving yet): dying of that signal is a clean stop.
    terminated: bool,
}

/// Remove every descriptor that names `pid` (a Blender that was killed could not remove its own).
fn remove_descriptors_of(pid: u32) {
    for (path, d) in instances::all() {
        if d.is_ok_and(|d| d.pid == pid) {
            instances::remove(&path);
        }
    }
}

struct Pool<'a> {
    a: &'a StartArgs,
    n: usize,
    blender_path: &'a Path,
    package_dir: &'a Path,
    tx: mpsc::Sender<(usize, Relay)>,
}

impl Pool<'_> {
    fn spawn(&self, slot: &mut Slot) -> Result<(), String> {
        let mut cmd = blender_command(self.a, self.blender_path, self.package_dir, slot.port);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.blender_path.display()))?;
        let tx = self.tx.clone();
        let tag = (slot.k, self.n, slot.restarts);
        slot.relay = child.stdout.take().and_then(|stdout| {
            std::thread::Builder::new()
                .name(format!("bld-remote-relay-{}", slot.k))
                .spawn(move || relay(stdout, tx, Some(tag)))
                .ok()
        });
        slot.pid = child.id();
        slot.child = Some(child);
        slot.ready = None;
        slot.timed_out = false;
        slot.spawned = Instant::now();
        Ok(())
    }

    /// A Blender of `slot` exited on its own (not during a stop): restart it on its port, or leave it down.
    fn restart_or_leave(&self, slot: &mut Slot, rc: i32) {
        let how = if slot.timed_out {
            "did not become ready in time".to_string()
        } else {
            format!("exited (status {rc})")
        };
        let max = self.a.max_restarts;
        if slot.restarts >= max {
            errln(&format!(
                "instance {}/{} (pid {}, port {}) {how}; left down: it was restarted {} times already \
                 (--max-restarts {max})",
                slot.k, self.n, slot.pid, slot.port, slot.restarts
            ));
            slot.down = true;
            return;
        }
        if let Some(why) = port_busy(&self.a.host, slot.port) {
            errln(&format!(
                "instance {}/{} (pid {}) {how}; left down: it cannot restart on its port: {why}",
                slot.k, self.n, slot.pid
            ));
            slot.down = true;
            return;
        }
        slot.restarts += 1;
        errln(&format!(
            "instance {}/{} (pid {}, port {}) {how}: restarting it on port {} (restart {} of {max})",
            slot.k, self.n, slot.pid, slot.port, slot.port, slot.restarts
        ));
        if let Err(e) = self.spawn(slot) {
            errln(&format!("instance {}/{}: {e}; left down", slot.k, self.n));
            slot.down = true;
        }
    }
}

/// Ask every running Blender to stop (through its service when it is up, else SIGTERM).
fn stop_all(slots: &mut [Slot], a: &StartArgs, host: &Host<'_>) {
    for s in slots {
        if s.child.is_some() {
            s.terminated = !request_stop(s.pid, s.ready.as_ref(), a, host);
        }
    }
}

fn kill_all(slots: &mut [Slot]) {
    for s in slots {
        if let Some(c) = s.child.as_mut() {
            let _ = c.kill();
        }
    }
}

#[allow(clippy::too_many_lines)] // one loop: reap, restart, stop; each branch short
pub(in crate::cli) fn start_pool(
    a: &StartArgs,
    n: usize,
    blender_path: &Path,
    package_dir: &Path,
    host: &Host<'_>,
) -> i32 {
    // Checked in `start` (a usage error there); the fallback is never reached.
    let ready_timeout =
        positive_seconds("--ready-timeout", a.ready_timeout).unwrap_or(Duration::from_secs(120));
    let (tx, rx) = mpsc::channel();
    let pool = Pool {
        a,
        n,
        blender_path,
        package_dir,
        tx,
    };
    let mut slots: Vec<Slot> = (1..=n)
        .map(|k| Slot {
            k,
            port: 0,
            child: None,
            pid: 0,
            relay: None,
            ready: None,
            ever_ready: false,
            restarts: 0,
            spawned: Instant::now(),
            timed_out: false,
            down: false,
            stop_rc: None,
            terminated: false,
        })
        .collect();
    // A fatal start failure: its exit status.
    let mut failed: Option<i32> = None;
    let mut stopping: Option<Instant> = None;
    for s in &mut slots {
        if let Err(e) = pool.spawn(s) {
            errln(&e);
            failed = Some(EXIT_FAILURE);
            break;
        }
    }
    if failed.is_some() {
        stop_all(&mut slots, a, host);
        stopping = Some(Instant::now() + STOP_GRACE);
    }
    let mut announced = false;
    let mut stop_now = false;
    loop {
        if let Ok((i, Relay::Ready { host: h, port, pid })) =
            rx.recv_timeout(Duration::from_millis(100))
        {
            if let Some(s) = slots.get_mut(i) {
                if s.pid == pid {
                    s.port = port;
                    s.ready = Some((h, port, pid));
                    s.ever_ready = true;
                }
            }
            if !announced && slots.iter().all(|s| s.ready.is_some()) {
                announced = true;
                let ports: Vec<String> = slots.iter().map(|s| s.port.to_string()).collect();
                outln(&format!(
                    "bld_remote pool ready: {n} instances (ports {})",
                    ports.join(",")
                ));
            }
        }
        // Reap.
        for s in &mut slots {
            let status = match s.child.as_mut().map(Child::try_wait) {
                None | Some(Ok(None)) => continue,
                Some(Ok(Some(status))) => exit_code(status),
                Some(Err(e)) => {
                    errln(&format!("cannot wait for instance {}: {e}", s.k));
                    if let Some(c) = s.child.as_mut() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    EXIT_FAILURE
                }
            };
            s.child = None;
            s.ready = None;
            if let Some(t) = s.relay.take() {
                let _ = t.join();
            }
            remove_descriptors_of(s.pid);
            if stopping.is_some() {
                let by_our_sigterm = s.terminated && status == 128 + libc::SIGTERM;
                s.stop_rc = Some(if by_our_sigterm { 0 } else { status });
            } else if !s.ever_ready {
                let how = if s.timed_out {
                    format!(
                        "did not become ready within {:.0} s",
                        ready_timeout.as_secs_f64()
                    )
                } else {
                    format!("exited (status {status}) before its service was ready")
                };
                errln(&format!(
                    "instance {}/{n} {how}; its messages are above. Stopping the others",
                    s.k
                ));
                failed = Some(if status == 0 || s.timed_out {
                    EXIT_FAILURE
                } else {
                    status
                });
                stopping = Some(Instant::now() + STOP_GRACE);
                stop_now = true;
            } else {
                pool.restart_or_leave(s, status);
            }
        }
        if stop_now {
            stop_now = false;
            stop_all(&mut slots, a, host);
        }
        // Not ready in time: kill it (reaped above next time round, then restarted or fatal).
        for s in &mut slots {
            if s.ready.is_none() && !s.timed_out && s.spawned.elapsed() > ready_timeout {
                if let Some(c) = s.child.as_mut() {
                    s.timed_out = true;
                    let _ = c.kill();
                }
            }
        }
        if (host.interrupted)() || parent_gone(a) {
            if stopping.is_some() {
                errln("second interrupt: killing every instance");
                kill_all(&mut slots);
            } else {
                stopping = Some(Instant::now() + STOP_GRACE);
                stop_all(&mut slots, a, host);
            }
        }
        if stopping.is_some_and(|t| Instant::now() > t) {
            errln("instances still running 30 s after the stop request: killing them");
            kill_all(&mut slots);
            stopping = Some(Instant::now() + Duration::from_secs(3600));
        }
        let running = slots.iter().any(|s| s.child.is_some());
        if !running && (stopping.is_some() || slots.iter().all(|s| s.down)) {
            break;
        }
    }
    for s in &mut slots {
        if let Some(t) = s.relay.take() {
            let _ = t.join();
        }
        remove_descriptors_of(s.pid);
    }
    if let Some(rc) = failed {
        return rc;
    }
    if slots.iter().all(|s| s.down) && stopping.is_none() {
        errln(&format!("all {n} instances are down"));
        return EXIT_FAILURE;
    }
    slots
        .iter()
        .filter_map(|s| s.stop_rc)
        .find(|rc| *rc != 0)
        .unwrap_or(0)
}
