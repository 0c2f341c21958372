//! OFD record locks on image files.
//!
//! UML takes POSIX `fcntl` record locks (a write lock on the COW file when
//! writable, a read lock on the backing file); OFD locks conflict with those, so
//! `ubd` and UML exclude each other. `flock()` would not.

use std::fs::File;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};

use super::ImageError;

/// Shared (read) or exclusive (write) lock on the whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
}

fn whole_file(kind: LockKind) -> libc::flock {
    let l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    };
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Takes an OFD lock of `kind` on all of `file`, retrying for up to `wait`
/// (a process killed while using io_uring releases its locks a little after it
/// is gone). The lock lasts as long as this open file description. If it stays
/// taken, the error names the holder when the kernel reports one.
pub fn lock(file: &File, path: &Path, kind: LockKind, wait: Duration) -> Result<(), ImageError> {
    let deadline = Instant::now() + wait;
    loop {
        let request = whole_file(kind);
        match fcntl(file, FcntlArg::F_OFD_SETLK(&request)) {
            Ok(_) => return Ok(()),
            Err(Errno::EAGAIN | Errno::EACCES) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(Errno::EAGAIN | Errno::EACCES) => {
                return Err(ImageError::Locked {
                    path: path.to_path_buf(),
                    holder: holder(file, kind),
                });
            }
            Err(errno) => {
                return Err(ImageError::Io {
                    path: path.to_path_buf(),
                    op: "cannot lock",
                    source: errno.into(),
                });
            }
        }
    }
}

/// The pid holding a conflicting lock, when it is a classic POSIX lock (UML's);
/// OFD locks have no owning process and report none.
fn holder(file: &File, kind: LockKind) -> Option<i32> {
    let mut probe = whole_file(kind);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).ok()?;
    (probe.l_type != libc::F_UNLCK as libc::c_short && probe.l_pid > 0).then_some(probe.l_pid)
}
