//! `ubd serve` under memory pressure (issue 7).
//!
//! 1. The smallest pool the server takes (one 128 KiB chunk: `--pool-size`
//!    refuses less) with `--fail-alloc` (every allocation
//!    takes the reserve path): 16 connections with 16 requests of 32 MiB in
//!    flight each (`tests/reliability/pressure.py`, python3-libnbd: writes
//!    share one source buffer, so 256 requests in flight cost the client
//!    about 2 GiB; reads, which need buffers of their own, are 4 of each
//!    connection's 16), every read checked byte for byte; then fio with
//!    `--verify=crc32c`: 16 jobs of 32 MiB blocks at queue depth 4 on
//!    disjoint regions (16 x 4 x 32 MiB = 2 GiB of fio buffers). Everything
//!    must complete (a stall fails the test) without an error, and the
//!    server's peak RSS stay under 128 MiB.
//! 2. The server under `prlimit --data` (RLIMIT_DATA: heap, thread stacks and
//!    private writable mappings, the pool among them) of the pool plus
//!    32 MiB: a limit below the pool makes it refuse to start with a clear
//!    error; at pool + 32 MiB it serves a verified fio workload.
//!    (RLIMIT_AS would also count 128 MiB of address space glibc reserves
//!    for malloc arenas and never uses; where the tests run, the memory
//!    controller is on cgroup v1, so there is no memory.max to set.)
//!
//! `UBD_PRESSURE_ROUNDS` repeats the python workload (default 1).

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::server::Server;
use common::{output, run, tool, ubd};
use serde_json::Value;

const M: u64 = 1 << 20;
/// The two tests run one after the other: together their clients would
/// hold about 4 GiB.
static SERIAL: Mutex<()> = Mutex::new(());

/// What each client may take before `timeout` kills it (a hang fails).
const CLIENT_LIMIT_SECS: &str = "600";

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reliability")
        .join(name)
}

/// A sparse base of `size` bytes (zeros) and an empty overlay over it.
fn overlay(dir: &Path, size: u64) -> PathBuf {
    let base = dir.join("base.img");
    File::create(&base).unwrap().set_len(size).unwrap();
    let cow = dir.join("disk.cow");
    run(ubd().arg("create").arg("--backing").arg(&base).arg(&cow));
    cow
}

fn timeout(program: &Path) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "10", CLIENT_LIMIT_SECS]).arg(program);
    cmd
}

/// Runs fio (nbd engine, `--verify=crc32c`) with `args` on `uri`; fails the
/// test on any error. Returns the bytes fio moved.
fn fio_verified(uri: &str, dir: &Path, args: &[&str]) -> u64 {
    let json = dir.join("fio.json");
    let mut cmd = timeout(&tool("fio", "fio"));
    cmd.current_dir(dir)
        .args(["--name=verified", "--ioengine=nbd"])
        .arg(format!("--uri={uri}"))
        .args(["--verify=crc32c", "--serialize_overlap=1"])
        .args(args)
        .args(["--output-format=json"])
        .arg(format!("--output={}", json.display()));
    let out = output(&mut cmd);
    let text = fs::read_to_string(&json).unwrap_or_default();
    assert!(
        out.status.success(),
        "fio failed ({}):\n{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fio printed invalid JSON ({e}):\n{text}"));
    let mut moved = 0;
    for job in v["jobs"].as_array().expect("fio jobs") {
        assert_eq!(job["error"].as_u64(), Some(0), "a fio job failed: {job}");
        moved += job["read"]["io_bytes"].as_u64().unwrap_or(0)
            + job["write"]["io_bytes"].as_u64().unwrap_or(0);
    }
    assert!(moved > 0, "fio moved nothing:\n{text}");
    moved
}

/// A field of `/proc/PID/status` in KiB (`VmData`, `VmRSS`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Samples `field` of `pid` every 100 ms until `stop`; returns the peak.
fn sample_peak(
    pid: u32,
    field: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(status_kib(pid, field).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    })
}

fn stop_clean(server: Server) {
    let (status, stderr) = server.stop();
    assert!(
        status.success() && !stderr.contains("panicked"),
        "ubd serve exited with {status}:\n{stderr}"
    );
}

#[test]
fn a_one_chunk_pool_failing_every_allocation_serves_32_mib_requests_at_depth_16_on_16_connections()
{
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let size = 2048 * M;
    let cow = overlay(dir.path(), size);
    let socket = dir.path().join("nbd.sock");
    let server = Server::start(
        &socket,
        &[cow.to_str().unwrap(), "--pool-size", "128K", "--fail-alloc"],
    );
    let uri = server.uri();
    let rounds = std::env::var("UBD_PRESSURE_ROUNDS").unwrap_or_else(|_| "1".into());

    let python = Path::new("/usr/bin/python3");
    let out = output(
        timeout(python)
            .arg(script("pressure.py"))
            .arg("--uri")
            .arg(&uri)
            .arg("--size")
            .arg((1024 * M).to_string())
            .arg("--rounds")
            .arg(&rounds),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "pressure.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or_else(|| panic!("pressure.py printed no RESULT:\n{stdout}"));
    assert_eq!(result["errors"].as_u64(), Some(0), "{result}");
    // Every connection really had 16 requests in flight at once.
    assert_eq!(result["peak_in_flight"].as_u64(), Some(256), "{result}");

    let moved = fio_verified(
        &uri,
        dir.path(),
        &[
            "--rw=randrw",
            "--bs=32M",
            "--iodepth=4",
            "--numjobs=16",
            "--size=128M",
            "--offset_increment=128M",
        ],
    );
    println!("fio: {} MiB moved and verified", moved / M);
    // With 8 GiB in flight, the server held little more than its 128 KiB
    // pool: it never buffers a request whole.
    let peak = status_kib(server.pid(), "VmHWM").expect("VmHWM of the server");
    println!("server peak RSS {} MiB", peak / 1024);
    assert!(
        peak < 128 * 1024,
        "the server's peak RSS is {peak} KiB with a 128 KiB pool"
    );

    let (status, stderr) = server.stop();
    assert!(
        status.success() && !stderr.contains("panicked"),
        "ubd serve exited with {status}:\n{stderr}"
    );
    assert!(
        stderr.contains("--fail-alloc"),
        "the server did not say fault injection is on:\n{stderr}"
    );
    run(ubd().arg("check").arg(&cow));
}

#[test]
fn under_a_data_limit_of_the_pool_plus_32_mib_it_serves_a_verified_fio_workload() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cow = overlay(dir.path(), 512 * M);
    let socket = dir.path().join("nbd.sock");
    let prlimit = tool("prlimit", "util-linux");
    let pool = 64 * M;

    // Half the pool: it cannot even map the pool, and says so.
    let out = output(
        timeout(&prlimit)
            .arg(format!("--data={}", pool / 2))
            .arg(common::ubd_bin())
            .arg("serve")
            .arg(&cow)
            .arg("--socket")
            .arg(&socket),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("cannot map a 67108864-byte buffer arena"),
        "under a 32 MiB data limit ubd serve should refuse to start ({}):\n{stderr}",
        out.status
    );

    let limit = pool + 32 * M;
    let server = Server::start_wrapped(
        &[prlimit.as_os_str(), format!("--data={limit}").as_ref()],
        &socket,
        &[cow.as_os_str(), "--pool-size".as_ref(), "64M".as_ref()],
    );
    let limits = fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max data size") && l.contains(&limit.to_string())),
        "the server does not run under the limit:\n{limits}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak(server.pid(), "VmData", stop.clone());
    // Six connections with requests up to 32 MiB, then 64 connections at
    // once (each costs the server under 0.5 MiB of the limit: its thread's
    // small stack and its table of replies owed).
    let moved = fio_verified(
        &server.uri(),
        dir.path(),
        &[
            "--rw=randrw",
            "--bssplit=4k/50:1m/40:32m/10",
            "--iodepth=8",
            "--numjobs=6",
            "--size=64M",
            "--offset_increment=64M",
        ],
    );
    let many = fio_verified(
        &server.uri(),
        dir.path(),
        &[
            "--rw=randrw",
            "--bssplit=4k/50:1m/50",
            "--iodepth=8",
            "--numjobs=64",
            "--size=8M",
            "--offset_increment=8M",
        ],
    );
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    println!(
        "under a data limit of {} MiB: fio moved and verified {} MiB on 6 connections, \
         {} MiB on 64; server peak VmData {} MiB",
        limit / M,
        moved / M,
        many / M,
        peak / 1024
    );
    assert!(peak > 0, "no VmData sample of the server");
    stop_clean(server);
    run(ubd().arg("check").arg(&cow));
}
