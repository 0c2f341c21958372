//! Faults from below (issue 7, part 6): the backing file or the overlay
//! returns EIO (the device's fault injector, beneath the ring) or ENOSPC (the
//! overlay on a small tmpfs that fills up). The client gets that error for
//! the request that met it, other requests go on, and nothing already
//! acknowledged (and flushed) is lost. An overlay cut short fails reads of
//! the sectors it lost with EIO.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use ubd::device::{Device, DeviceOptions, Fault, Faults, OpClass, Role};
use ubd::image::{Cache, create_overlay};
use ubd::nbd::export::{Export, Exports};
use ubd::nbd::server::{self, Listener};

use common::server::Server;
use common::{output, ubd_info};

const M: u64 = 1 << 20;
const BASE_LEN: u64 = 8 * M;

/// The pattern `ops.py` writes and checks: never zero, different per seed.
fn pattern(seed: u64, offset: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (((offset + i) * 7 + seed) % 251 + 1) as u8)
        .collect()
}

fn python_ops(socket: &Path, ops: &[String]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nbd_faults/ops.py");
    let out = output(
        Command::new("/usr/bin/python3")
            .arg(script)
            .arg(socket)
            .args(ops),
    );
    assert!(
        out.status.success(),
        "ops.py {ops:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs `ops` and checks each answer.
fn expect(socket: &Path, steps: &[(&str, &str)]) {
    let ops: Vec<String> = steps.iter().map(|(op, _)| op.to_string()).collect();
    let got = python_ops(socket, &ops);
    for ((op, want), got) in steps.iter().zip(&got) {
        assert_eq!(got, want, "{op}: got {got:?}, want {want:?} (all: {got:?})");
    }
    assert_eq!(got.len(), steps.len(), "answers: {got:?}");
}

/// A server run in this process, so the test can reach its device.
struct InProcess {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Result<(), server::ServerError>>>,
    socket: PathBuf,
}

impl InProcess {
    fn start(dir: &Path, device: Arc<Device>) -> InProcess {
        let socket = dir.join("nbd.sock");
        let listener = Listener::unix(&socket).expect("listen");
        let exports = Exports::new(vec![Arc::new(Export {
            name: String::new(),
            description: String::new(),
            device,
        })]);
        let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap());
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            server::run(&exports, &[listener], &s, 16, server::HANDSHAKE_LIMIT, None)
        });
        InProcess {
            stop,
            thread: Some(thread),
            socket,
        }
    }

    fn stop(mut self) {
        self.stop.write(1).unwrap();
        if let Some(t) = self.thread.take() {
            t.join()
                .expect("the server thread panicked")
                .expect("the server failed");
        }
    }

    /// What the server returned, once it stopped by itself (within 20 s).
    fn stopped_by_itself(mut self) -> Result<(), server::ServerError> {
        let t = self.thread.take().expect("the server was stopped");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "the server is still running");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("the server thread panicked")
    }
}

/// The overlay `cow` opened with `cache`, over a fault injector.
fn faulty_device(cow: &Path, cache: Cache) -> (Arc<Faults>, Arc<Device>) {
    let faults = Arc::new(Faults::new());
    let device = Device::open(
        cow,
        &DeviceOptions {
            cache,
            faults: Some(faults.clone()),
            ..DeviceOptions::default()
        },
    )
    .unwrap();
    (faults, Arc::new(device))
}

/// A fault: the next sync of the overlay fails with EIO.
fn one_failed_sync() -> Fault {
    Fault {
        class: OpClass::Sync,
        role: Role::Main,
        range: 0..0,
        errno: libc::EIO,
        times: Some(1),
    }
}

fn read_device(cow: &Path, offset: u64, len: u64) -> Vec<u8> {
    let dev = Device::open(
        cow,
        &DeviceOptions {
            read_only: true,
            ..DeviceOptions::default()
        },
    )
    .expect("reopen the overlay");
    let mut buf = vec![0u8; len as usize];
    dev.read_at(offset, &mut buf).unwrap();
    buf
}

fn op(kind: &str, offset: u64, len: u64, seed: u64) -> String {
    format!("{kind}:{offset}:{len}:{seed}")
}

/// `DIR/base.img` (pattern 5, `BASE_LEN` bytes) and an empty overlay over
/// it, `DIR/vm.cow`.
fn base_and_overlay(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.img");
    let cow = dir.join("vm.cow");
    fs::write(&base, pattern(5, 0, BASE_LEN)).unwrap();
    create_overlay(&cow, &base, false).unwrap();
    (base, cow)
}

fn w(offset: u64, len: u64, seed: u64) -> String {
    op("w", offset, len, seed)
}

fn r(offset: u64, len: u64, seed: u64) -> String {
    op("r", offset, len, seed)
}

/// Runs `list` (ops and the answers they must get) on one connection.
fn steps(socket: &Path, list: &[(String, &'static str)]) {
    let v: Vec<(&str, &str)> = list.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    expect(socket, &v);
}

#[test]
fn eio_from_below_fails_only_the_requests_that_met_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let cow = dir.path().join("vm.cow");
    fs::write(&base, pattern(5, 0, BASE_LEN)).unwrap();
    let base_mtime = fs::metadata(&base).unwrap().modified().unwrap();
    create_overlay(&cow, &base, false).unwrap();
    let data_offset = ubd_info(&cow)["data_offset"].as_u64().unwrap();

    let (faults, device) = faulty_device(&cow, Cache::None);
    let server = InProcess::start(dir.path(), device.clone());
    let sock = server.socket.clone();
    steps(
        &sock,
        &[
            (w(M, 64 << 10, 11), "ok"),
            ("f".into(), "ok"),
            (r(M, 64 << 10, 11), "ok"),
        ],
    );

    // The backing file fails reads over 4 MiB..4 MiB + 4 KiB.
    faults.add(Fault {
        class: OpClass::Read,
        role: Role::Backing,
        range: 4 * M..4 * M + 4096,
        errno: libc::EIO,
        times: None,
    });
    steps(
        &sock,
        &[
            (r(4 * M, 4096, 5), "err EIO"),
            (r(4 * M + 8192, 4096, 5), "ok"),
            (r(M, 64 << 10, 11), "ok"),
            (r(4 * M - 512, 1024, 5), "err EIO"),
            (w(6 * M, 8192, 15), "ok"),
        ],
    );
    faults.clear();
    steps(&sock, &[(r(4 * M, 4096, 5), "ok")]);

    // The overlay fails writes of device bytes 2 MiB..2 MiB + 4 KiB.
    faults.add(Fault {
        class: OpClass::Write,
        role: Role::Main,
        range: data_offset + 2 * M..data_offset + 2 * M + 4096,
        errno: libc::EIO,
        times: None,
    });
    steps(
        &sock,
        &[
            (w(2 * M, 4096, 12), "err EIO"),
            (w(3 * M, 4096, 13), "ok"),
            (r(3 * M, 4096, 13), "ok"),
            // The failed write set no bit: the backing file's data still shows.
            (r(2 * M, 4096, 5), "ok"),
        ],
    );
    faults.clear();

    // One failing sync: that FLUSH fails, the next one succeeds.
    faults.add(one_failed_sync());
    steps(
        &sock,
        &[
            (w(5 * M, 4096, 14), "ok"),
            ("f".into(), "err EIO"),
            ("f".into(), "ok"),
        ],
    );
    assert!(faults.hits() >= 4, "faults hit {} times", faults.hits());

    server.stop();
    drop(device);
    for (offset, len, seed) in [
        (M, 64 << 10, 11),
        (3 * M, 4096, 13),
        (5 * M, 4096, 14),
        (6 * M, 8192, 15),
        (2 * M, 4096, 5),
        (4 * M, 4096, 5),
    ] {
        assert!(
            read_device(&cow, offset, len) == pattern(seed, offset, len),
            "after the faults, {len} bytes at {offset} are not pattern {seed}"
        );
    }
    assert_eq!(fs::read(&base).unwrap(), pattern(5, 0, BASE_LEN));
    assert_eq!(fs::metadata(&base).unwrap().modified().unwrap(), base_mtime);
}

/// With the overlay written through the page cache, a failed sync may have
/// cost data the kernel then marked clean, so a later sync would succeed
/// without it: every FLUSH fails from then on, and no bitmap bit set since
/// the last good FLUSH reaches the disk.
#[test]
fn a_failed_sync_through_the_page_cache_fails_every_later_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cow) = base_and_overlay(dir.path());
    let (faults, device) = faulty_device(&cow, Cache::Writeback);
    let server = InProcess::start(dir.path(), device.clone());
    let sock = server.socket.clone();
    steps(&sock, &[(w(M, 4096, 11), "ok"), ("f".into(), "ok")]);
    faults.add(one_failed_sync());
    steps(
        &sock,
        &[
            (w(3 * M, 4096, 13), "ok"),
            ("f".into(), "err EIO"),
            ("f".into(), "err EIO"),
            (w(5 * M, 4096, 14), "ok"),
            ("f".into(), "err EIO"),
            // Reads go on, from what the server holds.
            (r(5 * M, 4096, 14), "ok"),
            (r(M, 4096, 11), "ok"),
        ],
    );
    assert_eq!(faults.hits(), 1, "the fault was meant to hit once");
    server.stop();
    // The device's last round fails too; it is gone all the same.
    drop(device);
    // On disk: the bit of the write flushed before the failure, none since.
    assert!(read_device(&cow, M, 4096) == pattern(11, M, 4096));
    for offset in [3 * M, 5 * M] {
        assert!(
            read_device(&cow, offset, 4096) == pattern(5, offset, 4096),
            "the overlay's bitmap took a bit for {offset} after the failed sync"
        );
    }
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let out = output(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size}"))
                .arg("tmpfs")
                .arg(at),
        );
        assert!(
            out.status.success(),
            "mounting a tmpfs at {} failed (the test needs root): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn enospc_on_a_full_file_system_fails_the_write_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    fs::write(&base, pattern(5, 0, BASE_LEN)).unwrap();
    let small = Tmpfs::mount(&dir.path().join("small"), "6m");
    let cow = small.0.join("vm.cow");
    create_overlay(&cow, &base, false).unwrap();
    let socket = dir.path().join("nbd.sock");
    let server = Server::start(&socket, &[cow.as_os_str()]);
    steps(&socket, &[(w(M, M, 21), "ok"), ("f".into(), "ok")]);

    // Fill the file system.
    let filler = small.0.join("filler");
    {
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0x55u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    steps(
        &socket,
        &[
            (w(4 * M, M, 22), "err ENOSPC"),
            (r(M, M, 21), "ok"),
            // Sectors the overlay holds are rewritten in place: no new space.
            (w(M, 4096, 23), "ok"),
            ("f".into(), "ok"),
            (r(4 * M + M / 2, 4096, 5), "ok"),
        ],
    );
    fs::remove_file(&filler).unwrap();
    steps(&socket, &[(w(4 * M, 4096, 24), "ok"), ("f".into(), "ok")]);
    let (status, stderr) = server.stop();
    assert!(status.success(), "ubd serve: {status}\n{stderr}");

    let got = read_device(&cow, M, M);
    assert!(
        got[..4096] == pattern(23, M, 4096)[..],
        "the rewrite is lost"
    );
    assert!(
        got[4096..] == pattern(21, M + 4096, M - 4096)[..],
        "flushed data is lost"
    );
    assert!(read_device(&cow, 4 * M, 4096) == pattern(24, 4 * M, 4096));
    // The failed write set no bit: the base shows through.
    assert!(read_device(&cow, 4 * M + 4096, M - 4096) == pattern(5, 4 * M + 4096, M - 4096));
    drop(small);
}

/// An overlay cut short (a copy that stopped, a truncate): sectors its
/// bitmap marks written but its file no longer reaches fail with EIO, over
/// NBD and in the image tool, naming the overlay; they never read as zeros or
/// as another request's data. What the file still holds reads as before.
#[test]
fn a_truncated_overlay_fails_reads_of_what_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cow) = base_and_overlay(dir.path());
    let socket = dir.path().join("nbd.sock");
    let server = Server::start(&socket, &[cow.as_os_str()]);
    steps(
        &socket,
        &[
            (w(0, 65536, 21), "ok"),
            (w(4 * M, 65536, 22), "ok"),
            ("f".into(), "ok"),
        ],
    );
    let (status, stderr) = server.stop();
    assert!(status.success(), "ubd serve: {status}\n{stderr}");

    // Keep the first 4 KiB of the second run.
    let data_offset = ubd_info(&cow)["data_offset"].as_u64().unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&cow)
        .unwrap()
        .set_len(data_offset + 4 * M + 4096)
        .unwrap();

    let log = dir.path().join("serve.log");
    let server = Server::start(
        &socket,
        &[cow.as_os_str(), "--log-file".as_ref(), log.as_os_str()],
    );
    steps(
        &socket,
        &[
            (r(0, 65536, 21), "ok"),
            (r(4 * M, 65536, 22), "err EIO"),
            (r(4 * M + 8192, 4096, 22), "err EIO"),
            (r(4 * M + 12288, 4096, 22), "err EIO"),
            (r(4 * M, 4096, 22), "ok"),
            (r(2 * M, 65536, 5), "ok"),
        ],
    );
    // The three failed reads are each logged, or counted: in the note of a
    // later line, or in a count of their own once their second is over,
    // while the server sits idle.
    log_accounting_for(&log, 3);
    let (status, stderr) = server.stop();
    assert!(status.success(), "ubd serve: {status}\n{stderr}");
    let text = fs::read_to_string(&log).unwrap();
    let name = cow.to_str().unwrap();
    assert!(
        text.contains(name) && text.contains("truncated"),
        "the server's log does not say what failed:\n{text}"
    );
    assert_eq!(accounted(&text), 3, "{text}");

    let out_img = dir.path().join("out.img");
    for args in [
        vec!["convert", name, out_img.to_str().unwrap()],
        vec!["map", name],
    ] {
        let out = output(common::ubd().args(&args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "ubd {args:?}: {stderr}");
        assert!(
            stderr.contains(name) && stderr.contains("truncated"),
            "ubd {args:?} does not say what failed: {stderr}"
        );
    }
    assert!(!out_img.exists(), "convert left a partial image");
}

/// Failed reads of a truncated file the server's log accounts for: each
/// logged on its own line, or counted in the note of a later line, or in a
/// count of its own.
fn accounted(log: &str) -> u64 {
    let counted = |marker: &str| -> u64 {
        log.lines()
            .filter_map(|l| {
                let head = &l[..l.find(marker)?];
                head.rsplit(['(', ' ']).next()?.parse::<u64>().ok()
            })
            .sum()
    };
    log.matches("(truncated?)").count() as u64
        + counted(" more failures not logged")
        + counted(" more reads of a truncated file were not logged")
}

/// The log at `path` once it accounts for `n` failed reads; fails the test
/// when 10 s pass without that (the counts go out while the server idles).
fn log_accounting_for(path: &Path, n: u64) -> String {
    let mut text = String::new();
    for _ in 0..100 {
        text = fs::read_to_string(path).unwrap_or_default();
        if accounted(&text) == n {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("10 s after {n} failures, the log does not account for each:\n{text}");
}

/// A backing file cut short while it is served: reads past its new end fail
/// with EIO, and every line of the log about them names the backing file,
/// the count of lines left out included (it named the overlay).
#[test]
fn a_backing_file_cut_short_while_served_is_named_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = base_and_overlay(dir.path());
    let socket = dir.path().join("nbd.sock");
    let log = dir.path().join("serve.log");
    let server = Server::start(
        &socket,
        &[cow.as_os_str(), "--log-file".as_ref(), log.as_os_str()],
    );
    steps(&socket, &[(r(2 * M, 4096, 5), "ok")]);
    fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(M)
        .unwrap();
    let reads: Vec<_> = (0..5)
        .map(|i| (r(2 * M + i * 8192, 4096, 5), "err EIO"))
        .collect();
    steps(&socket, &reads);
    let text = log_accounting_for(&log, 5);
    let (status, stderr) = server.stop();
    assert!(status.success(), "ubd serve: {status}\n{stderr}");
    let (base, cow) = (base.to_str().unwrap(), cow.to_str().unwrap());
    let lines: Vec<_> = text.lines().filter(|l| l.contains("truncated")).collect();
    assert!(
        lines.iter().any(|l| l.contains("were not logged")),
        "no count of lines left out:\n{text}"
    );
    for line in lines {
        assert!(
            line.contains(base) && !line.contains(cow),
            "a line about the backing file names another:\n{line}"
        );
    }
}

/// A device whose worker fails (here its ring, as a failed `io_uring_enter`
/// would) serves nothing more: the server stops, as on a signal, and says
/// which file failed, so that whoever runs it hears of it rather than
/// clients being turned away one by one. What was flushed before is kept.
#[test]
fn a_failed_device_stops_the_server_with_an_error_naming_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, cow) = base_and_overlay(dir.path());
    let (faults, device) = faulty_device(&cow, Cache::None);
    let server = InProcess::start(dir.path(), device.clone());
    let sock = server.socket.clone();
    steps(
        &sock,
        &[
            (w(M, 8192, 21), "ok"),
            ("f".into(), "ok"),
            (r(M, 8192, 21), "ok"),
        ],
    );
    assert_eq!(device.failure(), None);

    faults.fail_ring(libc::ENOMEM);
    // The worker sleeps in the ring; a wake-up makes it run it again.
    device.kick();
    let err = server
        .stopped_by_itself()
        .expect_err("the server went on after its device failed");
    let why = device
        .failure()
        .expect("the device does not know it failed");
    assert!(why.contains("Out of memory"), "{why}");
    let msg = err.to_string();
    assert!(
        matches!(&err, server::ServerError::DeviceFailed { failed } if *failed == [(cow.display().to_string(), why.clone())]),
        "{msg}"
    );
    assert!(
        msg.starts_with(&format!("{}: the device failed: {why}", cow.display())),
        "{msg}"
    );
    assert!(!sock.exists(), "the socket file is still there");
    // A hook asked for after the failure runs at once.
    let (tx, rx) = std::sync::mpsc::channel();
    device.on_failure(Box::new(move || tx.send(()).unwrap()));
    rx.try_recv().expect("a late hook did not run");
    assert!(device.close().is_err(), "closing a failed device succeeded");
    drop(device);
    assert_eq!(read_device(&cow, M, 8192), pattern(21, M, 8192));
}

/// With two exports served, a READ that fails is logged with the export
/// and the connection it came on, and so is the end of that connection: the
/// log says which disk failed.
#[test]
fn a_failed_read_is_logged_with_its_export_and_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    let (_, a_cow) = base_and_overlay(&a);
    let (b_base, b_cow) = base_and_overlay(&b);
    let socket = dir.path().join("nbd.sock");
    let log = dir.path().join("serve.log");
    let (a_spec, b_spec) = (
        format!("disk-a={}", a_cow.display()),
        format!("disk-b={}", b_cow.display()),
    );
    let server = Server::start(
        &socket,
        &[
            "--export",
            &a_spec,
            "--export",
            &b_spec,
            "--log-file",
            log.to_str().unwrap(),
        ],
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&b_base)
        .unwrap()
        .set_len(M)
        .unwrap();
    let read = r(2 * M, 4096, 5);
    let on = |export: &str, want: &'static str| {
        let got = python_ops(&socket, &["--export".into(), export.into(), read.clone()]);
        assert_eq!(got, [want], "a read on {export}");
    };
    on("disk-a", "ok");
    on("disk-b", "err EIO");
    let text = log_accounting_for(&log, 1);
    let (status, stderr) = server.stop();
    assert!(status.success(), "ubd serve: {status}\n{stderr}");
    let conn = text
        .lines()
        .find(|l| l.contains("connection open") && l.contains("export=disk-b"))
        .and_then(|l| l.split(" id=").nth(1)?.split(' ').next())
        .unwrap_or_else(|| panic!("no connection to disk-b opened:\n{text}"));
    let failed: Vec<_> = text
        .lines()
        .filter(|l| l.contains(&format!("read of 4096 bytes at offset {} failed", 2 * M)))
        .collect();
    assert_eq!(failed.len(), 1, "{text}");
    assert!(
        ["export=disk-b".to_string(), format!("conn={conn}")]
            .iter()
            .all(|f| failed[0].split_whitespace().any(|w| w == f)),
        "the line does not name export disk-b and connection {conn}:\n{}",
        failed[0]
    );
    let closed = text
        .lines()
        .find(|l| l.contains("connection closed") && l.contains(&format!(" id={conn} ")))
        .unwrap_or_else(|| panic!("connection {conn} not closed:\n{text}"));
    assert!(closed.contains(" export=disk-b"), "{closed}");
}
