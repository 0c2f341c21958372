//! Helpers shared by the integration tests.
//!
//! Each test binary compiles this module separately (`mod common;`), so not
//! every binary uses every helper.
//!
//! - [`run`] / [`run_bytes`]: run a host command, panic with its command line,
//!   status and stderr when it fails.
//! - [`ubd_bin`]: the `ubd` binary under test.
//! - [`uml`]: build a bootable ext4 root image and boot User-Mode Linux on it.
//! - [`device`]: a raw device and a scripted protocol, for tests that drive a
//!   device in-process.
//!
//! Tests fail (panic) rather than skip when a peer tool is missing.

#![allow(dead_code)]

pub mod device;
pub mod server;
pub mod uml;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `ubd` binary built by cargo for this test run.
pub fn ubd_bin() -> PathBuf {
    env!("CARGO_BIN_EXE_ubd").into()
}

/// A `Command` for the `ubd` binary under test.
pub fn ubd() -> Command {
    Command::new(ubd_bin())
}

/// Finds a host tool by name in `PATH`, then in `/usr/sbin` and `/sbin` (where
/// e2fsprogs lives and which a non-root `PATH` often lacks).
///
/// Panics with a message naming the tool and the package that provides it.
pub fn tool(name: &str, package: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "required host tool `{name}` not found in PATH, /usr/sbin or /sbin; install `{package}`"
        )
    })
}

/// Like [`tool`], but returns `None` instead of panicking.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Renders a command line for error messages: program and arguments, shell-ish quoted.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` (stdin from /dev/null) and returns its raw output, whatever its status.
///
/// Panics only when the command cannot be started.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", command_line(cmd)))
}

/// Runs `cmd` (stdin from /dev/null) and returns its stdout as bytes.
///
/// Panics with the command line, exit status, stdout and stderr if it does not
/// exit successfully.
pub fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = output(cmd);
    if !out.status.success() {
        panic!(
            "`{}` failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            command_line(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
    out.stdout
}

/// Runs `cmd` (stdin from /dev/null) and returns its stdout as text.
///
/// Panics like [`run_bytes`], and also if stdout is not UTF-8.
pub fn run(cmd: &mut Command) -> String {
    let stdout = run_bytes(cmd);
    String::from_utf8(stdout)
        .unwrap_or_else(|e| panic!("`{}` printed non-UTF-8 output: {e}", command_line(cmd)))
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// In `dir`: `base.img`, `len` pseudo-random bytes from `seed`, and
/// `cow.img`, an empty overlay over it made by `ubd create`. Returns their
/// paths and the base's bytes.
pub fn base_and_overlay(dir: &Path, seed: u64, len: usize) -> (PathBuf, PathBuf, Vec<u8>) {
    let base = dir.join("base.img");
    let cow = dir.join("cow.img");
    let data = pseudo_random_bytes(seed, len);
    std::fs::write(&base, &data).expect("write the backing image");
    run(ubd().arg("create").arg("--backing").arg(&base).arg(&cow));
    (base, cow, data)
}

/// `nbdinfo --json URI`, parsed: the handshake of a well-behaved client.
pub fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let json = run(Command::new(tool("nbdinfo", "libnbd-bin"))
        .arg("--json")
        .arg(uri));
    serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("`nbdinfo --json` printed invalid JSON ({e}):\n{json}"))
}

/// `ubd info --output json PATH`, parsed.
pub fn ubd_info(path: &Path) -> serde_json::Value {
    let json = run(ubd().args(["info", "--output", "json"]).arg(path));
    serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("`ubd info --output json` printed invalid JSON ({e}):\n{json}"))
}

/// Holds a POSIX record lock (as UML takes) on `path` from another process
/// until the returned child is killed; returns once the lock is held.
pub fn hold_posix_lock(path: &Path) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut holder = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import fcntl, sys, time\n\
             f = open(sys.argv[1], 'r+')\n\
             fcntl.lockf(f, fcntl.LOCK_EX)\n\
             print('locked', flush=True)\n\
             time.sleep(60)\n",
        )
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3 to hold a lock");
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read the lock holder's output");
    assert_eq!(
        line.trim(),
        "locked",
        "the lock holder did not take the lock"
    );
    holder
}

/// Waits for `child` to exit, up to `limit`; past it, kills and reaps it and
/// fails the test, naming it `what`.
pub fn waited(child: &mut Child, what: &str, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
