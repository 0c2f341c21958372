//! `ubd serve` killed with SIGKILL under a multi-connection NBD workload:
//! `tests/reliability/crash.py` (python3-libnbd) drives 4 connections with
//! 8 requests in flight each (writes at any offset and length, FUA writes,
//! TRIM, WRITE_ZEROES, FLUSH), kills the server at a random moment, restarts
//! it, reads the whole device and checks every byte against its model: what
//! was acknowledged before a completed FLUSH (on any connection), and every
//! acknowledged FUA request, is there; every other byte holds a value it
//! could legitimately hold. The script's docstring has the details.
//!
//! `UBD_NBD_CRASH_KILLS` sets the number of kills (default 25),
//! `UBD_NBD_CRASH_SEED` the seed (default: random; the script prints it).

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

#[test]
fn sigkill_under_nbd_load_keeps_every_flushed_and_fua_write() {
    let kills: u64 = std::env::var("UBD_NBD_CRASH_KILLS")
        .ok()
        .map_or(25, |v| v.parse().expect("UBD_NBD_CRASH_KILLS: a number"));
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reliability/crash.py");
    let mut cmd = Command::new("timeout");
    // About a second per kill; the limit only turns a hang into a failure.
    cmd.args(["-k", "10", &(300 + 10 * kills).to_string()])
        .arg("/usr/bin/python3")
        .arg(&script)
        .arg("--ubd")
        .arg(common::ubd_bin())
        .arg("--dir")
        .arg(dir.path())
        .arg("--kills")
        .arg(kills.to_string());
    if let Ok(seed) = std::env::var("UBD_NBD_CRASH_SEED") {
        cmd.arg("--seed").arg(seed);
    }
    let out = common::output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "crash.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let result: Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|j| serde_json::from_str(j).expect("RESULT is JSON"))
        .unwrap_or_else(|| panic!("crash.py printed no RESULT line:\n{stdout}"));
    let n = |k: &str| {
        result[k]
            .as_u64()
            .unwrap_or_else(|| panic!("RESULT has no {k}: {result}"))
    };
    assert_eq!(n("kills"), kills, "{result}");
    assert_eq!(n("violations"), 0, "{stdout}");
    // The model checked something: durable data, and kills that found
    // requests in flight.
    assert!(n("committed") > 0, "no request was committed: {result}");
    assert!(
        n("fua_acked") > 0,
        "no FUA request was acknowledged: {result}"
    );
    assert!(n("flushes_completed") > 0, "no FLUSH completed: {result}");
    assert!(
        n("durable_bytes") > 0,
        "no byte was pinned by a committed request: {result}"
    );
    assert!(
        n("in_flight_at_kill") > 0,
        "no kill found requests in flight: {result}"
    );
}
