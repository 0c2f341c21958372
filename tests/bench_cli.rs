//! `ubd bench` drives the device and reports what it did.

mod common;

use std::fs;

use common::{run, ubd};
use serde_json::Value;

#[test]
fn bench_reports_requests_flushes_and_the_reserve_path() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    fs::write(&base, common::pseudo_random_bytes(3, 4 << 20)).unwrap();
    let cow = dir.path().join("scratch.cow");
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    let text = run(ubd()
        .args([
            "bench",
            "--pattern",
            "randrw",
            "--block-size",
            "4K",
            "--queue-depth",
            "8",
            "--count",
            "500",
            "--flush-interval",
            "16",
            "--fail-alloc",
            "--output",
            "json",
        ])
        .arg(&cow));
    let j: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(j["requests"], 500);
    assert_eq!(j["errors"], 0);
    assert!(j["flushes"].as_u64().unwrap() >= 1, "{j}");
    // Fault injection: every allocation went through the reserve path.
    assert!(j["pool_reserve_allocs"].as_u64().unwrap() >= 500, "{j}");
    assert!(j["iops"].as_f64().unwrap() > 0.0);
    assert!(j["lat_us_p50"].as_f64().unwrap() <= j["lat_us_p99"].as_f64().unwrap());
    // The writes landed in the overlay, which stays sound.
    let info = common::ubd_info(&cow);
    assert!(info["sectors_present"].as_u64().unwrap() > 0);
    run(ubd().arg("check").arg(&cow));
    // Read patterns open the image read-only; a block bigger than the device fails.
    let out = common::output(
        ubd()
            .args(["bench", "--block-size", "8M", "--count", "1"])
            .arg(&cow),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("larger than the device"), "{err}");
    assert!(err.contains(cow.to_str().unwrap()), "{err}");
    // So does one bigger than a raw image of a few bytes (a damaged overlay
    // whose magic is gone), named too, without a hint at the pool.
    let raw = dir.path().join("tiny.img");
    fs::write(&raw, b"abc").unwrap();
    let out = common::output(ubd().args(["bench", "--count", "1"]).arg(&raw));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}: --block-size 4K is larger than the device (3)",
            raw.display()
        )),
        "{err}"
    );
    assert!(!err.contains("--pool-size"), "{err}");
}

/// `--flush-interval N` sends one FLUSH for every N writes, however many
/// fall due while one is being sent.
#[test]
fn bench_sends_a_flush_after_every_n_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    fs::write(&base, common::pseudo_random_bytes(4, 4 << 20)).unwrap();
    let cow = dir.path().join("scratch.cow");
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    for (depth, count, interval) in [("1", 100, 1), ("8", 200, 1), ("8", 200, 4)] {
        let text = run(ubd()
            .args(["bench", "--pattern", "randwrite", "--queue-depth", depth])
            .args(["--count", &count.to_string()])
            .args(["--flush-interval", &interval.to_string()])
            .args(["--output", "json"])
            .arg(&cow));
        let j: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j["requests"], count, "{j}");
        assert_eq!(j["flushes"], count / interval, "qd{depth}: {j}");
    }
}

/// Numbers out of range are refused as usage errors, naming the option,
/// before anything is opened (no panic for a --time no clock can hold).
#[test]
fn bench_refuses_a_time_or_mix_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    for args in [
        ["--time", "inf"],
        ["--time", "1e30"],
        ["--time", "NaN"],
        ["--time=-1", "--count=1"],
        ["--rwmix-read", "150"],
    ] {
        let out = common::output(ubd().arg("bench").args(args).arg(&img));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let option = args[0].split('=').next().unwrap();
        assert!(stderr.contains(option), "{args:?}: {stderr}");
    }
}
