//! `bench/bursts.py`, the analysis behind `bench/bursts`, on a trace made up
//! here: two bursts of 4 reads at depth 4, with a write and another disk's
//! read that it must leave out.

use std::process::Command;

#[test]
fn bursts_py_finds_the_bursts_of_a_known_trace() {
    let line = |t_us: u64, kind: &str, dev: &str, rwbs: &str, sector: u64| {
        let (who, extra) = match kind {
            "issue" => ("fio  1234 [001]", " 4096"),
            _ => ("swapper     0 [000]", ""),
        };
        format!(
            "{who} {}.{:06}: block:block_rq_{kind}: {dev} {rwbs}{extra} () {sector} + 8 0x2,0,4 [fio]\n",
            100 + t_us / 1_000_000,
            t_us % 1_000_000
        )
    };
    let mut trace = String::new();
    // Four reads issued 10 us apart, back together 400-415 us.
    for (i, t) in [0, 10, 20, 30].into_iter().enumerate() {
        trace += &line(t, "issue", "254,0", "R", 8 + 8 * i as u64);
    }
    trace += &line(5, "issue", "254,0", "WS", 4000);
    trace += &line(6, "issue", "8,0", "R", 4000);
    for (i, t) in [400, 405, 410, 415].into_iter().enumerate() {
        trace += &line(t, "complete", "254,0", "R", 8 + 8 * i as u64);
    }
    trace += &line(420, "complete", "254,0", "WS", 4000);
    trace += &line(421, "complete", "8,0", "R", 4000);
    // The next four, 50-80 us after the burst; back at 900-903 us.
    for (i, t) in [450, 460, 470, 480].into_iter().enumerate() {
        trace += &line(t, "issue", "254,0", "RA", 40 + 8 * i as u64);
    }
    for (i, t) in [900, 901, 902, 903].into_iter().enumerate() {
        trace += &line(t, "complete", "254,0", "RA", 40 + 8 * i as u64);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("perf.txt");
    std::fs::write(&path, trace).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/bursts.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["t", "254,0"])
        .arg(&path)
        .args(["--depth", "4", "--gap", "20"])
        .output()
        .expect("run python3 bench/bursts.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bursts.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 8 reads, 2 bursts, both full. The disk had none in flight 415-450 us
    // (35 of 903: 4%) and all 4 for 370 + 420 us (87%). Issued before the
    // bursts: first 400 and 450 us, last 370 and 420 (medians 425, 395);
    // after the first burst the next four came 50 to 80 us later, and none
    // came after the second.
    assert_eq!(
        stdout.trim(),
        "| t | 8 | 2 | 2 | 4% | 87% | 425 | 395 | 50 | 80 |"
    );
}
