//! `SignalForwarder`: lets Python's signal handlers run while the headless pump blocks in Rust.
//!
//! Python runs signal handlers only between bytecodes, so a thread blocked in Rust would never see SIGTERM.
//! The pump (`pump::serve_forever`, Blender's main thread) makes a socket pair and has Python install its
//! write end with `signal.set_wakeup_fd`; the C-level signal handler writes a byte there, and this module's
//! thread (`bld_remote-signals`, no GIL ever) turns it into a pump wake-up. The thread is joined in `close`.

use std::sync::Arc;

use pyo3::prelude::*;

use bld_remote_core::server::Shared;

/// Turns bytes written by Python's signal wake-up fd into pump wake-ups (Unix).
pub struct SignalForwarder {
    #[cfg(unix)]
    inner: Option<(
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
        std::thread::JoinHandle<()>,
    )>,
}

impl SignalForwarder {
    #[cfg(unix)]
    pub fn start(py: Python<'_>, install: Option<&Bound<'_, PyAny>>, shared: &Arc<Shared>) -> Self {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let none = Self { inner: None };
        let Some(install) = install else { return none };
        let Ok((mut reader, writer)) = std::os::unix::net::UnixStream::pair() else {
            return none;
        };
        // set_wakeup_fd wants a non-blocking fd: a signal must never block on a full buffer.
        if writer.set_nonblocking(true).is_err() {
            return none;
        }
        let Ok(keep_reader) = reader.try_clone() else {
            return none;
        };
        let s = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("bld_remote-signals".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => s.wake_pump(),
                    }
                }
            });
        let Ok(handle) = spawned else { return none };
        let forwarder = Self {
            inner: Some((keep_reader, writer, handle)),
        };
        let fd = forwarder
            .inner
            .as_ref()
            .map_or(-1, |(_, w, _)| w.as_raw_fd());
        if install.call1((fd,)).is_err() {
            // Not the main thread, or no signal module: fall back to polling.
            forwarder.close(py, None);
            return Self { inner: None };
        }
        forwarder
    }

    #[cfg(not(unix))]
    pub fn start(
        _py: Python<'_>,
        _install: Option<&Bound<'_, PyAny>>,
        _shared: &Arc<Shared>,
    ) -> Self {
        Self {}
    }

    pub fn is_active(&self) -> bool {
        #[cfg(unix)]
        {
            self.inner.is_some()
        }
        #[cfg(not(unix))]
        {
            false
        }
    }

    /// Uninstall (before the fd closes), end the forwarder's blocking read, and join it.
    pub fn close(mut self, py: Python<'_>, install: Option<&Bound<'_, PyAny>>) {
        #[cfg(unix)]
        if let Some((reader, writer, handle)) = self.inner.take() {
            if let Some(install) = install {
                let _ = install.call1((-1,));
            }
            let _ = reader.shutdown(std::net::Shutdown::Both);
            py.detach(|| {
                let _ = handle.join();
            });
            drop(writer);
        }
        #[cfg(not(unix))]
        let _ = (py, install, &mut self);
    }
}
