//! File descriptors a process inherits by convention: systemd socket
//! activation passes listening sockets as fds 3, 4, ... (`LISTEN_FDS`, for
//! the process `LISTEN_PID` names).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Set once the passed fds have been taken: each may have one owner only.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// How many sockets systemd passed to this process, if it was
/// socket-activated (`LISTEN_PID` is this process and `LISTEN_FDS` >= 1).
pub fn listen_fds() -> Option<i32> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok());
    match (pid_ok, count) {
        (true, Some(count @ 1..)) => Some(count),
        _ => None,
    }
}

/// Takes ownership of the fds systemd passed, marking them close-on-exec:
/// for each, its number and the fd, or `None` if that fd is not open.
/// `None` when the process was not socket-activated, or when they were
/// taken before (only the first call takes them).
pub fn take_listen_fds() -> Option<Vec<(RawFd, Option<OwnedFd>)>> {
    let count = listen_fds()?;
    if TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    let fds = (LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count))
        .map(|fd| (fd, take(fd)))
        .collect();
    Some(fds)
}

/// Takes the inherited fd `fd` (at most once per process, by [`TAKEN`]).
fn take(fd: RawFd) -> Option<OwnedFd> {
    // F_GETFD on a raw number is harmless: it fails with EBADF when closed.
    // SAFETY: nothing is dereferenced; the borrow lasts for this one call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_GETFD).ok()?;
    let _ = fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    // SAFETY: `fd` is open (F_GETFD succeeded) and was passed to this process
    // (LISTEN_PID names it) for it to own: the fds from 3 on are open across
    // exec, so nothing this process opened itself has these numbers, and
    // `TAKEN` lets only one call take them. The `OwnedFd` is the only owner.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
