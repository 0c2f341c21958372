//! Booting User-Mode Linux guests against real images.
//!
//! [`make_rootfs`] builds a small ext4 root image holding a static busybox and
//! a generated `/sbin/init`; [`boot`] runs `linux.uml` on it with the given
//! `ubdN=` disks and returns what the guest printed on its console.
//!
//! Facts about the peers this relies on (user-mode-linux 6.1, busybox 1.35):
//!
//! - Boot to init plus `poweroff -f` takes about 1.5 s of wall time.
//! - `con0=fd:0,fd:1` works with stdin on /dev/null and stdout a pipe. The
//!   harness never gives UML a terminal, so nothing is left in raw mode.
//!   Guest output arrives with `\r\n` line ends; [`boot`] strips the `\r`.
//! - UML backs guest RAM with an unlinked file in `$TMPDIR` (default
//!   `/dev/shm`, which must allow `PROT_EXEC` mappings); [`boot`] picks
//!   `/dev/shm` when it has room, else a per-boot directory on disk (slower,
//!   UML warns, but works).
//! - UML puts its mconsole socket under `$HOME/.uml/<umid>/` unless given
//!   `uml_dir=`, and leaves the directory behind when killed; [`boot`] points
//!   it at a per-boot temporary directory.
//! - UML is several host processes (the kernel, I/O helper threads created
//!   with `clone`, and one ptrace-stopped process per guest address space),
//!   all in the process group of the first. [`boot`] starts it in a group of
//!   its own. On timeout it first sends SIGTERM to the main process, on which
//!   UML kills and reaps the others and exits; a bare SIGKILL of the group
//!   would leave zombies for whatever reaps orphans. In every case it then
//!   `SIGKILL`s the group and checks that no live member remains. Because
//!   UML runs in its own process group, a ^C on the terminal does not reach
//!   it; it gets SIGTERM through `PR_SET_PDEATHSIG` when the test process dies.
//! - Several instances run side by side without trouble, so boots are not
//!   serialised.
//! - If init exits, the guest kernel panics and `linux.uml` aborts (SIGABRT).
//! - The kernel mounts devtmpfs on `/dev` by itself (CONFIG_DEVTMPFS_MOUNT).
//! - busybox `dd` knows `conv=notrunc,fsync` and `oflag=direct`, but when a
//!   direct write fails with EINVAL it silently clears `O_DIRECT` and retries
//!   buffered; its buffer is only page-aligned (so direct I/O only really
//!   happens) when `bs` is at least 4096. Buffered block-device writes reach
//!   UML as whole 4 KiB pages. `sha256sum`, `head -c` and `fsfreeze` are
//!   applets.
//! - After `sync; poweroff -f` an ext4 root still needs journal recovery, which
//!   `debugfs` does not do; the generated init remounts `/` read-only before
//!   powering off, so the image is left clean.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{command_line, find_tool, run, tool};

/// Printed by the generated init after the body ran, as `UBD-HARNESS-DONE rc=N`.
pub const SENTINEL: &str = "UBD-HARNESS-DONE";

/// Guest memory given to every boot.
pub const GUEST_MEM: &str = "128M";

/// The User-Mode Linux kernel binary (`linux.uml` from `user-mode-linux`).
pub fn uml_kernel() -> PathBuf {
    tool("linux.uml", "user-mode-linux")
}

/// A statically linked busybox for the guest (`busybox-static`).
///
/// Panics with a clear message when there is none or it is dynamically linked.
pub fn busybox() -> PathBuf {
    let candidates = [
        PathBuf::from("/bin/busybox"),
        PathBuf::from("/usr/bin/busybox"),
    ];
    let path = candidates
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| find_tool("busybox"))
        .unwrap_or_else(|| panic!("busybox not found; install `busybox-static`"));
    match has_program_interpreter(&path) {
        Ok(false) => path,
        Ok(true) => panic!(
            "{} is dynamically linked and cannot run in the guest; install `busybox-static`",
            path.display()
        ),
        Err(e) => panic!("cannot inspect {}: {e}", path.display()),
    }
}

/// Whether a 64-bit little-endian ELF file has a `PT_INTERP` program header,
/// i.e. needs a dynamic loader.
fn has_program_interpreter(path: &Path) -> io::Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(path)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a 64-bit little-endian ELF");
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(bad());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().map_err(|_| bad())?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let p_type = elf.get(at..at + 4).ok_or_else(bad)?;
        if u32::from_le_bytes(p_type.try_into().map_err(|_| bad())?) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The generated `/sbin/init`: prelude, `init_body` in a `set -e` subshell, epilogue.
fn init_script(init_body: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
# Generated by tests/common/uml.rs
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev || echo "ubd-harness: no devtmpfs"
echo "UBD-HARNESS-START"
(
set -e
{init_body}
)
rc=$?
sync
mount -o remount,ro / || echo "ubd-harness: remount,ro / failed"
echo "{SENTINEL} rc=$rc"
poweroff -f
"#
    )
}

/// Builds an ext4 image at `image` of `size_mib` MiB for use as the guest root.
///
/// It holds `/bin/busybox` (static) with a symlink for every applet it has,
/// the mount points `/proc`, `/sys`, `/tmp` and `/dev`, and `/sbin/init`: a
/// prelude (mount proc, sysfs, tmpfs on /tmp, devtmpfs on /dev unless the
/// kernel already did), then `init_body` run by busybox `sh` in a subshell
/// with `set -e`, then an epilogue (`sync`, remount `/` read-only, print
/// `UBD-HARNESS-DONE rc=<status of the body>`, `poweroff -f`).
///
/// `extra` adds files: a path relative to `/` (a leading `/` is ignored) and
/// the contents, written with mode 0644; parent directories are created.
///
/// The filesystem uses 4 KiB blocks and has a journal. An existing `image` is
/// replaced.
pub fn make_rootfs(
    image: &Path,
    size_mib: u64,
    init_body: &str,
    extra: &[(&str, &[u8])],
) -> io::Result<()> {
    let mkfs = find_tool("mkfs.ext4").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "mkfs.ext4 not found; install `e2fsprogs`",
        )
    })?;
    let busybox = busybox();
    let parent = image.parent().filter(|p| !p.as_os_str().is_empty());
    let staging = tempfile::Builder::new()
        .prefix("rootfs-")
        .tempdir_in(parent.unwrap_or(Path::new(".")))?;
    let root = staging.path();

    for dir in [
        "bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc", "mnt",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::copy(&busybox, root.join("bin/busybox"))?;
    fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;
    let applets = run(Command::new(&busybox).arg("--list"));
    for applet in applets.lines().map(str::trim) {
        if applet.is_empty() || applet.contains('/') || applet == "busybox" {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    let init = root.join("sbin/init");
    fs::write(&init, init_script(init_body))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    for (path, contents) in extra {
        let dest = root.join(path.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir)?;
        }
        // Never write through an applet symlink into busybox itself.
        match fs::remove_file(&dest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::write(&dest, contents)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o644))?;
    }

    match fs::remove_file(image) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::File::create(image)?.set_len(size_mib * 1024 * 1024)?;
    let mut cmd = Command::new(mkfs);
    cmd.args(["-q", "-F", "-b", "4096", "-L", "ubd-test", "-d"])
        .arg(root)
        .arg(image)
        .stdin(Stdio::null());
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{}` failed: {}\n{}{}",
            command_line(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Boots `linux.uml` with the given `ubdN=` arguments and root `/dev/ubda`.
///
/// For example `["ubd0=/t/cow.img,/t/base.img", "ubd1=/t/data.img"]`. Use
/// absolute paths: a COW file records its backing file's path.
///
/// The guest gets [`GUEST_MEM`] of memory, its console on stdout (stdin is
/// /dev/null), `init=/sbin/init`. UML is killed (its whole process group)
/// after `timeout`.
///
/// Returns the console text (with `\r` removed) when the guest printed the
/// [`SENTINEL`] line with `rc=0` and UML exited successfully. Otherwise returns
/// an error holding the reason, the console text and UML's stderr: on
/// timeout, when the sentinel never appeared, when the init body failed, when
/// UML exited unsuccessfully, or when UML processes survived the final kill.
pub fn boot(ubd_args: &[String], timeout: Duration) -> Result<String, String> {
    let kernel = uml_kernel();
    let run_dir = tempfile::Builder::new()
        .prefix("ubd-uml-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory for UML: {e}"))?;
    let mut cmd = Command::new(&kernel);
    cmd.args(ubd_args)
        .arg(format!("mem={GUEST_MEM}"))
        .args([
            "root=/dev/ubda",
            "rw",
            "con=null",
            "con0=fd:0,fd:1",
            "ssl=null",
        ])
        .arg("init=/sbin/init")
        .arg(format!("uml_dir={}", run_dir.path().display()))
        .env("TMPDIR", memory_dir(run_dir.path()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs between fork and exec and only calls prctl(2),
    // which is async-signal-safe; it does not allocate or take locks.
    unsafe {
        cmd.pre_exec(|| {
            // If this test process dies (^C, a harness kill), UML gets SIGTERM,
            // on which it stops its guest and helpers. The test thread that
            // spawned it stays alive for the whole boot, so this never fires
            // early.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let cmdline = command_line(&cmd);

    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start `{cmdline}`: {e}"))?;
    let pgid = i32::try_from(child.id()).expect("pid fits in i32");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let stdout = thread::spawn(move || read_all(stdout));
    let stderr = thread::spawn(move || read_all(stderr));

    let mut problem = None;
    let status: Option<ExitStatus> = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= timeout => {
                problem = Some(format!("timed out after {timeout:?}"));
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                problem = Some(format!("cannot wait for UML: {e}"));
                break None;
            }
        }
    };
    let elapsed = start.elapsed();
    let status = status.or_else(|| terminate(&mut child, pgid));
    // Always, even after a clean exit: helpers and tracees must not outlive it.
    let survivors = kill_process_group(pgid);
    if status.is_none() {
        let _ = child.wait();
    }
    let console = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).replace('\r', "");
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();

    if problem.is_none() && !survivors.is_empty() {
        problem = Some(format!(
            "UML processes survived SIGKILL of group {pgid}: {survivors:?}"
        ));
    }
    if problem.is_none() {
        problem = match guest_status(&console) {
            None => Some(format!("the guest never printed `{SENTINEL} rc=...`")),
            Some(0) => None,
            Some(rc) => Some(format!("the guest's init body failed with status {rc}")),
        };
    }
    if problem.is_none() {
        if let Some(status) = status.filter(|s| !s.success()) {
            problem = Some(format!("UML exited with {status} after the guest finished"));
        }
    }
    if console.contains("ptrace set fp regs failed") {
        problem = problem.map(|p| {
            format!(
                "{p}; this UML kernel cannot run guests on this CPU (its XSAVE area is \
                 too large for it): `bash .ci/uml-kernel` fetches one that can and prints \
                 the directory to put first in PATH"
            )
        });
    }
    match problem {
        None => Ok(console),
        Some(reason) => Err(format!(
            "UML boot failed: {reason} (after {elapsed:.1?}; exit: {status:?})\n\
             command: {cmdline}\n\
             --- console ---\n{console}\n--- UML stderr ---\n{stderr}"
        )),
    }
}

/// Like [`boot`], but panics with the error text.
pub fn boot_ok(ubd_args: &[String], timeout: Duration) -> String {
    boot(ubd_args, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// The `rc` of the last `UBD-HARNESS-DONE rc=N` line on the console, if any.
pub fn guest_status(console: &str) -> Option<i32> {
    console
        .lines()
        .filter_map(|line| {
            line.trim()
                .strip_prefix(SENTINEL)?
                .trim()
                .strip_prefix("rc=")
        })
        .filter_map(|rc| rc.trim().parse().ok())
        .next_back()
}

/// Console lines that contain `prefix`, with everything up to and including
/// `prefix` removed and surrounding whitespace trimmed.
///
/// Tolerates kernel messages printed on the same line before the prefix.
pub fn tagged_lines<'a>(console: &'a str, prefix: &str) -> Vec<&'a str> {
    console
        .lines()
        .filter_map(|line| line.find(prefix).map(|at| line[at + prefix.len()..].trim()))
        .collect()
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf);
    buf
}

/// Where UML should put its guest-memory file (`$TMPDIR`): `/dev/shm` when it
/// is writable, allows exec mappings and has at least 512 MiB free (a
/// container's default 64 MiB `/dev/shm` would SIGBUS the guest), else
/// `fallback`.
fn memory_dir(fallback: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: the path is a NUL-terminated C string literal and `st` points to
    // writable memory large enough for a `statvfs`.
    let rc = unsafe { libc::statvfs(c"/dev/shm".as_ptr(), st.as_mut_ptr()) };
    if rc == 0 {
        // SAFETY: statvfs returned 0, so it filled in `st`.
        let st = unsafe { st.assume_init() };
        let free: u64 = st.f_bavail.saturating_mul(st.f_frsize);
        let unusable = libc::ST_RDONLY | libc::ST_NOEXEC;
        if free >= 512 << 20 && st.f_flag & unusable == 0 {
            return shm.to_path_buf();
        }
    }
    fallback.to_path_buf()
}

/// Asks a running UML to stop: SIGTERM makes it kill and reap its helper and
/// guest processes and exit (status 1, within milliseconds), which leaves no
/// zombies behind the way a bare SIGKILL of the group does. Waits up to 3 s.
fn terminate(child: &mut Child, pid: i32) -> Option<ExitStatus> {
    // SAFETY: kill(2) takes no pointers; `pid` is our unreaped child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    None
}

/// SIGKILLs process group `pgid`, then waits (up to 5 s) until no live
/// (non-zombie) process is left in it. Returns the survivors as `pid (comm)`.
fn kill_process_group(pgid: i32) -> Vec<String> {
    // SAFETY: kill(2) takes no pointers; a negative pid names a process group.
    // ESRCH (nothing left) is fine.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let live = live_group_members(pgid);
        if live.is_empty() || Instant::now() >= deadline {
            return live;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Processes in group `pgid` that are not zombies, from /proc.
fn live_group_members(pgid: i32) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            // "pid (comm) state ppid pgrp ..."; comm may contain spaces or ')'.
            let (head, rest) = stat.rsplit_once(')')?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let _ppid = fields.next()?;
            let pgrp: i32 = fields.next()?.parse().ok()?;
            (pgrp == pgid && state != "Z" && state != "X").then(|| format!("{head}) {state}"))
        })
        .collect()
}
