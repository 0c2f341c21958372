//! File descriptors a process inherits by convention: systemd socket
//! activation passes listening sockets as fds 3, 4, ... (`LISTEN_FDS`).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Takes ownership of the inherited, open file descriptor `fd` and marks it
/// close-on-exec. `None` if `fd` is not open.
///
/// Call it once per fd, only for fds the process inherited and nothing else
/// in the process owns (the `LISTEN_FDS` convention hands them over).
pub fn take_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    if fd < LISTEN_FDS_START {
        return None;
    }
    // F_GETFD on a raw number is harmless: it fails with EBADF when closed.
    // SAFETY: nothing is dereferenced; the borrow lasts for this one call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_GETFD).ok()?;
    let _ = fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    // SAFETY: `fd` is open (F_GETFD succeeded), and by the caller's contract
    // (socket activation) it was inherited for us to own and nothing else in
    // this process owns or closes it, so the `OwnedFd` is its only owner.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
