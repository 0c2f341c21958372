//! `bench/run --quick` works: it measures every server on every workload with
//! the `ubd` under test and writes a markdown report and a CSV whose numbers
//! parse. It never judges speed.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const SERVERS: [&str; 9] = [
    "ubd-none",
    "ubd-writeback",
    "qemu-nbd-none",
    "qemu-nbd-writeback",
    "nbdkit-cow",
    "nbd-server-cow",
    "nbdkit-null",
    "disk",
    "disk-fresh",
];

const WORKLOADS: [&str; 11] = [
    "randread-qd1",
    "randread-qd32",
    "randread-4x8",
    "randread-4x32",
    "randwrite-qd32-first",
    "randwrite-4x8-first",
    "randwrite-qd32-rewrite",
    "read-1m-qd8",
    "write-1m-qd8",
    "randrw-70-30-qd32",
    "randwrite-fsync-qd1",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The workloads a server is measured on.
fn measured(server: &str, workload: &str) -> bool {
    match server {
        // nbd-server's diff lasts one connection: no rewrite case for it.
        "nbd-server-cow" => workload != "randwrite-qd32-rewrite",
        // A reference for writes of new blocks only.
        "disk-fresh" => FRESH_WRITES.contains(&workload),
        _ => true,
    }
}

/// The workloads that only write to a fresh overlay: the first-touch ones,
/// and random writes with a FLUSH after each.
const FRESH_WRITES: [&str; 4] = [
    "randwrite-qd32-first",
    "randwrite-4x8-first",
    "write-1m-qd8",
    "randwrite-fsync-qd1",
];

/// The one file in `dir` whose name ends with `suffix`.
fn only_file(dir: &Path, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(found.len(), 1, "want one *{suffix} in {dir:?}: {found:?}");
    found.into_iter().next().unwrap()
}

fn parse_number(field: &str, what: &str) -> f64 {
    let v: f64 = field
        .parse()
        .unwrap_or_else(|e| panic!("{what}: {field:?} is not a number ({e})"));
    assert!(v.is_finite() && v >= 0.0, "{what}: {v}");
    v
}

#[test]
fn bench_run_quick_reports_every_server_and_workload() {
    for (tool, package) in [
        ("fio", "fio"),
        ("nbdkit", "nbdkit"),
        ("nbd-server", "nbd-server"),
        ("nbdcopy", "libnbd-bin"),
        ("nbdinfo", "libnbd-bin"),
        ("qemu-img", "qemu-utils"),
        ("qemu-nbd", "qemu-utils"),
        ("python3", "python3"),
    ] {
        common::tool(tool, package);
    }
    // On disk under target/ (not a tmpfs /tmp): the servers use O_DIRECT.
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = scratch.path().join("results");
    let work = scratch.path().join("work");
    let stdout = common::run(
        Command::new("bash")
            .arg(repo().join("bench/run"))
            .arg("--quick")
            .arg("--out")
            .arg(&out)
            .arg("--dir")
            .arg(&work)
            .arg("--ubd")
            .arg(common::ubd_bin())
            .current_dir(repo()),
    );

    let md_path = only_file(&out, ".md");
    let md = fs::read_to_string(&md_path).unwrap();
    assert_eq!(stdout.trim(), md.trim(), "the script prints its markdown");
    // The markdown: a table row per server in each workload's table, and a
    // verdict for every target.
    for server in SERVERS {
        let rows = md
            .lines()
            .filter(|l| l.starts_with(&format!("| {server} |")))
            .count();
        let want = WORKLOADS.iter().filter(|w| measured(server, w)).count();
        assert_eq!(rows, want, "rows for {server} in\n{md}");
    }
    for workload in WORKLOADS {
        assert!(md.contains(&format!("`{workload}`")), "{workload} in\n{md}");
    }
    let targets: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("## Targets"))
        .filter(|l| l.starts_with("| ") && !l.starts_with("| target"))
        .collect();
    assert_eq!(targets.len(), 18, "{md}");
    for t in &targets {
        assert!(
            t.contains("**met**") || t.contains("**missed**"),
            "a target without a verdict: {t}"
        );
    }
    assert!(md.contains("Base file unchanged at the end: yes"), "{md}");

    // The CSV: one row per workload and server, numbers that parse.
    let csv_path = md_path.with_extension("csv");
    let csv = fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no column {name} in {header:?}"))
    };
    let mut seen = BTreeSet::new();
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), header.len(), "{line}");
        let (workload, server) = (f[col("workload")], f[col("server")]);
        assert!(seen.insert((workload.to_string(), server.to_string())));
        let what = format!("{workload} {server}");
        assert_eq!(f[col("runs")], "1", "{what}");
        for m in ["iops", "mbps", "p50_us", "p99_us"] {
            for s in ["median", "min", "max"] {
                parse_number(f[col(&format!("{m}_{s}"))], &what);
            }
        }
        assert!(parse_number(f[col("iops_median")], &what) > 0.0, "{what}");
        let cpu = f[col("cpu_us_per_io_median")];
        if server.starts_with("disk") {
            assert_eq!(cpu, "", "no server process for the disk reference");
        } else {
            parse_number(cpu, &what);
        }
        parse_number(f[col("ratio_best_peer")], &what);
        parse_number(f[col("ratio_disk")], &what);
        if FRESH_WRITES.contains(&workload) {
            parse_number(f[col("ratio_disk_fresh")], &what);
        } else {
            assert_eq!(f[col("ratio_disk_fresh")], "", "{what}");
        }
    }
    let want: BTreeSet<(String, String)> = WORKLOADS
        .iter()
        .flat_map(|w| SERVERS.iter().map(|s| (w.to_string(), s.to_string())))
        .filter(|(w, s)| measured(s, w))
        .collect();
    assert_eq!(seen, want);
    assert!(
        md.contains("nbd-server-cow is not measured on randwrite-qd32-rewrite"),
        "the report says why a case is missing:\n{md}"
    );
    for w in FRESH_WRITES {
        let table: String = md
            .split("\n## ")
            .filter(|t| t.contains(&format!("`{w}`")))
            .collect();
        assert!(
            table.contains("Against first touch on the host (disk-fresh): ubd-none "),
            "{w}: no ratio against disk-fresh in\n{table}"
        );
    }

    // Every run is recorded, and the work directory is gone.
    let runs = fs::read_to_string(only_file(&out, "-runs.csv")).unwrap();
    assert_eq!(runs.lines().count(), 1 + want.len());
    assert_eq!(
        fs::read_dir(&work).unwrap().count(),
        0,
        "work dir left over"
    );
}

#[test]
fn bench_run_quick_with_tls_measures_every_tls_server() {
    common::tool("openssl", "openssl");
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = scratch.path().join("results");
    let servers = ["ubd-none", "qemu-nbd-none", "nbdkit-cow", "nbd-server-cow"];
    common::run(
        Command::new("bash")
            .arg(repo().join("bench/run"))
            .args(["--quick", "--tls", "--time", "1", "--workloads"])
            .arg("randread-qd1,randwrite-qd32-first")
            .arg("--servers")
            .arg(servers.join(","))
            .arg("--out")
            .arg(&out)
            .arg("--dir")
            .arg(scratch.path().join("work"))
            .arg("--ubd")
            .arg(common::ubd_bin())
            .current_dir(repo()),
    );
    let md = fs::read_to_string(only_file(&out, ".md")).unwrap();
    assert!(
        md.contains("TLS (STARTTLS, required by every server)"),
        "the transport in\n{md}"
    );
    // Each server verified the base through nbdcopy over TLS, and has a
    // row in both tables; nbd-server is left out, with the reason.
    for s in &servers[..3] {
        assert!(
            md.contains(&format!("Checked before measuring, {s}: sha256")),
            "{s} verified in\n{md}"
        );
        let rows = md.lines().filter(|l| l.starts_with(&format!("| {s} |")));
        assert_eq!(rows.count(), 2, "rows for {s} in\n{md}");
    }
    assert!(!md.contains("| nbd-server-cow |"), "{md}");
    assert!(
        md.contains("nbd-server-cow is not measured with --tls"),
        "{md}"
    );
    assert!(md.contains("this run used TLS"), "{md}");
    assert!(md.contains("Base file unchanged at the end: yes"), "{md}");
}
