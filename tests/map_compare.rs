//! `ubd map` and `ubd compare` against what was written, against overlays
//! edited by hand over `uml_mkcow`, against `uml_moo`'s merges, and against
//! `qemu-img map` and `qemu-img compare`.

mod common;

use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{output, pseudo_random_bytes, run, tool, ubd, ubd_info};
use serde_json::Value;
use ubd::device::{Device, DeviceOptions, Flags};
use ubd::image::create_overlay;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// One run of `ubd map --output json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    start: u64,
    length: u64,
    kind: String,
    depth: u64,
    zero: bool,
    file: Option<String>,
    offset: Option<u64>,
}

fn map_json(image: &Path, extra: &[&str]) -> Vec<Run> {
    let json = run(ubd()
        .args(["map", "--output", "json"])
        .args(extra)
        .arg(image));
    let v: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("`ubd map --output json` printed invalid JSON ({e}):\n{json}"));
    v.as_array()
        .expect("an array")
        .iter()
        .map(|r| Run {
            start: r["start"].as_u64().unwrap(),
            length: r["length"].as_u64().unwrap(),
            kind: r["kind"].as_str().unwrap().to_string(),
            depth: r["depth"].as_u64().unwrap(),
            zero: r["zero"].as_bool().unwrap(),
            file: r["file"].as_str().map(str::to_string),
            offset: r["offset"].as_u64(),
        })
        .collect()
}

/// The runs cover `0..capacity` exactly, in order, without gaps, and no two
/// neighbours have the same kind and depth (they would have been merged).
fn assert_covers(runs: &[Run], capacity: u64) {
    let mut at = 0;
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(
            r.start,
            at,
            "run {i} does not start where run {} ended: {runs:#?}",
            i.max(1) - 1
        );
        assert!(r.length > 0, "empty run {i}: {runs:#?}");
        if i > 0 {
            let p = &runs[i - 1];
            assert!(
                (p.kind.as_str(), p.depth) != (r.kind.as_str(), r.depth),
                "runs {} and {i} were not merged: {runs:#?}",
                i - 1
            );
        }
        at += r.length;
    }
    assert_eq!(at, capacity, "runs do not end at the capacity: {runs:#?}");
}

/// What each byte of the device should map to: (kind, depth), painted range
/// by range, then collapsed into runs.
struct Expected(Vec<(&'static str, u64)>);

impl Expected {
    fn new(capacity: u64, fill: (&'static str, u64)) -> Expected {
        Expected(vec![fill; capacity as usize])
    }

    fn paint(&mut self, r: Range<u64>, label: (&'static str, u64)) {
        self.0[r.start as usize..r.end as usize].fill(label);
    }

    fn runs(&self) -> Vec<(u64, u64, &'static str, u64)> {
        let mut out: Vec<(u64, u64, &'static str, u64)> = Vec::new();
        for (i, &(kind, depth)) in self.0.iter().enumerate() {
            match out.last_mut() {
                Some(last) if (last.2, last.3) == (kind, depth) => last.1 += 1,
                _ => out.push((i as u64, 1, kind, depth)),
            }
        }
        out
    }
}

fn sectors(r: Range<u64>) -> Range<u64> {
    r.start / 512 * 512..r.end.div_ceil(512) * 512
}

/// A base image with random data, a real hole in the middle, and (when `tail`
/// is given) a size that is not a whole number of sectors.
fn sparse_base(path: &Path, size: u64, hole: Range<u64>, seed: u64) -> Vec<u8> {
    let mut data = pseudo_random_bytes(seed, size as usize);
    data[hole.start as usize..hole.end as usize].fill(0);
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&data[..hole.start as usize], 0).unwrap();
    f.write_all_at(&data[hole.end as usize..], hole.end)
        .unwrap();
    f.sync_all().unwrap();
    data
}

fn exit_code(out: &std::process::Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {:?}", out.status))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `ubd compare A B`: exit code, stdout, stderr.
fn compare(a: &Path, b: &Path) -> (i32, String, String) {
    let out = output(ubd().arg("compare").arg(a).arg(b));
    (exit_code(&out), text(&out.stdout), text(&out.stderr))
}

fn compare_json(a: &Path, b: &Path) -> (i32, Value) {
    let out = output(ubd().args(["compare", "--output", "json"]).arg(a).arg(b));
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`ubd compare --output json` printed invalid JSON ({e}):\n{}",
            text(&out.stdout)
        )
    });
    (exit_code(&out), v)
}

/// `qemu-img compare -f raw -F raw`: exit code and stdout. `-U` because a
/// `ubd` that just exited may still hold its read lock for a moment (the
/// kernel releases an io_uring's files after the process is gone).
fn qemu_compare(a: &Path, b: &Path) -> (i32, String) {
    let out = output(
        Command::new(tool("qemu-img", "qemu-utils"))
            .args(["compare", "-U", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b),
    );
    (exit_code(&out), text(&out.stdout))
}

/// The offset in "Content mismatch at offset N!".
fn mismatch_offset(stdout: &str) -> Option<u64> {
    let rest = stdout.split("Content mismatch at offset ").nth(1)?;
    rest.split('!').next()?.trim().parse().ok()
}

fn uml_moo(cow: &Path, merged: &Path) {
    run(Command::new(tool("uml_moo", "uml-utilities"))
        .arg(cow)
        .arg(merged));
}

fn open_rw(cow: &Path) -> Device {
    Device::open(cow, &DeviceOptions::default())
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", cow.display()))
}

/// An overlay over a sparse random base, written through the device: the
/// model of what it reads, and what `ubd map` must say about it.
struct Written {
    base: PathBuf,
    cow: PathBuf,
    /// What the device reads.
    model: Vec<u8>,
    capacity: u64,
    expected: Expected,
}

fn written_overlay(dir: &Path, size: u64) -> Written {
    let base = dir.join("base.img");
    let cow = dir.join("vm.cow");
    let hole = 3 * M..5 * M;
    let base_data = sparse_base(&base, size, hole.clone(), 7);
    create_overlay(&cow, &base, false).unwrap();
    let capacity = size.next_multiple_of(512);
    let mut model = base_data.clone();
    model.resize(capacity as usize, 0);

    let mut expected = Expected::new(capacity, ("backing", 2));
    expected.paint(hole.clone(), ("zero", 2));
    expected.paint(size..capacity, ("zero", 0));

    let dev = open_rw(&cow);
    {
        let mut write = |range: Range<u64>, seed: u64| {
            let bytes = pseudo_random_bytes(seed, (range.end - range.start) as usize);
            dev.write_at(range.start, &bytes, Flags::default()).unwrap();
            model[range.start as usize..range.end as usize].copy_from_slice(&bytes);
            expected.paint(sectors(range), ("overlay", 1));
        };
        write(M..M + 64 * K, 11);
        // Inside the base's hole.
        write(4 * M..4 * M + 4 * K, 12);
        // Partial sectors: the whole sectors become the overlay's.
        write(6 * M + 100..6 * M + 1100, 13);
        // Next to the zeroed range below, so the zero run sits between overlay data.
        write(2 * M - 8 * K..2 * M, 14);
    }

    let zeroed = 2 * M..2 * M + 128 * K;
    dev.write_zeroes(zeroed.start, zeroed.end - zeroed.start, Flags::default())
        .unwrap();
    model[zeroed.start as usize..zeroed.end as usize].fill(0);
    expected.paint(zeroed, ("zero", 1));

    // Trim the second half of the first write: a hole in the overlay.
    let trimmed = M + 32 * K..M + 64 * K;
    dev.trim(trimmed.start, trimmed.end - trimmed.start)
        .unwrap();
    model[trimmed.start as usize..trimmed.end as usize].fill(0);
    expected.paint(trimmed, ("zero", 1));

    dev.flush().unwrap();
    dev.close().unwrap();
    Written {
        base,
        cow,
        model,
        capacity,
        expected,
    }
}

/// `ubd map` of an overlay written through the device: overlay exactly where
/// written, zero where zeroed or trimmed, zero over the base's hole and past
/// its end, backing everywhere else; offsets point into the right file.
#[test]
fn map_of_a_written_overlay_matches_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    // Not a whole number of sectors: the last 24 bytes are past the base's end.
    let w = written_overlay(dir.path(), 8 * M + 1000);
    let runs = map_json(&w.cow, &[]);
    assert_covers(&runs, w.capacity);

    let got: Vec<_> = runs
        .iter()
        .map(|r| (r.start, r.length, r.kind.as_str(), r.depth))
        .collect();
    assert_eq!(got, w.expected.runs(), "map: {runs:#?}");

    let info = ubd_info(&w.cow);
    let data_offset = info["data_offset"].as_u64().unwrap();
    let backing = info["backing_file"].as_str().unwrap();
    let cow_name = w.cow.to_str().unwrap();
    for r in &runs {
        assert_eq!(r.zero, r.kind == "zero", "{r:?}");
        match r.depth {
            1 => {
                assert_eq!(r.file.as_deref(), Some(cow_name), "{r:?}");
                assert_eq!(r.offset, Some(data_offset + r.start), "{r:?}");
            }
            2 => {
                assert_eq!(r.file.as_deref(), Some(backing), "{r:?}");
                assert_eq!(r.offset, Some(r.start), "{r:?}");
            }
            0 => assert_eq!((r.file.as_deref(), r.offset), (None, None), "{r:?}"),
            d => panic!("depth {d}: {r:?}"),
        }
    }
    // What the map says lives in the overlay is there, at that offset.
    let cow_bytes = fs::read(&w.cow).unwrap();
    for r in runs.iter().filter(|r| r.kind == "overlay") {
        let at = r.offset.unwrap() as usize;
        let (s, e) = (r.start as usize, (r.start + r.length) as usize);
        assert!(
            cow_bytes[at..at + r.length as usize] == w.model[s..e],
            "overlay run {r:?} does not hold the written data"
        );
    }

    // The human table has a header and one line per run.
    let table = run(ubd().arg("map").arg(&w.cow));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), runs.len() + 1, "{table}");
    assert!(lines[0].starts_with("Start"), "{table}");
    for (line, r) in lines[1..].iter().zip(&runs) {
        let mut cols = line.split_whitespace();
        assert_eq!(cols.next(), Some(r.start.to_string().as_str()), "{line}");
        assert_eq!(cols.next(), Some(r.length.to_string().as_str()), "{line}");
        assert!(line.contains(&format!(" {} ", r.kind)), "{line}");
        if r.kind != "zero" {
            assert!(line.contains(&r.offset.unwrap().to_string()), "{line}");
            assert!(line.ends_with(r.file.as_deref().unwrap()), "{line}");
        }
    }
}

/// `--backing` names a backing file that moved; the map then points there.
#[test]
fn map_follows_a_moved_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let w = written_overlay(dir.path(), 8 * M);
    let moved = dir.path().join("moved.img");
    fs::rename(&w.base, &moved).unwrap();
    let out = output(ubd().arg("map").arg(&w.cow));
    assert_eq!(exit_code(&out), 1);
    assert!(
        text(&out.stderr).contains(w.base.to_str().unwrap()),
        "{}",
        text(&out.stderr)
    );
    let runs = map_json(&w.cow, &["--backing", moved.to_str().unwrap()]);
    assert_covers(&runs, w.capacity);
    let moved_name = moved.to_str().unwrap();
    assert!(runs.iter().any(|r| r.depth == 2));
    for r in runs.iter().filter(|r| r.depth == 2) {
        assert_eq!(r.file.as_deref(), Some(moved_name), "{r:?}");
    }
}

/// An overlay made by `uml_mkcow`, with bitmap bits and data written into the
/// file directly (as UML does): sectors with a bit and data are overlay;
/// sectors with a bit but no data (UML's crash case) read as zeros.
#[test]
fn map_of_a_uml_mkcow_overlay_edited_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let cow = dir.path().join("uml.cow");
    let size = 4 * M;
    fs::write(&base, pseudo_random_bytes(3, size as usize)).unwrap();
    run(Command::new(tool("uml_mkcow", "uml-utilities"))
        .arg(&cow)
        .arg(&base));
    let info = ubd_info(&cow);
    let bitmap_offset = info["bitmap_offset"].as_u64().unwrap();
    let data_offset = info["data_offset"].as_u64().unwrap();

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cow)
        .unwrap();
    let set = |sectors: Range<u64>| {
        for n in sectors {
            let at = bitmap_offset + n / 8;
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            b[0] |= 1 << (n % 8);
            f.write_all_at(&b, at).unwrap();
        }
    };
    // Sectors 2048..2056 (1 MiB, 4 KiB): bits and data.
    set(2048..2056);
    f.write_all_at(&pseudo_random_bytes(5, 4096), data_offset + 2048 * 512)
        .unwrap();
    // Sectors 6144..6160 (3 MiB, 8 KiB): bits, but the data never arrived.
    set(6144..6160);
    f.sync_all().unwrap();
    drop(f);

    let runs = map_json(&cow, &[]);
    assert_covers(&runs, size);
    let got: Vec<_> = runs
        .iter()
        .map(|r| (r.start, r.length, r.kind.as_str(), r.depth))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, M, "backing", 2),
            (M, 4 * K, "overlay", 1),
            (M + 4 * K, 2 * M - 4 * K, "backing", 2),
            (3 * M, 8 * K, "zero", 1),
            (3 * M + 8 * K, M - 8 * K, "backing", 2),
        ],
        "{runs:#?}"
    );
}

/// Per byte: does it read as zeros without data behind it?
fn zero_bytes(runs: impl Iterator<Item = (u64, u64, bool)>, size: u64) -> Vec<bool> {
    let mut out = vec![false; size as usize];
    let mut covered = 0;
    for (start, len, zero) in runs {
        out[start as usize..(start + len) as usize].fill(zero);
        covered += len;
    }
    assert_eq!(covered, size);
    out
}

/// On a raw image, `ubd map` and `qemu-img map -f raw` agree on which bytes
/// are data and which are holes.
#[test]
fn map_of_a_raw_image_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let size = 6 * M;
    let f = File::create(&img).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&pseudo_random_bytes(1, M as usize), 0)
        .unwrap();
    f.write_all_at(&pseudo_random_bytes(2, 4096), 3 * M)
        .unwrap();
    // Zeros written as data are data.
    f.write_all_at(&vec![0u8; 64 * K as usize], 4 * M).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let runs = map_json(&img, &[]);
    assert_covers(&runs, size);
    let name = img.to_str().unwrap();
    for r in &runs {
        assert_eq!(r.depth, 1, "{r:?}");
        assert_eq!((r.file.as_deref(), r.offset), (Some(name), Some(r.start)));
        assert!(["overlay", "zero"].contains(&r.kind.as_str()), "{r:?}");
    }
    let ours = zero_bytes(runs.iter().map(|r| (r.start, r.length, r.zero)), size);

    let json = run(Command::new(tool("qemu-img", "qemu-utils"))
        .args(["map", "-U", "--output=json", "-f", "raw"])
        .arg(&img));
    let qemu: Value = serde_json::from_str(&json).unwrap();
    let theirs = zero_bytes(
        qemu.as_array().unwrap().iter().map(|r| {
            let zero = r["zero"].as_bool().unwrap() && !r["data"].as_bool().unwrap();
            (
                r["start"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                zero,
            )
        }),
        size,
    );
    if let Some(at) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!(
            "ubd map and qemu-img map disagree at byte {at}: ubd says zero={}, qemu-img \
             zero={}\nubd: {runs:#?}\nqemu-img: {json}",
            ours[at], theirs[at]
        );
    }
    // Both saw the data, the hole and the zeros written as data.
    assert!(!ours[0] && ours[2 * M as usize] && !ours[3 * M as usize]);
    assert!(!ours[4 * M as usize] && ours[5 * M as usize]);
}

/// An overlay written through the device compares identical with the image
/// `uml_moo` merges from it and with a raw image written independently with
/// the same contents; one flipped byte is found at its exact offset, also in
/// a range where the overlay side is a hole.
#[test]
fn compare_overlay_with_merged_and_flipped_images() {
    let dir = tempfile::tempdir().unwrap();
    let w = written_overlay(dir.path(), 8 * M);
    let merged = dir.path().join("merged.img");
    uml_moo(&w.cow, &merged);
    let model = dir.path().join("model.img");
    fs::write(&model, &w.model).unwrap();

    for other in [&merged, &model] {
        let (code, stdout, stderr) = compare(&w.cow, other);
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.contains("Images are identical."), "{stdout}");
        let (code, _, _) = compare(other, &w.cow);
        assert_eq!(code, 0);
    }
    let (code, json) = compare_json(&w.cow, &merged);
    assert_eq!(code, 0);
    assert_eq!(json["result"], "identical");
    assert_eq!(json["exit_code"], 0);
    assert_eq!(json["mismatch_offset"], Value::Null);

    // Overlay data, backing data, the overlay's zeroed range, the base's hole,
    // the very first and the very last byte.
    for at in [
        M + 77,
        5 * M + 4321,
        2 * M + 5000,
        3 * M + 777,
        0,
        w.capacity - 1,
    ] {
        let flipped = dir.path().join("flipped.img");
        let mut bytes = w.model.clone();
        bytes[at as usize] ^= 0x20;
        fs::write(&flipped, &bytes).unwrap();
        let (code, stdout, stderr) = compare(&w.cow, &flipped);
        assert_eq!(code, 1, "flip at {at}: {stdout}{stderr}");
        assert_eq!(mismatch_offset(&stdout), Some(at), "{stdout}");
        let (code, json) = compare_json(&flipped, &w.cow);
        assert_eq!(code, 1);
        assert_eq!(json["result"], "mismatch");
        assert_eq!(json["mismatch_offset"], at);
    }
}

/// Images of different sizes match when the longer one's extra part reads as
/// zeros (a hole or written zeros) and not otherwise, either way round.
#[test]
fn compare_images_of_different_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.img");
    let data = pseudo_random_bytes(9, M as usize);
    fs::write(&short, &data).unwrap();

    let hole_tail = dir.path().join("hole-tail.img");
    fs::write(&hole_tail, &data).unwrap();
    File::options()
        .write(true)
        .open(&hole_tail)
        .unwrap()
        .set_len(3 * M)
        .unwrap();
    let zero_tail = dir.path().join("zero-tail.img");
    let mut bytes = data.clone();
    bytes.resize((2 * M) as usize, 0);
    fs::write(&zero_tail, &bytes).unwrap();
    let dirty_tail = dir.path().join("dirty-tail.img");
    let dirty_at = M + 500;
    bytes[dirty_at as usize] = 1;
    fs::write(&dirty_tail, &bytes).unwrap();

    for long in [&hole_tail, &zero_tail] {
        for (a, b) in [(&short, long), (long, &short)] {
            let (code, stdout, stderr) = compare(a, b);
            assert_eq!(code, 0, "{stdout}{stderr}");
            assert!(stdout.contains("size mismatch"), "{stdout}");
            assert!(stdout.contains("Images are identical."), "{stdout}");
        }
    }
    for (a, b) in [(&short, &dirty_tail), (&dirty_tail, &short)] {
        let (code, stdout, stderr) = compare(a, b);
        assert_eq!(code, 1, "{stdout}{stderr}");
        assert!(stdout.contains("size mismatch"), "{stdout}");
        assert_eq!(mismatch_offset(&stdout), Some(dirty_at), "{stdout}");
    }
    let (code, json) = compare_json(&short, &hole_tail);
    assert_eq!(code, 0);
    assert_eq!(
        (json["size_a"].as_u64(), json["size_b"].as_u64()),
        (Some(M), Some(3 * M))
    );
}

/// On raw pairs, `ubd compare` and `qemu-img compare -f raw -F raw` give the
/// same exit code; on a mismatch qemu-img names the sector that holds the
/// first differing byte, and ubd the byte itself.
#[test]
fn compare_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = pseudo_random_bytes(21, (4 * M) as usize);
    let write = |name: &str, bytes: &[u8]| {
        fs::write(p(name), bytes).unwrap();
        p(name)
    };
    let a = write("a.img", &data);
    let same = write("same.img", &data);
    // The same contents with a real hole where `a` has written zeros.
    let mut holey = data.clone();
    holey[M as usize..2 * M as usize].fill(0);
    let zeros_written = write("zeros-written.img", &holey);
    let sparse = p("sparse.img");
    {
        let f = File::create(&sparse).unwrap();
        f.set_len(4 * M).unwrap();
        f.write_all_at(&holey[..M as usize], 0).unwrap();
        f.write_all_at(&holey[2 * M as usize..], 2 * M).unwrap();
    }
    let mut bytes = data.clone();
    bytes[(3 * M + 1234) as usize] ^= 1;
    let flipped = write("flipped.img", &bytes);
    let mut bytes = data.clone();
    bytes.resize((5 * M) as usize, 0);
    let zero_tail = write("zero-tail.img", &bytes);
    bytes[(4 * M + 4097) as usize] = 0xff;
    let dirty_tail = write("dirty-tail.img", &bytes);
    let empty_a = p("empty-a.img");
    File::create(&empty_a).unwrap().set_len(8 * M).unwrap();
    let empty_b = p("empty-b.img");
    File::create(&empty_b).unwrap().set_len(8 * M).unwrap();

    let pairs = [
        (&a, &same, 0),
        (&zeros_written, &sparse, 0),
        (&a, &sparse, 1),
        (&a, &flipped, 1),
        (&a, &zero_tail, 0),
        (&dirty_tail, &a, 1),
        (&empty_a, &empty_b, 0),
        (&empty_a, &a, 1),
    ];
    for (x, y, want) in pairs {
        let (ours, stdout, stderr) = compare(x, y);
        let (theirs, qemu_out) = qemu_compare(x, y);
        let names = format!("{} vs {}", x.display(), y.display());
        assert_eq!(ours, want, "{names}: {stdout}{stderr}");
        assert_eq!(
            ours, theirs,
            "{names}: ubd: {stdout}{stderr}\nqemu-img: {qemu_out}"
        );
        if ours == 1 {
            let at = mismatch_offset(&stdout).unwrap();
            let qemu_at = mismatch_offset(&qemu_out).unwrap();
            assert_eq!(
                qemu_at,
                at / 512 * 512,
                "{names}: ubd {stdout} qemu-img {qemu_out}"
            );
        }
    }
}

/// Errors exit 2 and name the file; an overlay another process has open for
/// writing is refused as in use, by map as by compare.
#[test]
fn compare_and_map_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    fs::write(&img, pseudo_random_bytes(4, 64 * K as usize)).unwrap();
    let missing = dir.path().join("missing.img");
    let (code, stdout, stderr) = compare(&img, &missing);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
    let (code, json) = compare_json(&missing, &img);
    assert_eq!(code, 2);
    assert_eq!(json["result"], "error");
    assert!(json["message"].as_str().unwrap().contains("missing.img"));

    let out = output(ubd().arg("map").arg(&missing));
    assert_eq!(exit_code(&out), 1);
    assert!(text(&out.stderr).contains("missing.img"));

    let base = dir.path().join("base.img");
    fs::write(&base, pseudo_random_bytes(5, M as usize)).unwrap();
    let cow = dir.path().join("busy.cow");
    create_overlay(&cow, &base, false).unwrap();
    let dev = open_rw(&cow);
    let (code, stdout, stderr) = compare(&cow, &base);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("in use") && stderr.contains("busy.cow"),
        "{stderr}"
    );
    let out = output(ubd().arg("map").arg(&cow));
    assert_eq!(exit_code(&out), 1);
    assert!(
        text(&out.stderr).contains("in use"),
        "{}",
        text(&out.stderr)
    );
    dev.close().unwrap();
    drop(dev);
    let (code, stdout, stderr) = compare(&cow, &base);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// Whether the process has a handler for SIGINT (its SigCgt mask).
fn catches_sigint(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0)
}

/// Ctrl-C stops a comparison between pieces: exit 130, and a message saying
/// nothing was decided.
#[test]
fn compare_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.img");
    // 512 MiB of data (no holes) compared with itself: hundreds of pieces.
    {
        let f = File::create(&big).unwrap();
        let chunk = pseudo_random_bytes(8, M as usize);
        for i in 0..512 {
            f.write_all_at(&chunk, i * M).unwrap();
        }
    }
    let mut child = ubd()
        .arg("compare")
        .arg(&big)
        .arg(&big)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    while !catches_sigint(pid) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::yield_now();
    }
    run(Command::new("kill").args(["-INT", &pid.to_string()]));
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(exit_code(&out), 130, "{stdout}{stderr}");
    assert!(stderr.contains("Interrupted at offset"), "{stderr}");
    assert!(!stdout.contains("identical"), "{stdout}");
}

/// A mistyped `ubd compare` command exits 2, an error, never 1, which a
/// script reads as "the images differ".
#[test]
fn compare_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    fs::write(&a, [0u8; 512]).unwrap();
    for args in [
        &["compare"][..],
        &["compare", "only-one.img"][..],
        &["compare", "--bogus", "x", "y"][..],
        &["compare", "--output", "yaml", "x", "y"][..],
    ] {
        let out = output(ubd().args(args));
        assert_eq!(exit_code(&out), 2, "{args:?}: {}", text(&out.stderr));
    }
    let out = output(ubd().args(["compare", "--help"]));
    assert_eq!(exit_code(&out), 0);
    // Other verbs keep 1 for a usage error.
    let out = output(ubd().args(["check", "--bogus"]).arg(&a));
    assert_eq!(exit_code(&out), 1);
}
