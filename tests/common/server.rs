//! Runs `ubd serve` for a test: start it on a Unix socket, wait until it
//! accepts connections, hand out its NBD URI, and stop it with SIGTERM.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{command_line, ubd};

/// A running `ubd serve`. Dropping it kills the server (SIGKILL) if a test
/// did not [`Server::stop`] it.
pub struct Server {
    child: Option<Child>,
    socket: PathBuf,
    command: String,
}

impl Server {
    /// Starts `ubd serve ARGS... --socket SOCKET` and waits (up to 20 s) until
    /// the socket accepts a connection. Panics with the server's stderr if it
    /// exits first.
    pub fn start<S: AsRef<std::ffi::OsStr>>(socket: &Path, args: &[S]) -> Server {
        Server::start_wrapped::<&str, S>(&[], socket, args)
    }

    /// Like [`Server::start`], run by `wrapper` (for example `prlimit
    /// --data=N`), which must exec the server so that its pid is the
    /// server's.
    pub fn start_wrapped<W: AsRef<std::ffi::OsStr>, S: AsRef<std::ffi::OsStr>>(
        wrapper: &[W],
        socket: &Path,
        args: &[S],
    ) -> Server {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = std::process::Command::new(program);
                cmd.args(rest).arg(super::ubd_bin());
                cmd
            }
            None => ubd(),
        };
        cmd.arg("serve")
            .args(args)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let command = command_line(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        let mut server = Server {
            child: Some(child),
            socket: socket.to_path_buf(),
            command,
        };
        server.wait_ready(Duration::from_secs(20));
        server
    }

    fn wait_ready(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            let child = self.child.as_mut().expect("server running");
            if let Ok(Some(status)) = child.try_wait() {
                let stderr = self.take_stderr();
                panic!(
                    "{} exited with {status} before serving\nstderr:\n{stderr}",
                    self.command
                );
            }
            assert!(
                start.elapsed() < limit,
                "{} did not accept connections within {limit:?}",
                self.command
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn take_stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(err) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = err.read_to_string(&mut s);
        }
        s
    }

    /// The server's socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `nbd+unix:///?socket=PATH` for the default export.
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Sends SIGTERM and waits (up to 30 s) for the server to exit. Returns
    /// its exit status and stderr.
    pub fn stop(mut self) -> (ExitStatus, String) {
        signal(self.pid(), "TERM");
        let status = self.wait(Duration::from_secs(30));
        (status, self.take_stderr())
    }

    /// Waits for the server to exit on its own (up to `limit`).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server running");
        super::waited(child, &self.command, limit)
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `ubd serve ARGS... --socket SOCKET` that must refuse to start: it
/// has to exit within 10 s without ever accepting a connection. Returns its
/// exit code (`None` if killed by a signal) and its stderr.
pub fn serve_refused<S: AsRef<std::ffi::OsStr>>(
    socket: &Path,
    args: &[S],
) -> (Option<i32>, String) {
    let mut cmd = ubd();
    cmd.arg("serve")
        .args(args)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let command = command_line(&cmd);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if UnixStream::connect(socket).is_ok() || start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command} did not refuse at once: it is serving, or still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    if let Some(err) = child.stderr.as_mut() {
        let _ = err.read_to_string(&mut stderr);
    }
    (status.code(), stderr)
}

/// Sends a signal by name (`"INT"`, `"TERM"`, `"KILL"`) to a process, with
/// the `kill` command (tests keep no `unsafe`).
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
