//! Keeps sockets off file descriptors 0, 1 and 2. Client code may close stdout or stderr (`os.close(2)`);
//! the next socket accepted would then get that number, and everything Blender (or a C library) writes to
//! "stderr" would land inside another client's protocol stream. Called by the listener (`accept`) for every
//! accepted connection, on the `bld_remote-listener` thread.

use std::net::TcpStream;

/// Return `stream` on a descriptor above 2, with each of 0, 1 and 2 open (on /dev/null if it was closed).
/// Never fails: if a duplicate cannot be made, the stream is returned as it is.
#[cfg(unix)]
#[allow(unsafe_code)]
pub(super) fn off_std_fds(stream: TcpStream) -> TcpStream {
    use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
    reopen_std_fds();
    let fd: RawFd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    if fd > 2 {
        return stream;
    }
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd we own: a new fd >= 3 for the same socket, close-on-exec.
    let moved = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if moved < 0 {
        return stream;
    }
    // The low number now holds /dev/null instead of the socket (dup2 swaps it in one step, so no other
    // thread can be handed that number in between). `into_raw_fd`: the old number is not ours any more.
    let low = stream.into_raw_fd();
    if !dup_dev_null_onto(low) {
        // SAFETY: `low` is ours (taken out of the stream above) and closed once.
        unsafe { libc::close(low) };
    }
    reopen_std_fds();
    // SAFETY: `moved` is a fresh fd from fcntl above that nothing else owns.
    unsafe { TcpStream::from_raw_fd(moved) }
}

#[cfg(not(unix))]
pub(super) fn off_std_fds(stream: TcpStream) -> TcpStream {
    stream
}

/// Open /dev/null on each of 0, 1 and 2 that is closed (lowest first, so `open` takes exactly that number).
#[cfg(unix)]
#[allow(unsafe_code)]
fn reopen_std_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only reads the descriptor's flags; EBADF means it is closed.
        let closed = unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0;
        if closed && !dup_dev_null_onto(fd) {
            return;
        }
    }
}

/// Make `target` a descriptor of /dev/null (read-write, inherited by children as 0–2 should be).
#[cfg(unix)]
#[allow(unsafe_code)]
fn dup_dev_null_onto(target: libc::c_int) -> bool {
    // SAFETY: open/dup2/close on a NUL-terminated literal path and on fds this function owns; `target` is
    // either closed or ours to replace (the caller says which).
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 {
            return false;
        }
        if null == target {
            // Landed on the number wanted (it was the lowest closed one): keep it, inheritable.
            return libc::fcntl(null, libc::F_SETFD, 0) == 0;
        }
        let ok = libc::dup2(null, target) == target;
        libc::close(null);
        ok
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_stream_above_2_is_left_alone() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = s.as_raw_fd();
        assert!(fd > 2);
        assert_eq!(off_std_fds(s).as_raw_fd(), fd);
    }
}

/// Whether the client has closed its side of `stream` (a FIN is waiting to be read), without reading and
/// without changing the socket's flags (which its reader shares): `recv` with `MSG_PEEK | MSG_DONTWAIT`.
/// The listener uses it at the connection limit: such a connection is ending, and its slot is about to
/// be free, however long its reader takes to notice.
#[cfg(unix)]
#[allow(unsafe_code)]
pub(super) fn peer_closed(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    // SAFETY: a valid socket fd for the lifetime of `stream`, and a 1-byte buffer we own.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

#[cfg(not(unix))]
pub(super) fn peer_closed(_stream: &TcpStream) -> bool {
    false
}
