//! `ubd serve` driven by real NBD clients: nbdinfo, qemu-io, qemu-img,
//! nbdcopy, fio's nbd engine and python3-libnbd. Everything a client writes is
//! checked against an in-test model or a reference image built with `std::fs`,
//! live through the server and again from the overlay after the server stopped
//! (`ubd convert`, or a restarted server). Then the server's command line: the
//! overlay lock, SIGTERM and SIGINT with a client connected, `--pid-file`,
//! `--read-only`, TCP only with `--bind`, and systemd socket activation.
//! Last, a FLUSH on one connection covering another's writes across a
//! SIGKILL, 32 MiB requests through a 1 MiB pool, export names without a
//! positional file, `--backing`, a base with a partial last sector, and
//! SIGTERM under fio load.
//!
//! Every test that serves an overlay checks at the end that the backing image
//! kept its checksum and its mtime, and that `ubd check` finds the overlay
//! clean.
//!
//! Client commands run under `timeout`, so a server that hangs fails the test
//! rather than hanging it. No test asserts on timing.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::server::{Server, signal};
use common::{output, pseudo_random_bytes, run, sha256_hex, tool, ubd, ubd_bin};
use serde_json::Value;
use tempfile::TempDir;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
/// The size of the standard base image (see [`base_contents`]).
const SIZE: u64 = 8 * M;
const SECTOR: u64 = 512;
/// How long any one client command may take before `timeout` kills it.
const CLIENT_LIMIT_SECS: &str = "180";

// ---------------------------------------------------------------------------
// Files: the base image, overlays, and checks that the base never changes.

/// A backing image with the checksum and mtime it had before any server ran.
struct Base {
    path: PathBuf,
    sha: String,
    mtime: SystemTime,
}

impl Base {
    fn record(path: &Path) -> Base {
        Base {
            path: path.to_path_buf(),
            sha: sha256_hex(&fs::read(path).unwrap()),
            mtime: fs::metadata(path).unwrap().modified().unwrap(),
        }
    }

    fn assert_unchanged(&self) {
        assert_eq!(
            sha256_hex(&fs::read(&self.path).unwrap()),
            self.sha,
            "the backing image {} was modified",
            self.path.display()
        );
        assert_eq!(
            fs::metadata(&self.path).unwrap().modified().unwrap(),
            self.mtime,
            "the backing image {} has a new mtime",
            self.path.display()
        );
    }
}

/// The standard base: `[0, 2M)` pseudo-random, `[2M, 4M)` a hole in the file,
/// `[4M, 6M)` all 0x5a, `[6M, 8M)` pseudo-random.
fn base_contents() -> Vec<u8> {
    let mut data = vec![0u8; SIZE as usize];
    data[..(2 * M) as usize].copy_from_slice(&pseudo_random_bytes(1, (2 * M) as usize));
    data[(4 * M) as usize..(6 * M) as usize].fill(0x5a);
    data[(6 * M) as usize..].copy_from_slice(&pseudo_random_bytes(2, (2 * M) as usize));
    data
}

/// Writes the standard base to `path`, leaving `[2M, 4M)` a real hole.
fn write_base(path: &Path) -> (Base, Vec<u8>) {
    let data = base_contents();
    let file = File::create(path).unwrap();
    for range in [0..2 * M, 4 * M..SIZE] {
        file.write_all_at(&data[range.start as usize..range.end as usize], range.start)
            .unwrap();
    }
    file.set_len(SIZE).unwrap();
    file.sync_all().unwrap();
    drop(file);
    (Base::record(path), data)
}

fn create_overlay(base: &Path, overlay: &Path) {
    run(ubd().arg("create").arg("--backing").arg(base).arg(overlay));
}

/// `ubd check OVERLAY` exits 0 (clean).
fn assert_clean(overlay: &Path) {
    run(ubd().arg("check").arg(overlay));
}

/// What the overlay (or raw image) reads as, merged by `ubd convert`.
fn merged(image: &Path, out: &Path) -> Vec<u8> {
    let _ = fs::remove_file(out);
    run(ubd().arg("convert").arg(image).arg(out));
    fs::read(out).unwrap()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// A temporary directory with the standard base and an empty overlay over it.
struct Fixture {
    dir: TempDir,
    base: Base,
    base_data: Vec<u8>,
    overlay: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (base, base_data) = write_base(&dir.path().join("base.img"));
    let overlay = dir.path().join("disk.cow");
    create_overlay(&base.path, &overlay);
    Fixture {
        dir,
        base,
        base_data,
        overlay,
    }
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn socket(&self) -> PathBuf {
        self.path("nbd.sock")
    }

    /// `ubd serve OVERLAY EXTRA... --socket DIR/nbd.sock`.
    fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec![s(&self.overlay)];
        args.extend_from_slice(extra);
        Server::start(&self.socket(), &args)
    }

    /// The backing image is untouched and the overlay is clean.
    fn finish(&self) {
        self.base.assert_unchanged();
        assert_clean(&self.overlay);
    }
}

/// Stops the server with SIGTERM: it must exit 0 and remove its socket file.
/// Returns its stderr.
fn stop_clean(server: Server) -> String {
    let socket = server.socket().to_path_buf();
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "ubd serve exited with {status} on SIGTERM\nstderr:\n{stderr}"
    );
    assert!(
        !socket.exists(),
        "ubd serve left its socket {} behind\nstderr:\n{stderr}",
        socket.display()
    );
    stderr
}

// ---------------------------------------------------------------------------
// Clients.

/// A host tool run under `timeout`, so a hung server fails the test.
fn client(name: &str, package: &str) -> Command {
    let path = tool(name, package);
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "10", CLIENT_LIMIT_SECS]).arg(path);
    cmd
}

/// `/usr/bin/python3` (the one with the `nbd` module) under `timeout`.
fn python() -> Command {
    let python = Path::new("/usr/bin/python3");
    assert!(
        python.exists(),
        "/usr/bin/python3 is missing; install python3 and python3-libnbd"
    );
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "10", CLIENT_LIMIT_SECS]).arg(python);
    cmd
}

fn nbdinfo() -> Command {
    client("nbdinfo", "libnbd-bin")
}

fn nbdinfo_json(uri: &str) -> Value {
    let text = run(nbdinfo().arg("--json").arg(uri));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("nbdinfo --json printed invalid JSON ({e}):\n{text}"))
}

/// `nbdinfo --can WHAT URI` or `nbdinfo --is WHAT URI`: 0 is yes, 2 is no,
/// anything else an error (which fails the test).
fn nbdinfo_query(verb: &str, what: &str, uri: &str) -> bool {
    let mut cmd = nbdinfo();
    cmd.arg(format!("--{verb}")).arg(what).arg(uri);
    let out = output(&mut cmd);
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!(
            "`nbdinfo --{verb} {what} {uri}` failed: {}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// One extent of `nbdinfo --map --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Extent {
    start: u64,
    length: u64,
    kind: u64,
}

/// Extents from `(start, end, kind)` runs.
fn extents(runs: &[(u64, u64, u64)]) -> Vec<Extent> {
    runs.iter()
        .map(|&(start, end, kind)| Extent {
            start,
            length: end - start,
            kind,
        })
        .collect()
}

/// `nbdinfo --map[=CONTEXT] --json URI`, with neighbours of the same type
/// merged (a server may split runs wherever it likes), checked to cover
/// `[0, size)` exactly.
fn nbdinfo_map(uri: &str, context: Option<&str>, size: u64) -> Vec<Extent> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let text = run(nbdinfo().arg(&map).arg("--json").arg(uri));
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("nbdinfo {map} --json printed invalid JSON ({e}):\n{text}"));
    let mut extents: Vec<Extent> = Vec::new();
    for e in v.as_array().expect("an array of extents") {
        let extent = Extent {
            start: e["offset"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            kind: e["type"].as_u64().unwrap(),
        };
        assert!(extent.length > 0, "empty extent in {map}: {text}");
        match extents.last_mut() {
            Some(last) if last.kind == extent.kind && last.start + last.length == extent.start => {
                last.length += extent.length;
            }
            _ => extents.push(extent),
        }
    }
    let mut at = 0;
    for e in &extents {
        assert_eq!(
            e.start, at,
            "{map} has a gap or overlap at {at}: {extents:?}"
        );
        at += e.length;
    }
    assert_eq!(
        at, size,
        "{map} does not end at the export size: {extents:?}"
    );
    extents
}

/// Runs qemu-io on `uri` (format raw) with one `-c` per command; with
/// `writeback`, `-t writeback` (no FUA on writes). Fails the test if qemu-io
/// reports any failure.
fn qemu_io(uri: &str, writeback: bool, commands: &[String]) -> String {
    let mut cmd = client("qemu-io", "qemu-utils");
    cmd.args(["-f", "raw"]);
    if writeback {
        cmd.args(["-t", "writeback"]);
    }
    cmd.arg(uri);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run(&mut cmd);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// The whole export, copied out with nbdcopy into `out`.
fn dump(uri: &str, out: &Path) -> Vec<u8> {
    let _ = fs::remove_file(out);
    run(client("nbdcopy", "libnbd-bin").arg(uri).arg(out));
    fs::read(out).unwrap()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// `got == want`, reporting the first differing offset (not 8 MiB of bytes).
fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(at) = first_difference(got, want) {
        let end = (at + 16).min(got.len());
        panic!(
            "{what}: first difference at byte {at} (sector {}): got {:02x?}, want {:02x?}",
            at as u64 / SECTOR,
            &got[at..end],
            &want[at..end]
        );
    }
}

// ---------------------------------------------------------------------------
// A model of what a sequence of qemu-io commands leaves on the device.

#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        off: u64,
        len: u64,
        pat: u8,
    },
    AioWrite {
        off: u64,
        len: u64,
        pat: u8,
    },
    AioFlush,
    /// `write -z`, with `-u` (the server may punch holes) when `unmap`.
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
}

impl Op {
    fn command(&self) -> String {
        match *self {
            Op::Write { off, len, pat } => format!("write -P {pat:#04x} {off} {len}"),
            Op::AioWrite { off, len, pat } => format!("aio_write -P {pat:#04x} {off} {len}"),
            Op::AioFlush => "aio_flush".to_string(),
            Op::Zero { off, len, unmap } => {
                format!("write -z{} {off} {len}", if unmap { " -u" } else { "" })
            }
            Op::Discard { off, len } => format!("discard {off} {len}"),
            Op::Flush => "flush".to_string(),
        }
    }

    /// The range written and the byte it now reads as, for writes and zeroes.
    fn written(&self) -> Option<(Range<u64>, u8)> {
        match *self {
            Op::Write { off, len, pat } | Op::AioWrite { off, len, pat } => {
                Some((off..off + len, pat))
            }
            Op::Zero { off, len, .. } => Some((off..off + len, 0)),
            _ => None,
        }
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

fn urange(r: &Range<u64>) -> Range<usize> {
    r.start as usize..r.end as usize
}

/// The device's expected contents. A discarded range's contents are up to the
/// server (NBD promises nothing after TRIM); this model accepts, sector by
/// sector, either zeros or what was there before, which is what punching a
/// hole or ignoring the TRIM gives.
struct Model {
    data: Vec<u8>,
    trimmed: Vec<(Range<u64>, Vec<u8>)>,
}

impl Model {
    fn new(data: Vec<u8>) -> Model {
        Model {
            data,
            trimmed: Vec::new(),
        }
    }

    fn apply(&mut self, op: &Op) {
        if let Some((range, byte)) = op.written() {
            assert!(
                self.trimmed.iter().all(|(t, _)| !overlaps(t, &range)),
                "test bug: {op:?} writes over a discarded range"
            );
            self.data[urange(&range)].fill(byte);
        }
        if let Op::Discard { off, len } = *op {
            assert!(
                off % 4096 == 0 && len % 4096 == 0,
                "test bug: discard whole blocks only"
            );
            let range = off..off + len;
            let old = self.data[urange(&range)].to_vec();
            self.trimmed.push((range, old));
        }
    }

    /// `got` reads as the model says; discarded sectors read as zeros or as
    /// their old contents.
    fn check(&self, what: &str, got: &[u8]) {
        let mut want = self.data.clone();
        for (range, _) in &self.trimmed {
            for sector in (range.start..range.end).step_by(SECTOR as usize) {
                let r = urange(&(sector..sector + SECTOR));
                if got[r.clone()].iter().all(|&b| b == 0) {
                    want[r].fill(0);
                }
            }
        }
        assert_same_bytes(what, got, &want);
    }

    /// `range` minus the discarded ranges.
    fn untrimmed(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let mut parts = vec![range];
        for (t, _) in &self.trimmed {
            parts = parts
                .into_iter()
                .flat_map(|p| {
                    if !overlaps(&p, t) {
                        return vec![p];
                    }
                    [p.start..t.start.max(p.start), t.end.min(p.end)..p.end]
                        .into_iter()
                        .filter(|r| r.start < r.end)
                        .collect()
                })
                .collect();
        }
        parts
    }

    /// `read -P` commands checking every range `ops` wrote that still reads
    /// as one byte.
    fn read_checks(&self, ops: &[Op]) -> Vec<String> {
        let mut checks = Vec::new();
        for op in ops {
            let Some((range, byte)) = op.written() else {
                continue;
            };
            for part in self.untrimmed(range) {
                if self.data[urange(&part)].iter().all(|&b| b == byte) {
                    checks.push(format!(
                        "read -P {byte:#04x} {} {}",
                        part.start,
                        part.end - part.start
                    ));
                }
            }
        }
        checks
    }
}

/// Pattern writes at odd offsets and lengths (two of them sharing a sector,
/// in flight together), writes across the base's hole, zeroes with and without
/// unmap, discards of written and of never-written blocks, flushes, and the
/// device's first and last bytes.
fn qemu_io_ops() -> Vec<Op> {
    vec![
        Op::Write {
            off: 4096,
            len: 4096 + 512,
            pat: 0x11,
        },
        Op::Write {
            off: 513,
            len: 1000,
            pat: 0x22,
        },
        Op::Write {
            off: 2 * M - 700,
            len: 1500,
            pat: 0x33,
        },
        Op::Write {
            off: 4 * M + 1,
            len: 128 * K - 1,
            pat: 0x44,
        },
        Op::AioWrite {
            off: M,
            len: 64 * K,
            pat: 0x55,
        },
        Op::AioWrite {
            off: M + 64 * K + 512,
            len: 8 * K,
            pat: 0x56,
        },
        Op::AioWrite {
            off: M + 96 * K + 3,
            len: 5000,
            pat: 0x57,
        },
        Op::AioWrite {
            off: M + 96 * K + 5003,
            len: 100,
            pat: 0x58,
        },
        Op::AioFlush,
        Op::Zero {
            off: 6 * M + 4 * K,
            len: 64 * K,
            unmap: false,
        },
        Op::Zero {
            off: 6 * M + 256 * K,
            len: 128 * K,
            unmap: true,
        },
        Op::Zero {
            off: 5 * M + 100,
            len: 3000,
            unmap: true,
        },
        Op::Zero {
            off: 7 * M + 333,
            len: 777,
            unmap: false,
        },
        Op::Write {
            off: 3 * M,
            len: M,
            pat: 0x66,
        },
        Op::Discard {
            off: 3 * M + 256 * K,
            len: 128 * K,
        },
        Op::Discard {
            off: 6 * M + 512 * K,
            len: 64 * K,
        },
        Op::Flush,
        Op::Write {
            off: SIZE - 515,
            len: 515,
            pat: 0x77,
        },
        Op::Write {
            off: 0,
            len: 1,
            pat: 0x78,
        },
    ]
}

/// Runs [`qemu_io_ops`] through a server started with `--cache CACHE`, with
/// qemu-io in `-t writeback` mode or not, then checks the device live (qemu-io
/// `read -P` on a second connection, and a full nbdcopy dump against the
/// model), after a clean stop (`ubd check`, `ubd convert`), and through a
/// restarted read-only server.
fn qemu_io_scenario(cache: &str, writeback: bool) {
    let f = fixture();
    let server = f.serve(&["--cache", cache]);
    let uri = server.uri();

    let ops = qemu_io_ops();
    let mut model = Model::new(f.base_data.clone());
    for op in &ops {
        model.apply(op);
    }
    let commands: Vec<String> = ops.iter().map(Op::command).collect();
    qemu_io(&uri, writeback, &commands);

    // A second connection sees every write; untouched areas keep the base.
    let mut checks = model.read_checks(&ops);
    checks.push(format!("read -P 0x5a {} {}", 4 * M + 128 * K, 512 * K));
    checks.push(format!("read -P 0 {} {}", 2 * M + 800, 512 * K));
    qemu_io(&uri, writeback, &checks);

    let live = dump(&uri, &f.path("live.raw"));
    model.check("nbdcopy of the live export", &live);

    stop_clean(server);
    assert_clean(&f.overlay);
    let after = merged(&f.overlay, &f.path("merged.raw"));
    assert_same_bytes(
        "ubd convert after the server stopped vs the live export",
        &after,
        &live,
    );

    let server = f.serve(&["--read-only", "--cache", cache]);
    let again = dump(&server.uri(), &f.path("again.raw"));
    assert_same_bytes("a restarted server vs the first one", &again, &live);
    stop_clean(server);
    f.finish();
}

// ---------------------------------------------------------------------------
// 1. nbdinfo

#[test]
fn nbdinfo_json_and_can_report_every_advertised_flag() {
    let f = fixture();
    let server = f.serve(&[]);
    let uri = server.uri();

    let info = nbdinfo_json(&uri);
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["structured"], true, "{info:#}");
    let exports = info["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 1, "{info:#}");
    let e = &exports[0];
    assert_eq!(e["export-name"], "", "{info:#}");
    assert_eq!(e["export-size"].as_u64(), Some(SIZE), "{info:#}");
    assert_eq!(e["is_read_only"], false, "{info:#}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
        "can_fast_zero",
    ] {
        assert_eq!(e[flag], true, "{flag} in {info:#}");
    }
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{info:#}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{info:#}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * M), "{info:#}");
    let contexts: BTreeSet<&str> = e["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for c in ["base:allocation", "qemu:allocation-depth"] {
        assert!(contexts.contains(c), "{c} missing from {info:#}");
    }

    for what in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "cache",
        "df",
        "structured-reply",
    ] {
        assert!(nbdinfo_query("can", what, &uri), "nbdinfo --can {what}: no");
    }
    assert!(!nbdinfo_query("is", "read-only", &uri));

    // The human output agrees.
    let text = run(nbdinfo().arg(&uri));
    assert!(text.contains("export-size: 8388608"), "{text}");
    assert!(text.contains("can_multi_conn: true"), "{text}");

    stop_clean(server);
    f.finish();
}

/// One file given for two exports is refused at once, naming both (each
/// export would open its own device over it).
#[test]
fn one_file_for_two_exports_is_refused_naming_both() {
    let f = fixture();
    let a = format!("a={}", s(&f.overlay));
    let b = format!("b={}", s(&f.overlay));
    let (code, err) =
        common::server::serve_refused(&f.path("twice.sock"), &["--export", &a, "--export", &b]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the same file is given for exports \"a\" and \"b\""),
        "{err}"
    );
    f.finish();
}

#[test]
fn nbdinfo_list_names_every_export_and_each_serves_its_own_file() {
    let f = fixture();
    let second = f.path("second.cow");
    create_overlay(&f.base.path, &second);
    let raw = f.path("plain.raw");
    let raw_data = pseudo_random_bytes(7, (3 * M) as usize);
    fs::write(&raw, &raw_data).unwrap();

    let export_second = format!("second={}", s(&second));
    let export_plain = format!("plain={}", s(&raw));
    let server = f.serve(&[
        "--export",
        "main",
        "--export",
        &export_second,
        "--export",
        &export_plain,
    ]);

    let text = run(nbdinfo().arg("--list").arg("--json").arg(server.uri()));
    let list: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("nbdinfo --list --json printed invalid JSON ({e}):\n{text}"));
    let sizes: Vec<(String, u64)> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut sorted = sizes.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![
            ("main".to_string(), SIZE),
            ("plain".to_string(), 3 * M),
            ("second".to_string(), SIZE),
        ],
        "nbdinfo --list --json:\n{text}"
    );
    let human = run(nbdinfo().arg("--list").arg(server.uri()));
    for name in ["main", "second", "plain"] {
        assert!(human.contains(&format!("export=\"{name}\"")), "{human}");
    }

    // Each export writes its own file; the empty name reaches the first one.
    let w = |export: &str, pat: u8| {
        qemu_io(
            &server.uri_for(export),
            false,
            &[format!("write -P {pat:#04x} 0 {}", 64 * K)],
        );
    };
    w("main", 0x01);
    w("second", 0x02);
    w("plain", 0x03);
    qemu_io(
        &server.uri(),
        false,
        &[
            format!("read -P 0x01 0 {}", 64 * K),
            format!("write -P 0x04 {} {}", 64 * K, 4 * K),
        ],
    );
    qemu_io(
        &server.uri_for("second"),
        false,
        &[format!("read -P 0x02 0 {}", 64 * K)],
    );
    qemu_io(
        &server.uri_for("main"),
        false,
        &[format!("read -P 0x04 {} {}", 64 * K, 4 * K)],
    );
    let info = nbdinfo_json(&server.uri());
    assert_eq!(info["exports"][0]["export-size"].as_u64(), Some(SIZE));

    let unknown = output(nbdinfo().arg(server.uri_for("no-such-export")));
    assert!(
        !unknown.status.success(),
        "nbdinfo on an unknown export name succeeded:\n{}",
        String::from_utf8_lossy(&unknown.stdout)
    );
    // The server goes on serving after refusing a name.
    qemu_io(
        &server.uri_for("plain"),
        false,
        &[format!("read -P 0x03 0 {}", 64 * K)],
    );

    stop_clean(server);

    let mut want_main = f.base_data.clone();
    want_main[..(64 * K) as usize].fill(0x01);
    want_main[(64 * K) as usize..(68 * K) as usize].fill(0x04);
    let got = merged(&f.overlay, &f.path("main.raw"));
    assert_same_bytes("export main (the positional file)", &got, &want_main);
    let mut want_second = f.base_data.clone();
    want_second[..(64 * K) as usize].fill(0x02);
    let got = merged(&second, &f.path("second.raw"));
    assert_same_bytes("export second", &got, &want_second);
    let mut want_raw = raw_data;
    want_raw[..(64 * K) as usize].fill(0x03);
    assert_same_bytes(
        "export plain (a raw image)",
        &fs::read(&raw).unwrap(),
        &want_raw,
    );

    assert_clean(&second);
    f.finish();
}

#[test]
fn nbdinfo_map_shows_where_written_data_lives() {
    let f = fixture();
    let server = f.serve(&[]);
    let uri = server.uri();

    let ops = [
        Op::Write {
            off: 64 * K,
            len: 64 * K,
            pat: 0x11,
        },
        Op::Write {
            off: 2 * M + 512,
            len: 1000,
            pat: 0x22,
        },
        Op::Zero {
            off: 4 * M + 64 * K,
            len: 128 * K,
            unmap: true,
        },
        Op::Zero {
            off: 6 * M + 4 * K,
            len: 8 * K,
            unmap: false,
        },
        Op::Flush,
    ];
    let mut model = Model::new(f.base_data.clone());
    for op in &ops {
        model.apply(op);
    }
    // Writeback: no write carries FUA, so none copies its MiB into the
    // overlay before the FLUSH (README, the overlay's fill).
    qemu_io(&uri, true, &ops.iter().map(Op::command).collect::<Vec<_>>());

    // Depth: 1 on exactly the sectors written (a write of 1000 bytes at
    // 2M+512 touches two sectors), 2 everywhere else.
    let depth = nbdinfo_map(&uri, Some("qemu:allocation-depth"), SIZE);
    let runs = [
        (0, 64 * K, 2),
        (64 * K, 128 * K, 1),
        (128 * K, 2 * M + 512, 2),
        (2 * M + 512, 2 * M + 1536, 1),
        (2 * M + 1536, 4 * M + 64 * K, 2),
        (4 * M + 64 * K, 4 * M + 192 * K, 1),
        (4 * M + 192 * K, 6 * M + 4 * K, 2),
        (6 * M + 4 * K, 6 * M + 12 * K, 1),
        (6 * M + 12 * K, SIZE, 2),
    ];
    assert_eq!(depth, extents(&runs), "nbdinfo --map=qemu:allocation-depth");

    // base:allocation: a range flagged ZERO (2) reads as zeros; the base's
    // untouched hole is HOLE|ZERO; the range zeroed with unmap is ZERO.
    let alloc = nbdinfo_map(&uri, None, SIZE);
    for e in &alloc {
        if e.kind & 2 != 0 {
            let r = urange(&(e.start..e.start + e.length));
            assert!(
                model.data[r].iter().all(|&b| b == 0),
                "base:allocation says {e:?} reads as zeros, but data was there: {alloc:?}"
            );
        }
    }
    let kind_over = |range: Range<u64>| -> Vec<u64> {
        alloc
            .iter()
            .filter(|e| overlaps(&(e.start..e.start + e.length), &range))
            .map(|e| e.kind)
            .collect()
    };
    let hole = kind_over(2 * M + 4 * K..4 * M);
    assert!(
        hole.iter().all(|&k| k == 3),
        "the base's hole is not hole,zero: {alloc:?}"
    );
    let zeroed = kind_over(4 * M + 64 * K..4 * M + 192 * K);
    assert!(
        zeroed.iter().all(|&k| k & 2 != 0),
        "the range written with write -z -u is not zero: {alloc:?}"
    );
    let data = kind_over(64 * K..128 * K);
    assert!(
        data.iter().all(|&k| k == 0),
        "written data is not data: {alloc:?}"
    );

    // The human form of the depth map names both kinds.
    let text = run(nbdinfo().arg("--map=qemu:allocation-depth").arg(&uri));
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("1")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().nth(2) == Some("2")),
        "{text}"
    );

    stop_clean(server);
    f.finish();
}

// ---------------------------------------------------------------------------
// 2. qemu-io

#[test]
fn qemu_io_fua_writes_cache_none() {
    qemu_io_scenario("none", false);
}

#[test]
fn qemu_io_writeback_cache_none() {
    qemu_io_scenario("none", true);
}

#[test]
fn qemu_io_fua_writes_cache_writeback() {
    qemu_io_scenario("writeback", false);
}

#[test]
fn qemu_io_writeback_cache_writeback() {
    qemu_io_scenario("writeback", true);
}

// ---------------------------------------------------------------------------
// 3. qemu-img

#[test]
fn qemu_img_compare_and_map_against_a_reference_image() {
    let f = fixture();
    let server = f.serve(&[]);
    let uri = server.uri();

    let ops = [
        Op::Write {
            off: 12_345,
            len: 54_321,
            pat: 0xa1,
        },
        Op::Write {
            off: 2 * M - 4 * K,
            len: 12 * K,
            pat: 0xa2,
        },
        Op::Zero {
            off: 4 * M + 100,
            len: 200 * K,
            unmap: true,
        },
        Op::Zero {
            off: 7 * M,
            len: 256 * K,
            unmap: false,
        },
        Op::Write {
            off: SIZE - 1,
            len: 1,
            pat: 0xa3,
        },
    ];
    qemu_io(&uri, true, &ops.iter().map(Op::command).collect::<Vec<_>>());

    // The reference: a copy of the base with the same writes, by std::fs.
    let reference = f.path("reference.img");
    fs::copy(&f.base.path, &reference).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&reference).unwrap();
    for op in &ops {
        let (range, byte) = op.written().unwrap();
        file.write_all_at(&vec![byte; (range.end - range.start) as usize], range.start)
            .unwrap();
    }
    drop(file);

    let qemu_img = || client("qemu-img", "qemu-utils");
    let same = run(qemu_img()
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&reference)
        .arg(&uri));
    assert!(same.contains("Images are identical"), "{same}");

    // One byte changed in the reference is found, at the right offset.
    let at = 3 * M + 777;
    let file = fs::OpenOptions::new().write(true).open(&reference).unwrap();
    file.write_all_at(&[0xee], at).unwrap();
    drop(file);
    let differ = output(
        qemu_img()
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&reference)
            .arg(&uri),
    );
    let stdout = String::from_utf8_lossy(&differ.stdout);
    assert_eq!(differ.status.code(), Some(1), "qemu-img compare: {stdout}");
    // qemu-img names the first differing sector's offset.
    assert!(
        stdout.contains(&format!(
            "Content mismatch at offset {}!",
            at / SECTOR * SECTOR
        )),
        "qemu-img compare should find the byte changed at {at}: {stdout}"
    );
    let mut want = fs::read(&reference).unwrap();
    want[at as usize] = f.base_data[at as usize];

    // qemu-img map through the server: contiguous, never "zero" over data,
    // and the base's untouched hole is zero.
    let text = run(qemu_img()
        .args(["map", "--output=json", "-f", "raw"])
        .arg(&uri));
    let map: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("qemu-img map printed invalid JSON ({e}):\n{text}"));
    let mut at = 0;
    let mut zero_runs = Vec::new();
    for e in map.as_array().expect("an array") {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        assert_eq!(start, at, "qemu-img map has a gap: {text}");
        at += length;
        if e["zero"] == true {
            let r = urange(&(start..start + length));
            assert!(
                want[r].iter().all(|&b| b == 0),
                "qemu-img map says {start}+{length} is zero, but data is there: {text}"
            );
            zero_runs.push(start..start + length);
        } else {
            assert_eq!(e["data"], true, "neither data nor zero: {text}");
        }
    }
    assert_eq!(at, SIZE, "qemu-img map does not cover the export: {text}");
    let hole = 2 * M + 8 * K..4 * M;
    assert!(
        zero_runs
            .iter()
            .any(|z| z.start <= hole.start && hole.end <= z.end),
        "qemu-img map does not show the base's hole as zero: {text}"
    );

    stop_clean(server);
    let after = merged(&f.overlay, &f.path("merged.raw"));
    assert_same_bytes("ubd convert vs the reference image", &after, &want);
    f.finish();
}

// ---------------------------------------------------------------------------
// 4. nbdcopy

#[test]
fn nbdcopy_four_connections_in_and_out() {
    let f = fixture();
    // Random data with a sparse zero MiB (over the base's random data) and a
    // zero MiB written out as zeros.
    let src = f.path("src.raw");
    let mut data = pseudo_random_bytes(11, SIZE as usize);
    data[M as usize..(2 * M) as usize].fill(0);
    data[(5 * M) as usize..(6 * M) as usize].fill(0);
    let file = File::create(&src).unwrap();
    for range in [0..M, 2 * M..SIZE] {
        file.write_all_at(&data[urange(&range)], range.start)
            .unwrap();
    }
    file.set_len(SIZE).unwrap();
    drop(file);
    let want = sha256_hex(&data);

    let server = f.serve(&[]);
    let uri = server.uri();
    let nbdcopy = || client("nbdcopy", "libnbd-bin");
    run(nbdcopy()
        .args(["--connections=4", "--flush"])
        .arg(&src)
        .arg(&uri));
    let out = f.path("out.raw");
    run(nbdcopy().arg("--connections=4").arg(&uri).arg(&out));
    let got = fs::read(&out).unwrap();
    assert_eq!(
        sha256_hex(&got),
        want,
        "nbdcopy out differs from what nbdcopy copied in"
    );
    assert_same_bytes("nbdcopy out", &got, &data);

    stop_clean(server);
    let after = merged(&f.overlay, &f.path("merged.raw"));
    assert_eq!(
        sha256_hex(&after),
        want,
        "ubd convert after the copy differs"
    );
    f.finish();
}

// ---------------------------------------------------------------------------
// 5. fio

/// Runs fio's nbd engine on `uri` with 4 jobs, each on its own 8 MiB region,
/// and returns the per-job JSON (after checking fio's exit status and that no
/// job reports an error).
fn fio(uri: &str, dir: &Path, name: &str, extra: &[&str]) -> Vec<Value> {
    let out = dir.join(format!("{name}.json"));
    // fio saves verify state files in its working directory: keep them in
    // the test's.
    run(client("fio", "fio")
        .current_dir(dir)
        .arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args([
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=4",
            "--size=8M",
            "--offset_increment=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--group_reporting=0",
            "--output-format=json",
        ])
        .arg(format!("--output={}", out.display()))
        .args(extra));
    let text = fs::read_to_string(&out).unwrap();
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("fio wrote invalid JSON ({e}):\n{text}"));
    let jobs = v["jobs"].as_array().expect("jobs").clone();
    assert_eq!(jobs.len(), 4, "fio ran {} jobs:\n{text}", jobs.len());
    for job in &jobs {
        assert_eq!(job["error"].as_u64(), Some(0), "fio job failed:\n{job:#}");
    }
    jobs
}

fn io_bytes(job: &Value, dir: &str) -> u64 {
    job[dir]["io_bytes"].as_u64().unwrap()
}

#[test]
fn fio_nbd_engine_verifies_crc32c_with_four_jobs_at_qd32() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.img");
    File::create(&base_path).unwrap().set_len(32 * M).unwrap();
    let base = Base::record(&base_path);
    let overlay = dir.path().join("disk.cow");
    create_overlay(&base_path, &overlay);
    let socket = dir.path().join("nbd.sock");

    let server = Server::start(&socket, &[s(&overlay), "--cache", "none"]);
    // randwrite writes each 4 KiB block of its region once, then reads it
    // all back and checks the crc32c in every block.
    let jobs = fio(
        &server.uri(),
        dir.path(),
        "randwrite",
        &["--rw=randwrite", "--do_verify=1"],
    );
    for job in &jobs {
        assert_eq!(io_bytes(job, "write"), 8 * M, "{job:#}");
        assert_eq!(io_bytes(job, "read"), 8 * M, "verify did not read: {job:#}");
    }
    stop_clean(server);
    assert_clean(&overlay);

    // What fio wrote survived the stop: a new server, fio's verify-only pass.
    let server = Server::start(&socket, &[s(&overlay), "--cache", "writeback"]);
    let jobs = fio(
        &server.uri(),
        dir.path(),
        "randwrite",
        &["--rw=randwrite", "--verify_only=1"],
    );
    for job in &jobs {
        assert_eq!(io_bytes(job, "read"), 8 * M, "verify did not read: {job:#}");
    }

    // Mixed 70/30 random writes and reads; verification reads back every
    // written block, so reads are at least the writes.
    let jobs = fio(
        &server.uri(),
        dir.path(),
        "randrw",
        &["--rw=randrw", "--rwmixwrite=70", "--do_verify=1"],
    );
    for job in &jobs {
        let (w, r) = (io_bytes(job, "write"), io_bytes(job, "read"));
        assert!(
            w > 0 && r >= w,
            "verify did not read back the writes: {job:#}"
        );
    }
    stop_clean(server);

    base.assert_unchanged();
    assert_clean(&overlay);
}

// ---------------------------------------------------------------------------
// 6. The server's command line

#[test]
fn a_second_server_on_the_same_overlay_fails_with_a_lock_message() {
    let f = fixture();
    let server = f.serve(&[]);
    let other = f.path("other.sock");
    let other_pid = f.path("other.pid");
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60"])
        .arg(ubd_bin())
        .arg("serve")
        .arg(&f.overlay)
        .arg("--socket")
        .arg(&other)
        .arg("--pid-file")
        .arg(&other_pid);
    let out = output(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a second ubd serve on a served overlay: {}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.to_lowercase().contains("lock"),
        "the message does not mention the lock:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("process {} holds", server.pid())),
        "the message does not name the first server ({}):\n{stderr}",
        server.pid()
    );
    assert!(!other.exists(), "the refused server left {other:?} behind");
    assert!(
        !other_pid.exists(),
        "the refused server left its pid file behind"
    );

    // The first server is unharmed.
    qemu_io(
        &server.uri(),
        false,
        &["write -P 0x31 0 4096".into(), "read -P 0x31 0 4096".into()],
    );
    stop_clean(server);
    f.finish();
}

/// A raw image being served is locked as an overlay is: a second server,
/// `create --force` and a `commit` into it are refused while it is served,
/// naming the server, and the image keeps what the client wrote.
#[test]
fn a_served_raw_image_is_locked_against_other_writers() {
    let dir = TempDir::new().unwrap();
    let raw = dir.path().join("raw.img");
    run(ubd().arg("create").arg(&raw).arg("1M"));
    let cow = dir.path().join("over.cow");
    run(ubd().args(["create", "--backing"]).arg(&raw).arg(&cow));
    let recorded = fs::metadata(&raw).unwrap().modified().unwrap();
    let server = Server::start(&dir.path().join("raw.sock"), &[raw.as_os_str()]);
    qemu_io(&server.uri(), false, &["write -P 0x5a 0 65536".into()]);
    // The mtime the overlay recorded, so that the commit's own checks pass
    // and it comes to the lock.
    fs::File::options()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_modified(recorded)
        .unwrap();
    let held = format!("process {} holds", server.pid());

    let (code, stderr) =
        common::server::serve_refused(&dir.path().join("other.sock"), &[raw.as_os_str()]);
    assert_eq!(
        code,
        Some(1),
        "a second server on a served raw image: {stderr}"
    );
    assert!(stderr.contains(&held), "{stderr}");
    for args in [
        vec!["create", "--force", raw.to_str().unwrap(), "64K"],
        vec!["commit", cow.to_str().unwrap()],
    ] {
        let out = output(ubd().args(&args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "ubd {args:?}: {stderr}");
        assert!(stderr.contains(&held), "ubd {args:?}: {stderr}");
    }
    stop_clean(server);
    let data = fs::read(&raw).unwrap();
    assert_eq!(data.len(), 1 << 20);
    assert!(data[..65536].iter().all(|&b| b == 0x5a));
}

const CONNECTED_CLIENT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(bytes([int(sys.argv[2], 0)]) * 8192, int(sys.argv[3]))
print("ready", flush=True)
sys.stdin.read()
"#;

/// Connects a python3-libnbd client that writes 8 KiB of `pat` at `off`
/// without flushing and then stays connected; sends `signal_name` to the
/// server, which must exit 0, remove its socket, and have flushed the write.
fn signal_with_a_client_connected(signal_name: &str, pat: u8, off: u64) {
    let f = fixture();
    let mut server = f.serve(&[]);
    let socket = server.socket().to_path_buf();

    let mut python = python();
    python
        .arg("-c")
        .arg(CONNECTED_CLIENT)
        .arg(server.uri())
        .arg(format!("{pat:#04x}"))
        .arg(off.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut client = python.spawn().expect("start python3");
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.trim() != "ready" {
        let _ = client.kill();
        let mut err = String::new();
        let _ = client.stderr.as_mut().unwrap().read_to_string(&mut err);
        panic!("the python3-libnbd client did not connect and write:\n{err}");
    }

    signal(server.pid(), signal_name);
    let status = server.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "ubd serve exited with {status} on SIG{signal_name} with a client connected"
    );
    assert!(
        !socket.exists(),
        "ubd serve left its socket behind after SIG{signal_name}"
    );
    drop(client.stdin.take());
    common::waited(&mut client, "the python3 client", Duration::from_secs(60));

    let got = merged(&f.overlay, &f.path("merged.raw"));
    let mut want = f.base_data.clone();
    want[urange(&(off..off + 8192))].fill(pat);
    assert_same_bytes(
        &format!("the unflushed write after SIG{signal_name}"),
        &got,
        &want,
    );
    f.finish();
}

#[test]
fn sigterm_with_a_client_connected_exits_0_and_removes_the_socket() {
    signal_with_a_client_connected("TERM", 0xc1, 3 * M + 512);
}

#[test]
fn sigint_with_a_client_connected_exits_0_and_removes_the_socket() {
    signal_with_a_client_connected("INT", 0xc2, 5 * M - 4096);
}

#[test]
fn pid_file_holds_the_pid_and_goes_at_exit() {
    let f = fixture();
    let pid_file = f.path("ubd.pid");
    let server = f.serve(&["--pid-file", s(&pid_file)]);
    // Written once serving; the socket may accept a moment before, so wait
    // (up to 20 s) for it to hold the pid.
    let start = Instant::now();
    let mut text = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        text = fs::read_to_string(&pid_file).unwrap_or_default();
        if text.trim().parse::<u32>().ok() == Some(server.pid()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        text.trim().parse::<u32>().ok(),
        Some(server.pid()),
        "{} holds {text:?}",
        pid_file.display()
    );
    stop_clean(server);
    assert!(!pid_file.exists(), "the pid file is left after exit");
    f.finish();
}

/// Stops a forked server (not our child) with SIGTERM and waits until it
/// is gone.
fn stop_forked(pid: u32) {
    signal(pid, "TERM");
    let start = Instant::now();
    while fs::metadata(format!("/proc/{pid}")).is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the server outlived SIGTERM by 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `ubd serve --fork` printed, and the pid its pid file names, once
/// the command succeeded.
fn forked(out: &std::process::Output, pid_file: &Path) -> (String, u32) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ubd serve --fork: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = fs::read_to_string(pid_file)
        .unwrap_or_default()
        .trim()
        .parse()
        .expect("the pid file holds a pid once the command returned");
    (stdout, pid)
}

#[test]
fn fork_returns_once_serving_and_the_daemon_stops_on_sigterm() {
    let f = fixture();
    let (socket, pid_file, log) = (f.socket(), f.path("ubd.pid"), f.path("ubd.log"));
    // Under `timeout`: a server that kept the command's stdout or stderr
    // open would hold up `output()` until then, and fail the test.
    let out = output(
        Command::new("timeout")
            .arg("30")
            .arg(ubd_bin())
            .args(["serve", s(&f.overlay), "--fork", "--socket", s(&socket)])
            .args(["--pid-file", s(&pid_file), "--log-file", s(&log)]),
    );
    // Serving already, with no wait: the pid file and the socket are there.
    let (stdout, pid) = forked(&out, &pid_file);
    assert!(stdout.contains("serving the default export"), "{stdout}");
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("the server runs");
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(
        fields[3],
        pid.to_string(),
        "the server leads its own session: {stat}"
    );
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let mut want = f.base_data.clone();
    want[65536..196608].fill(0x6b);
    qemu_io(&uri, false, &["write -P 0x6b 64k 128k".to_string()]);
    assert_same_bytes(
        "through the forked server",
        &dump(&uri, &f.path("out.raw")),
        &want,
    );

    stop_forked(pid);
    assert!(
        !socket.exists() && !pid_file.exists(),
        "socket or pid file left behind"
    );
    let log = fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("connection open") && log.contains("stopped"),
        "log:\n{log}"
    );
    assert_same_bytes(
        "after the daemon stopped",
        &merged(&f.overlay, &f.path("m.raw")),
        &want,
    );
    f.finish();

    // One that cannot start: the command says why and fails, and nothing
    // is left running on the socket.
    let out = output(Command::new("timeout").arg("30").arg(ubd_bin()).args([
        "serve",
        s(&f.path("missing.cow")),
        "--fork",
        "--socket",
        s(&socket),
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("missing.cow"), "stderr:\n{stderr}");
    assert!(!socket.exists());
}

const READ_ONLY_CLIENT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
print("read-only", h.is_read_only())
for name, call in [("write", lambda: h.pwrite(b"x" * 4096, 0)),
                   ("zero", lambda: h.zero(4096, 8192)),
                   ("trim", lambda: h.trim(4096, 16384))]:
    try:
        call()
        print(name, "ok")
    except nbd.Error as e:
        print(name, "errno", e.errnum)
"#;

#[test]
fn read_only_refuses_writes_and_leaves_the_overlay_alone() {
    let f = fixture();
    let server = f.serve(&[]);
    qemu_io(
        &server.uri(),
        false,
        &[format!("write -P 0x42 {} {}", 64 * K, 64 * K)],
    );
    stop_clean(server);
    let before = sha256_hex(&fs::read(&f.overlay).unwrap());

    let server = f.serve(&["--read-only"]);
    let uri = server.uri();
    let info = nbdinfo_json(&uri);
    let e = &info["exports"][0];
    assert_eq!(e["is_read_only"], true, "{info:#}");
    for flag in ["can_trim", "can_zero", "can_fua"] {
        assert_eq!(e[flag], false, "{flag} on a read-only export: {info:#}");
    }
    assert!(nbdinfo_query("is", "read-only", &uri));
    for what in ["write", "trim", "zero", "fua"] {
        assert!(
            !nbdinfo_query("can", what, &uri),
            "nbdinfo --can {what} on a read-only export: yes"
        );
    }

    // qemu-io cannot write (it refuses to open read-write, or the write fails).
    let out = output(
        client("qemu-io", "qemu-utils")
            .args(["-f", "raw"])
            .arg(&uri)
            .args(["-c", "write -P 0x99 0 4096"]),
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "qemu-io wrote to a read-only export:\n{all}"
    );
    assert!(
        all.contains("Permission denied") || all.contains("Operation not permitted"),
        "qemu-io failed, but not with a permission error:\n{all}"
    );

    // Sent anyway (libnbd's strict mode off), each write is refused with EPERM.
    let answers = run(python().arg("-c").arg(READ_ONLY_CLIENT).arg(&uri));
    assert_eq!(
        answers.lines().collect::<Vec<_>>(),
        [
            "read-only True",
            "write errno 1",
            "zero errno 1",
            "trim errno 1"
        ],
        "python3-libnbd against --read-only"
    );

    // Reads still work (qemu-io -r), and show the earlier write.
    let _ = run(client("qemu-io", "qemu-utils")
        .args(["-r", "-f", "raw"])
        .arg(&uri)
        .args(["-c", &format!("read -P 0x42 {} {}", 64 * K, 64 * K)]));
    stop_clean(server);

    assert_eq!(
        sha256_hex(&fs::read(&f.overlay).unwrap()),
        before,
        "serving --read-only changed the overlay"
    );
    f.finish();
}

/// The TCP sockets process `pid` has open, as (local port, state) from
/// `/proc/PID/net/tcp{,6}` matched by inode against `/proc/PID/fd`. State 0x0a
/// is LISTEN.
fn tcp_sockets_of(pid: u32) -> Vec<(u16, u8)> {
    let mut inodes = BTreeSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(target) = fs::read_link(entry.unwrap().path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            inodes.insert(inode);
        }
    }
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let Ok(inode) = cols[9].parse::<u64>() else {
                continue;
            };
            if inode != 0 && inodes.contains(&inode) {
                let port = cols[1].rsplit(':').next().unwrap();
                found.push((
                    u16::from_str_radix(port, 16).unwrap(),
                    u8::from_str_radix(cols[3], 16).unwrap(),
                ));
            }
        }
    }
    found
}

#[test]
fn tcp_only_with_bind() {
    let f = fixture();

    let server = f.serve(&[]);
    let tcp = tcp_sockets_of(server.pid());
    assert!(
        tcp.is_empty(),
        "ubd serve without --bind has TCP sockets: {tcp:?}"
    );
    stop_clean(server);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_arg = port.to_string();
    let server = f.serve(&["--bind", "127.0.0.1", "--port", &port_arg]);
    let tcp = tcp_sockets_of(server.pid());
    assert!(
        tcp.contains(&(port, 0x0a)),
        "ubd serve --bind 127.0.0.1 --port {port} does not listen there: {tcp:?}"
    );
    let uri = format!("nbd://127.0.0.1:{port}");
    let info = nbdinfo_json(&uri);
    assert_eq!(
        info["exports"][0]["export-size"].as_u64(),
        Some(SIZE),
        "{info:#}"
    );
    qemu_io(
        &uri,
        false,
        &[
            format!("write -P 0x71 {} 4096", M + 512),
            format!("read -P 0x71 {} 4096", M + 512),
        ],
    );
    // The Unix socket is served too and sees the same device.
    qemu_io(
        &server.uri(),
        false,
        &[format!("read -P 0x71 {} 4096", M + 512)],
    );
    stop_clean(server);

    let got = merged(&f.overlay, &f.path("merged.raw"));
    let mut want = f.base_data.clone();
    want[urange(&(M + 512..M + 512 + 4096))].fill(0x71);
    assert_same_bytes("the write over TCP", &got, &want);
    f.finish();
}

/// Binds and listens on a Unix socket, moves it to fd 3, sets LISTEN_PID to
/// its own pid and LISTEN_FDS=1, and execs `ubd serve ARGS...` (same pid).
const ACTIVATE: &str = r#"
import os, socket, sys
path, ubd = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
env.pop("LISTEN_FDNAMES", None)
os.execve(ubd, [ubd, "serve"] + sys.argv[3:], env)
"#;

#[test]
fn socket_activation_serves_the_inherited_socket() {
    let f = fixture();
    let socket = f.path("activated.sock");
    let mut server = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(ACTIVATE)
        .arg(&socket)
        .arg(ubd_bin())
        .arg(&f.overlay)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3");
    let start = Instant::now();
    while !socket.exists() {
        if let Some(status) = server.try_wait().unwrap() {
            let mut err = String::new();
            let _ = server.stderr.as_mut().unwrap().read_to_string(&mut err);
            panic!("the activated server exited with {status}:\n{err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let info = nbdinfo_json(&uri);
    assert_eq!(
        info["exports"][0]["export-size"].as_u64(),
        Some(SIZE),
        "{info:#}"
    );
    qemu_io(
        &uri,
        false,
        &[
            format!("write -P 0x81 {} 8192", 6 * M),
            format!("read -P 0x81 {} 8192", 6 * M),
        ],
    );

    signal(server.id(), "TERM");
    let status = common::waited(&mut server, "the activated server", Duration::from_secs(60));
    let mut err = String::new();
    let _ = server.stderr.as_mut().unwrap().read_to_string(&mut err);
    assert!(
        status.success(),
        "the activated server exited with {status}:\n{err}"
    );
    // No --socket, --bind or --port was given: nothing to warn about.
    assert!(!err.contains("are ignored"), "{err}");

    let got = merged(&f.overlay, &f.path("merged.raw"));
    let mut want = f.base_data.clone();
    want[urange(&(6 * M..6 * M + 8192))].fill(0x81);
    assert_same_bytes("the write through the activated socket", &got, &want);
    f.finish();
}

/// Puts one end of a socket pair (a connection, as systemd passes with
/// Accept=yes) at fd 3 and execs `ubd serve ARGS...` as activated.
const ACTIVATE_CONNECTED: &str = r#"
import os, socket, sys
ubd = sys.argv[1]
a, b = socket.socketpair()
os.dup2(a.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execve(ubd, [ubd, "serve"] + sys.argv[2:], env)
"#;

/// A socket passed by activation that is not listening (a connection) is
/// refused at start, with a message saying what to pass.
#[test]
fn socket_activation_refuses_a_socket_that_is_not_listening() {
    let f = fixture();
    let out = output(
        Command::new("timeout")
            .args(["-k", "5", "20"])
            .arg("/usr/bin/python3")
            .arg("-c")
            .arg(ACTIVATE_CONNECTED)
            .arg(ubd_bin())
            .arg(&f.overlay),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a listening stream socket"), "{err}");
    f.finish();
}

/// A server that fails to start after it made its Unix socket (a TCP port
/// in use, a pid file it cannot write) removes the socket file.
#[test]
fn a_server_that_fails_to_start_leaves_no_socket_file() {
    let f = fixture();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let socket = f.path("failed.sock");
    for extra in [
        vec!["--port", port.as_str()],
        vec!["--pid-file", "/nonexistent/dir/ubd.pid"],
    ] {
        let out = output(
            Command::new("timeout")
                .args(["-k", "5", "60"])
                .arg(ubd_bin())
                .arg("serve")
                .arg(&f.overlay)
                .arg("--socket")
                .arg(&socket)
                .args(&extra),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(
            !socket.exists(),
            "{extra:?}: the socket file is left: {err}"
        );
    }
    drop(busy);
    f.finish();
}

// ---------------------------------------------------------------------------
// 8. Durability across connections, a small pool, names, --backing, a
// partial last sector, and SIGTERM under load.

/// Connection A writes two ranges without FUA; connection B flushes; then A
/// writes a third range and nobody flushes it.
const MULTI_CONN_CLIENT: &str = r#"
import nbd, sys
uri = sys.argv[1]
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
assert a.can_multi_conn() and b.can_multi_conn()
a.pwrite(b"\xd1" * 65536, 2 * 1024 * 1024 + 4096)
a.pwrite(b"\xd2" * 1000, 513)
b.flush()
a.pwrite(b"\xd3" * 65536, 4 * 1024 * 1024 + 8192)
print("ready", flush=True)
sys.stdin.read()
"#;

#[test]
fn a_flush_on_one_connection_covers_another_connections_writes_across_sigkill() {
    let f = fixture();
    let server = f.serve(&[]);
    let mut python = python();
    python
        .arg("-c")
        .arg(MULTI_CONN_CLIENT)
        .arg(server.uri())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut client = python.spawn().expect("start python3");
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.trim() != "ready" {
        let _ = client.kill();
        let mut err = String::new();
        let _ = client.stderr.as_mut().unwrap().read_to_string(&mut err);
        panic!("the python3-libnbd client failed:\n{err}");
    }
    // No clean shutdown: whatever was not flushed may be lost.
    server.kill();
    drop(client.stdin.take());
    common::waited(&mut client, "the python3 client", Duration::from_secs(60));

    assert_clean(&f.overlay);
    let got = merged(&f.overlay, &f.path("merged.raw"));
    let mut want = f.base_data.clone();
    want[urange(&(2 * M + 4096..2 * M + 4096 + 65536))].fill(0xd1);
    want[513..1513].fill(0xd2);
    // The unflushed write reads, sector by sector, as old or new data,
    // never as zeros.
    let unflushed = 4 * M + 8192..4 * M + 8192 + 65536;
    for sector in unflushed.clone().step_by(SECTOR as usize) {
        let r = urange(&(sector..sector + SECTOR));
        if got[r.clone()].iter().all(|&b| b == 0xd3) {
            want[r].fill(0xd3);
        }
    }
    assert_same_bytes(
        "after SIGKILL: writes on connection A flushed by connection B, then an unflushed one",
        &got,
        &want,
    );
    f.base.assert_unchanged();
}

#[test]
fn a_pool_smaller_than_a_request_still_serves_32_mib_requests() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.img");
    let size = 40 * M;
    let base_data = pseudo_random_bytes(21, size as usize);
    fs::write(&base_path, &base_data).unwrap();
    let base = Base::record(&base_path);
    let overlay = dir.path().join("disk.cow");
    create_overlay(&base_path, &overlay);
    let socket = dir.path().join("nbd.sock");

    let server = Server::start(&socket, &[s(&overlay), "--pool-size", "1M"]);
    let ops = [
        Op::Write {
            off: 1000,
            len: 32 * M,
            pat: 0x21,
        },
        Op::Write {
            off: 33 * M,
            len: 7 * M - 1,
            pat: 0x22,
        },
        Op::Zero {
            off: 4 * M + 7,
            len: 20 * M,
            unmap: true,
        },
    ];
    let mut model = Model::new(base_data);
    for op in &ops {
        model.apply(op);
    }
    qemu_io(
        &server.uri(),
        false,
        &ops.iter().map(Op::command).collect::<Vec<_>>(),
    );
    // The first write is split by the zeroes: check its two ends.
    let mut checks = model.read_checks(&ops);
    checks.push(format!("read -P 0x21 1000 {}", 4 * M + 7 - 1000));
    checks.push(format!(
        "read -P 0x21 {} {}",
        24 * M + 7,
        32 * M + 1000 - (24 * M + 7)
    ));
    qemu_io(&server.uri(), true, &checks);
    let out = dir.path().join("out.raw");
    let _ = fs::remove_file(&out);
    run(client("nbdcopy", "libnbd-bin")
        .args(["--connections=2", "--request-size=33554432"])
        .arg(server.uri())
        .arg(&out));
    model.check(
        "nbdcopy with 32 MiB requests through a 1 MiB pool",
        &fs::read(&out).unwrap(),
    );
    stop_clean(server);
    base.assert_unchanged();
    assert_clean(&overlay);
}

#[test]
fn without_a_positional_file_the_empty_name_reaches_the_first_export() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.img");
    let two = dir.path().join("two.img");
    run(ubd().arg("create").arg(&one).arg("1M"));
    run(ubd().arg("create").arg(&two).arg("2M"));
    let socket = dir.path().join("nbd.sock");
    let a = format!("a={}", s(&one));
    let b = format!("b={}", s(&two));
    let server = Server::start(&socket, &["--export", &a, "--export", &b]);

    let text = run(nbdinfo().arg("--list").arg("--json").arg(server.uri()));
    let list: Value = serde_json::from_str(&text).unwrap();
    let mut names: Vec<&str> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"], "{text}");
    assert_eq!(
        nbdinfo_json(&server.uri())["exports"][0]["export-size"].as_u64(),
        Some(M),
        "the empty name does not reach export a"
    );
    qemu_io(&server.uri(), false, &["write -P 0x61 512 1000".into()]);
    qemu_io(
        &server.uri_for("b"),
        false,
        &["write -P 0x62 1536 1000".into()],
    );
    // Raw images are all "this image": depth 1 everywhere.
    let depth = nbdinfo_map(&server.uri_for("b"), Some("qemu:allocation-depth"), 2 * M);
    assert_eq!(
        depth,
        [Extent {
            start: 0,
            length: 2 * M,
            kind: 1
        }],
        "allocation depth of a raw export"
    );
    stop_clean(server);

    let got = fs::read(&one).unwrap();
    let mut want = vec![0u8; M as usize];
    want[512..1512].fill(0x61);
    assert_same_bytes("export a (reached by the empty name)", &got, &want);
    let got = fs::read(&two).unwrap();
    let mut want = vec![0u8; (2 * M) as usize];
    want[1536..2536].fill(0x62);
    assert_same_bytes("export b", &got, &want);
}

#[test]
fn backing_option_serves_an_overlay_whose_base_moved() {
    let f = fixture();
    let moved_dir = f.path("moved");
    fs::create_dir(&moved_dir).unwrap();
    let moved = moved_dir.join("base.img");
    // rename keeps the mtime the overlay recorded.
    fs::rename(&f.base.path, &moved).unwrap();
    let server = f.serve(&["--backing", s(&moved)]);
    qemu_io(
        &server.uri(),
        false,
        &[format!("write -P 0x91 {} 4096", 5 * M)],
    );
    let live = dump(&server.uri(), &f.path("live.raw"));
    let mut want = f.base_data.clone();
    want[urange(&(5 * M..5 * M + 4096))].fill(0x91);
    assert_same_bytes("an overlay served with --backing", &live, &want);
    stop_clean(server);

    let moved_base = Base {
        path: moved.clone(),
        sha: f.base.sha.clone(),
        mtime: f.base.mtime,
    };
    moved_base.assert_unchanged();
    run(ubd()
        .arg("check")
        .arg("--backing")
        .arg(&moved)
        .arg(&f.overlay));
}

#[test]
fn a_partial_last_sector_of_the_base_reads_as_a_zero_tail_of_depth_0() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.img");
    let base_len = 1_000_000u64;
    let base_data = pseudo_random_bytes(31, base_len as usize);
    fs::write(&base_path, &base_data).unwrap();
    let base = Base::record(&base_path);
    let overlay = dir.path().join("disk.cow");
    create_overlay(&base_path, &overlay);
    let socket = dir.path().join("nbd.sock");
    let server = Server::start(&socket, &[s(&overlay)]);
    let uri = server.uri();

    let size = nbdinfo_json(&uri)["exports"][0]["export-size"]
        .as_u64()
        .unwrap();
    assert_eq!(size, base_len.div_ceil(SECTOR) * SECTOR, "export size");
    let depth = nbdinfo_map(&uri, Some("qemu:allocation-depth"), size);
    assert_eq!(
        depth,
        [
            Extent {
                start: 0,
                length: base_len,
                kind: 2
            },
            Extent {
                start: base_len,
                length: size - base_len,
                kind: 0
            },
        ],
        "allocation depth over a base with a partial last sector"
    );
    let alloc = nbdinfo_map(&uri, None, size);
    assert!(
        alloc
            .iter()
            .filter(|e| e.start + e.length > base_len)
            .all(|e| e.kind & 2 != 0 || e.start < base_len),
        "the tail past the base is not zero: {alloc:?}"
    );
    let mut want = base_data.clone();
    want.resize(size as usize, 0);
    assert_same_bytes("the export", &dump(&uri, &dir.path().join("a.raw")), &want);

    // A write across the base's end lands in the overlay's last sectors
    // (writeback: without FUA it does not copy its MiB).
    qemu_io(
        &uri,
        true,
        &[format!("write -P 0x51 {} 300", base_len - 100)],
    );
    want[urange(&(base_len - 100..base_len + 200))].fill(0x51);
    assert_same_bytes(
        "after a write across the end",
        &dump(&uri, &dir.path().join("b.raw")),
        &want,
    );
    let depth = nbdinfo_map(&uri, Some("qemu:allocation-depth"), size);
    let last_sectors = (base_len - 100) / SECTOR * SECTOR;
    assert_eq!(
        depth,
        [
            Extent {
                start: 0,
                length: last_sectors,
                kind: 2
            },
            Extent {
                start: last_sectors,
                length: size - last_sectors,
                kind: 1
            },
        ],
        "allocation depth after a write across the base's end"
    );
    stop_clean(server);
    base.assert_unchanged();
    assert_clean(&overlay);
}

#[test]
fn sigterm_under_fio_load_exits_0_and_leaves_a_clean_overlay() {
    let f = fixture();
    let server = f.serve(&[]);
    let mut fio = client("fio", "fio");
    fio.current_dir(f.dir.path())
        .arg("--name=load")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", server.uri()))
        .args([
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            "--size=2M",
            "--offset_increment=2M",
            "--time_based=1",
            "--runtime=60",
        ])
        .arg(format!("--output={}", f.path("load.txt").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut load = fio.spawn().expect("start fio");
    // Give fio a moment to connect and get requests in flight; nothing below
    // depends on whether it did.
    std::thread::sleep(Duration::from_secs(2));
    let socket = server.socket().to_path_buf();
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "ubd serve exited with {status} on SIGTERM under load\nstderr:\n{stderr}"
    );
    assert!(
        !socket.exists(),
        "the socket is left after SIGTERM under load"
    );
    common::waited(
        &mut load,
        "fio after the server stopped",
        Duration::from_secs(120),
    );
    assert_clean(&f.overlay);

    // It serves again, and areas fio did not touch (it had [0, 4M)) kept
    // the base.
    let server = f.serve(&[]);
    qemu_io(
        &server.uri(),
        false,
        &[format!("read -P 0x5a {} {}", 5 * M, M)],
    );
    stop_clean(server);
    f.finish();
}

/// qemu-io writes with FUA (writethrough). After that, a small first write
/// into a MiB copies the MiB from the base, so the whole MiB has depth 1;
/// with `--no-copy-up` only the written sectors do. Either way the export
/// reads as written. With direct I/O and through the page cache.
#[test]
fn no_copy_up_keeps_the_overlay_to_the_written_sectors() {
    for (args, copied) in [
        (&[][..], true),
        (&["--no-copy-up"][..], false),
        (&["--cache", "writeback"][..], true),
        (&["--cache", "writeback", "--no-copy-up"][..], false),
    ] {
        let f = fixture();
        let server = f.serve(args);
        let uri = server.uri();
        let ops = [
            Op::Write {
                off: M + 8 * K,
                len: 4 * K,
                pat: 0x31,
            },
            Op::Write {
                off: 5 * M + 64 * K,
                len: 4 * K,
                pat: 0x32,
            },
        ];
        let mut model = Model::new(f.base_data.clone());
        for op in &ops {
            model.apply(op);
        }
        qemu_io(
            &uri,
            false,
            &ops.iter().map(Op::command).collect::<Vec<_>>(),
        );
        let depth = nbdinfo_map(&uri, Some("qemu:allocation-depth"), SIZE);
        let runs: &[(u64, u64, u64)] = if copied {
            &[
                (0, M, 2),
                (M, 2 * M, 1),
                (2 * M, 5 * M, 2),
                (5 * M, 6 * M, 1),
                (6 * M, SIZE, 2),
            ]
        } else {
            &[
                (0, M + 8 * K, 2),
                (M + 8 * K, M + 12 * K, 1),
                (M + 12 * K, 5 * M + 64 * K, 2),
                (5 * M + 64 * K, 5 * M + 68 * K, 1),
                (5 * M + 68 * K, SIZE, 2),
            ]
        };
        assert_eq!(depth, extents(runs), "depth map with {args:?}");
        assert_same_bytes(
            &format!("the export with {args:?}"),
            &dump(&uri, &f.dir.path().join("out.raw")),
            &model.data,
        );
        drop(server);
        f.finish();
    }
}

#[test]
fn printed_uris_are_percent_encoded_and_nbdinfo_connects_with_them() {
    // Export names and a socket path with characters that mean something in
    // a URI (`?`, `#`, `%`, `=`, `&`) or may not appear in one (space, `"`).
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("a dir #1 ?%");
    fs::create_dir(&odd).unwrap();
    let one = dir.path().join("one.img");
    let two = dir.path().join("two.img");
    run(ubd().arg("create").arg(&one).arg("1M"));
    run(ubd().arg("create").arg(&two).arg("2M"));
    let socket = odd.join("s&o=ck \"x\".sock");
    let pid_file = dir.path().join("ubd.pid");
    let names = ["x?y%z#w", "disk one/é"];
    let out = output(
        Command::new("timeout")
            .arg("30")
            .arg(ubd_bin())
            .arg("serve")
            .arg("--export")
            .arg(format!("{}={}", names[0], s(&one)))
            .arg("--export")
            .arg(format!("{}={}", names[1], s(&two)))
            .args(["--fork", "--socket", s(&socket), "--pid-file", s(&pid_file)])
            .args(["--log-file", s(&dir.path().join("ubd.log"))]),
    );
    let (stdout, pid) = forked(&out, &pid_file);
    let uris: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.rsplit_once(" at ").map(|(_, uri)| uri))
        .collect();
    let mut seen = Vec::new();
    for (uri, size) in uris.iter().zip([M, 2 * M]) {
        let text = output(nbdinfo().arg("--json").arg(uri));
        let info: Option<Value> = serde_json::from_slice(&text.stdout).ok();
        let export = info.as_ref().map(|i| &i["exports"][0]);
        seen.push(format!(
            "{uri}: {} {}",
            text.status,
            String::from_utf8_lossy(&text.stderr).trim()
        ));
        if let Some(export) = export.filter(|_| text.status.success()) {
            assert_eq!(export["export-size"].as_u64(), Some(size), "{uri}");
            seen.push(format!("  export-name {}", export["export-name"]));
        }
    }
    stop_forked(pid);
    let want: Vec<String> = names
        .iter()
        .map(|n| format!("  export-name {}", Value::from(*n)))
        .collect();
    let got: Vec<&String> = seen.iter().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(
        got,
        want.iter().collect::<Vec<_>>(),
        "nbdinfo with the printed URIs:\n{}\nstdout of ubd serve:\n{stdout}",
        seen.join("\n")
    );
}

/// A buffer pool that cannot be made (past what can be addressed, or more
/// memory than there is) is refused at once with a message that names
/// `--pool-size`, in `serve` and in `bench` alike.
#[test]
fn a_pool_size_that_cannot_be_made_is_named() {
    let dir = TempDir::new().unwrap();
    let (_base, cow, _) = common::base_and_overlay(dir.path(), 12, 1 << 20);
    for size in ["1E", "15E"] {
        for err in pool_size_refused(dir.path(), &cow, size) {
            assert!(err.contains(&format!("--pool-size {size}")), "{err}");
        }
    }
}

/// `serve` and `bench` on `cow` with `--pool-size size`: each exits 1;
/// their error output, in that order.
fn pool_size_refused(dir: &Path, cow: &Path, size: &str) -> [String; 2] {
    let (code, serve_err) = common::server::serve_refused(
        &dir.join("s.sock"),
        &[cow.as_os_str(), "--pool-size".as_ref(), size.as_ref()],
    );
    assert_eq!(code, Some(1), "{serve_err}");
    let out = output(
        ubd()
            .args(["bench", "--count", "1", "--pool-size", size])
            .arg(cow),
    );
    let bench_err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{bench_err}");
    [serve_err, bench_err]
}

/// A pool smaller than one 128K buffer chunk is refused while the
/// arguments are checked, with a message that names `--pool-size`, the value
/// given and the smallest value taken, in `serve` and in `bench` alike; the
/// smallest is served.
#[test]
fn a_pool_size_below_one_chunk_is_refused() {
    let dir = TempDir::new().unwrap();
    let (_base, cow, _) = common::base_and_overlay(dir.path(), 13, 1 << 20);
    for size in ["0", "4K", "127K", "131071"] {
        for err in pool_size_refused(dir.path(), &cow, size) {
            assert!(err.contains(&format!("'{size}' for '--pool-size")), "{err}");
            assert!(err.contains("at least 128K"), "{err}");
        }
    }
    let out = output(
        ubd()
            .args(["bench", "--count", "1", "--pool-size", "128K"])
            .arg(&cow),
    );
    assert!(out.status.success(), "{out:?}");
}

/// `ubd serve cow.img` run in the overlay's directory (the socket then
/// `cow.img.sock`, relative) prints a URI a client in another directory
/// can use: the socket's absolute path.
#[test]
fn the_printed_uri_works_from_another_directory() {
    let dir = TempDir::new().unwrap();
    let (_base, cow, _) = common::base_and_overlay(dir.path(), 13, 1 << 20);
    let mut child = ubd()
        .arg("serve")
        .arg(cow.file_name().unwrap())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ubd serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line
        .trim()
        .strip_prefix("ubd: serving the default export at ")
        .unwrap_or_else(|| panic!("no URI: {line:?}"))
        .to_string();
    let info = output(
        Command::new(tool("nbdinfo", "libnbd-bin"))
            .arg("--size")
            .arg(&uri)
            .current_dir("/"),
    );
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    assert!(
        info.status.success(),
        "nbdinfo from / cannot use {uri}: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&info.stdout).trim(),
        (1 << 20).to_string()
    );
    assert!(!dir.path().join("cow.img.sock").exists());
}

/// `--socket` naming a regular file or a directory: refused at once, in
/// words, and the file is left as it was.
#[test]
fn a_socket_path_that_is_a_file_is_refused_and_kept() {
    let dir = TempDir::new().unwrap();
    let (_base, cow, _) = common::base_and_overlay(dir.path(), 14, 1 << 20);
    let file = dir.path().join("notes.txt");
    fs::write(&file, "keep\n").unwrap();
    for path in [file.clone(), dir.path().to_path_buf()] {
        let (code, err) = common::server::serve_refused(&path, &[&cow]);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(&format!(
                "{}: exists and is not a socket: refusing to replace it",
                path.display()
            )),
            "{err}"
        );
        assert!(!err.contains("entity already exists"), "{err}");
    }
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep\n");
}
