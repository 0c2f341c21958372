//! Load and soak (issue 7): 64 fio connections (`--ioengine=nbd
//! --numjobs=64`) at queue depth 32, mixed 4 KiB and 1 MiB requests, reads
//! and writes with `--verify=crc32c`, each job on its own 16 MiB region, for
//! 60 s (`UBD_SOAK_SECS` for longer: `bench/reliability --long` runs 30 min).
//!
//! The server is sampled every second: resident memory (`VmRSS`) and open
//! file descriptors (`/proc/PID/fd`). Asserted: fio reports no error; RSS at
//! the end is within max(+10%, +16 MiB) of RSS after a warm-up of
//! [`WARMUP_SECS`] (by then the 64 MiB pool is resident, it is pinned for
//! io_uring, and every connection's buffers are allocated; what may still
//! move is allocator slack, a few MiB of glibc arenas, while a leak of even
//! 16 bytes per request grows past the margin in a minute at this load); no
//! more descriptors at the end than after the warm-up, and after fio has gone
//! exactly as many as before it came.

mod common;

use std::fs::{self, File};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::Server;
use common::{run, tool, ubd};
use serde_json::Value;

const M: u64 = 1 << 20;
const JOBS: u64 = 64;
const REGION: u64 = 16 * M;
const WARMUP_SECS: u64 = 5;

/// One sample of the server.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    rss_kib: u64,
    fds: usize,
}

/// Up to 40 samples, evenly spaced, as `secs:rss_mib/fds`.
fn trace(samples: &[Sample]) -> String {
    let step = samples.len().div_ceil(40).max(1);
    samples
        .iter()
        .step_by(step)
        .map(|s| format!("{:.0}:{}/{}", s.secs, s.rss_kib / 1024, s.fds))
        .collect::<Vec<_>>()
        .join(" ")
}

fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .count()
}

#[test]
fn sixty_four_connections_at_depth_32_keep_memory_and_descriptors_flat() {
    let secs: u64 = std::env::var("UBD_SOAK_SECS")
        .ok()
        .map_or(60, |v| v.parse().expect("UBD_SOAK_SECS: seconds"));
    assert!(
        secs > 2 * WARMUP_SECS,
        "UBD_SOAK_SECS must exceed {}",
        2 * WARMUP_SECS
    );
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = dir.path().join("base.img");
    File::create(&base).unwrap().set_len(JOBS * REGION).unwrap();
    let cow = dir.path().join("disk.cow");
    run(ubd().arg("create").arg("--backing").arg(&base).arg(&cow));
    let server = Server::start(&dir.path().join("nbd.sock"), &[&cow]);
    let pid = server.pid();
    // The readiness probe's connection may still be closing: the fewest
    // descriptors seen over a second.
    let fds_before = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            fds(pid)
        })
        .min()
        .unwrap_or(0);

    let json = dir.path().join("fio.json");
    let mut fio = Command::new("timeout")
        .args(["-k", "10", &(secs + 600).to_string()])
        .arg(tool("fio", "fio"))
        .current_dir(dir.path())
        .args(["--name=soak", "--ioengine=nbd"])
        .arg(format!("--uri={}", server.uri()))
        .args([
            "--rw=randrw",
            "--bssplit=4k/90:1m/10",
            "--iodepth=32",
            &format!("--numjobs={JOBS}"),
            &format!("--size={REGION}"),
            &format!("--offset_increment={REGION}"),
            "--verify=crc32c",
            "--verify_fatal=1",
            "--serialize_overlap=1",
            "--time_based=1",
            &format!("--runtime={secs}"),
            "--output-format=json",
        ])
        .arg(format!("--output={}", json.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");

    let start = Instant::now();
    let mut samples = Vec::new();
    let status = loop {
        if let Some(status) = fio.try_wait().unwrap() {
            break status;
        }
        samples.push(Sample {
            secs: start.elapsed().as_secs_f64(),
            rss_kib: rss_kib(pid),
            fds: fds(pid),
        });
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut fio_err = String::new();
    if let Some(mut e) = fio.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut fio_err);
    }
    let text = fs::read_to_string(&json).unwrap_or_default();
    assert!(
        status.success(),
        "fio failed ({status}):\n{fio_err}\n{text}"
    );
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fio printed invalid JSON ({e}):\n{text}"));
    let jobs = v["jobs"].as_array().expect("fio jobs");
    assert_eq!(jobs.len() as u64, JOBS, "fio ran {} jobs", jobs.len());
    let (mut ios, mut bytes) = (0, 0);
    for job in jobs {
        assert_eq!(job["error"].as_u64(), Some(0), "a fio job failed: {job}");
        for dir in ["read", "write"] {
            ios += job[dir]["total_ios"].as_u64().unwrap_or(0);
            bytes += job[dir]["io_bytes"].as_u64().unwrap_or(0);
        }
    }
    assert!(ios > 0, "fio did nothing:\n{text}");

    // After fio: its connections close, their descriptors with them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut fds_after = fds(pid);
    while fds_after > fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        fds_after = fds(pid);
    }

    let steady: Vec<Sample> = samples
        .iter()
        .copied()
        // fio's run time starts after the spawn: up to `secs - 1` after it
        // every connection is busy.
        .filter(|s| s.secs >= WARMUP_SECS as f64 && s.secs <= (secs - 1) as f64)
        .collect();
    assert!(
        steady.len() >= 2,
        "too few samples after the warm-up: {}",
        trace(&samples)
    );
    let (first, last) = (steady[0], steady[steady.len() - 1]);
    let peak_rss = steady.iter().map(|s| s.rss_kib).max().unwrap();
    let peak_fds = steady.iter().map(|s| s.fds).max().unwrap();
    let summary = serde_json::json!({
        "seconds": secs,
        "jobs": JOBS,
        "ios": ios,
        "bytes": bytes,
        "errors": 0,
        "rss_start_kib": first.rss_kib,
        "rss_peak_kib": peak_rss,
        "rss_end_kib": last.rss_kib,
        "fds_before": fds_before,
        "fds_start": first.fds,
        "fds_peak": peak_fds,
        "fds_end": last.fds,
        "fds_after": fds_after,
    });
    println!(
        "soak {secs} s, {JOBS} connections: {ios} requests, {} MiB, 0 errors; RSS start {} MiB, \
         peak {} MiB, end {} MiB; fds before {fds_before}, start {}, peak {peak_fds}, end {}, \
         after {fds_after}",
        bytes / M,
        first.rss_kib / 1024,
        peak_rss / 1024,
        last.rss_kib / 1024,
        first.fds,
        last.fds
    );
    println!("RESULT {summary}");

    let margin = (first.rss_kib / 10).max(16 * 1024);
    assert!(
        last.rss_kib <= first.rss_kib + margin,
        "RSS grew from {} KiB after the warm-up to {} KiB at the end (margin {margin} KiB); secs:MiB/fds: {}",
        first.rss_kib,
        last.rss_kib,
        trace(&samples)
    );
    assert!(
        last.fds <= first.fds,
        "open descriptors grew from {} to {} under load; secs:MiB/fds: {}",
        first.fds,
        last.fds,
        trace(&samples)
    );
    assert!(
        fds_after <= fds_before,
        "descriptors before fio {fds_before}, after it {fds_after}"
    );
    let (status, stderr) = server.stop();
    assert!(
        status.success() && !stderr.contains("panicked"),
        "ubd serve exited with {status}:\n{stderr}"
    );
    run(ubd().arg("check").arg(&cow));
}
