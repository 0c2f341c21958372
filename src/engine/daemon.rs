//! `ubd serve --fork`: the server goes on in a child process, and the
//! command returns once the child serves, or with the child's status when it
//! failed first (as `qemu-nbd --fork` does).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, dup2_stderr, dup2_stdin, dup2_stdout, fork, pipe2, setsid};

/// Which side of the fork this is.
pub enum Forked {
    /// The command's own process: exit with this status.
    Parent(i32),
    /// The server: call [`Ready::serving`] once clients can connect.
    Child(Ready),
}

/// The child's way to tell the parent it serves.
pub struct Ready(OwnedFd);

/// Forks. The parent blocks until the child says it serves (status 0) or
/// ends without saying so (the child's exit status, at least 1). Refused
/// when the process runs more than one thread: a child would have only the
/// thread that forked, and locks the others held would stay held.
pub fn fork_when_ready() -> io::Result<Forked> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork: {threads} threads are running"
        )));
    }
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: the process runs one thread (checked above, and nothing
    // between the check and here starts one), so the child is a complete
    // copy of it: no lock is held by a thread that does not exist there, and
    // it may run any code, not only async-signal-safe functions.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut byte = [0u8; 1];
            if matches!(File::from(read_end).read(&mut byte), Ok(1)) {
                return Ok(Forked::Parent(0));
            }
            // The pipe closed unwritten: the child failed (and said why on
            // stderr) or died.
            let code = match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => code.max(1),
                _ => 1,
            };
            Ok(Forked::Parent(code))
        }
        ForkResult::Child => {
            drop(read_end);
            // Its own session: the terminal's hang-up or ^C is not for it.
            let _ = setsid();
            Ok(Forked::Child(Ready(write_end)))
        }
    }
}

impl Ready {
    /// Detaches from the command's terminal or pipes (stdin, stdout and
    /// stderr become /dev/null, so a caller reading them to the end is not
    /// held up by the server) and lets the parent exit 0.
    pub fn serving(self) -> io::Result<()> {
        let null = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        dup2_stdin(&null)?;
        dup2_stdout(&null)?;
        dup2_stderr(&null)?;
        File::from(self.0).write_all(&[0])
    }
}
