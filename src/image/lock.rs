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

/// The pid holding a conflicting lock. A classic POSIX lock (UML's) names
/// its process; an OFD lock (another ubd's) has none, so the open files of
/// every process we may look at are searched for it.
fn holder(file: &File, kind: LockKind) -> Option<i32> {
    let mut probe = whole_file(kind);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).ok()?;
    if probe.l_type == libc::F_UNLCK as libc::c_short {
        return None;
    }
    if probe.l_pid > 0 {
        return Some(probe.l_pid);
    }
    let st = nix::sys::stat::fstat(file).ok()?;
    ofd_holder(&lock_id(st.st_dev, st.st_ino))
}

/// How `/proc/locks` and `fdinfo` name a file: device major and minor in
/// hex, and the inode.
fn lock_id(dev: u64, ino: u64) -> String {
    format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    )
}

/// The first process (not this one) with an open file whose `fdinfo` shows
/// an OFD lock on the file `id` names.
fn ofd_holder(id: &str) -> Option<i32> {
    let me = std::process::id() as i32;
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if info.lines().any(|l| is_ofd_lock_on(l, id)) {
                return Some(pid);
            }
        }
    }
    None
}

/// Whether an `fdinfo` line is an OFD lock on the file `id` names, as in
/// `lock:\t1: OFDLCK  ADVISORY  WRITE -1 fd:01:1234 0 EOF`.
fn is_ofd_lock_on(line: &str, id: &str) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else {
        return false;
    };
    let mut words = rest.split_whitespace();
    words.nth(1) == Some("OFDLCK") && words.any(|w| w == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ofd_lock_line_is_matched_by_its_file() {
        let line = "lock:\t1: OFDLCK  ADVISORY  WRITE -1 fd:01:1234 0 EOF";
        assert!(is_ofd_lock_on(line, "fd:01:1234"));
        assert!(!is_ofd_lock_on(line, "fd:01:123"));
        assert!(!is_ofd_lock_on(
            "lock:\t1: POSIX  ADVISORY  WRITE 42 fd:01:1234 0 EOF",
            "fd:01:1234"
        ));
        assert!(!is_ofd_lock_on("pos:\t0", "fd:01:1234"));
        assert_eq!(lock_id(nix::sys::stat::makedev(253, 1), 77), "fd:01:77");
    }

    #[test]
    fn an_ofd_lock_held_by_another_process_names_it() {
        // A child takes an OFD write lock (F_OFD_SETLK is 37); our own
        // process is never named, so the lock must be found in the child's
        // fdinfo.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").expect("write");
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import fcntl, struct, sys, os\n\
                 fd = os.open(sys.argv[1], os.O_RDWR)\n\
                 fcntl.fcntl(fd, 37, struct.pack('hhqqi', fcntl.F_WRLCK, 0, 0, 0, 0))\n\
                 print('locked', flush=True)\n\
                 sys.stdin.read()",
            )
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read");
        assert_eq!(line.trim(), "locked");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let err = lock(&file, &path, LockKind::Exclusive, Duration::ZERO).expect_err("locked");
        drop(child.stdin.take());
        let _ = child.wait();
        match err {
            ImageError::Locked { holder, .. } => assert_eq!(holder, Some(child.id() as i32)),
            other => panic!("expected Locked, got {other:?}"),
        }
    }
}
