//! `ubd convert` against the real `uml_moo`, and `convert --import` back again.
//!
//! Every merged image is checked three ways: against `uml_moo COW OUT`, against
//! a `Vec<u8>` model of what the overlay holds, and for holes where it is zero.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{output, pseudo_random_bytes, run, tool, ubd, ubd_info};
use ubd::device::{Device, DeviceOptions, Flags};

const MIB: u64 = 1 << 20;

/// A base image of `size` bytes: pseudo-random data in `data` ranges, holes
/// elsewhere. Returns its contents.
fn make_base(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) -> Vec<u8> {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];
    for (i, &(at, len)) in data.iter().enumerate() {
        let bytes = pseudo_random_bytes(seed + i as u64, len as usize);
        f.write_all_at(&bytes, at).unwrap();
        model[at as usize..(at + len) as usize].copy_from_slice(&bytes);
    }
    model
}

/// One change to make through the device.
enum Change {
    Write(u64, Vec<u8>),
    Zeroes(u64, u64),
}

/// Applies `changes` to the overlay through ubd's device, flushes, and applies
/// them to `model` too.
fn change(cow: &Path, changes: &[Change], model: &mut [u8]) {
    let dev = Device::open(cow, &DeviceOptions::default()).unwrap();
    for c in changes {
        match c {
            Change::Write(at, bytes) => {
                dev.write_at(*at, bytes, Flags::default()).unwrap();
                model[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
            }
            Change::Zeroes(at, len) => {
                dev.write_zeroes(*at, *len, Flags::default()).unwrap();
                model[*at as usize..(*at + *len) as usize].fill(0);
            }
        }
    }
    dev.flush().unwrap();
    dev.close().unwrap();
}

/// A spread of writes over a `size`-byte device: unaligned, partial sectors,
/// across 4 MiB piece boundaries, zeros over data, and the last bytes.
fn changes_for(size: u64) -> Vec<Change> {
    let mut c = vec![
        Change::Write(0, pseudo_random_bytes(100, 100)),
        Change::Write(511, pseudo_random_bytes(101, 2)),
        Change::Write(3 * 4096 + 7, pseudo_random_bytes(102, 10_000)),
        // Zeros written as data over the base's data: holes in OUT.
        Change::Write(64 * 1024, vec![0; 8192]),
        Change::Write(size - 300, pseudo_random_bytes(103, 300)),
        Change::Write(size / 2 + 1, pseudo_random_bytes(104, 5000)),
    ];
    if size > 8 * MIB {
        c.push(Change::Write(
            4 * MIB - 1000,
            pseudo_random_bytes(105, (3 * MIB) as usize),
        ));
        c.push(Change::Zeroes(2 * MIB, 64 * 1024));
    }
    c
}

fn uml_moo(cow: &Path, out: &Path) {
    run(Command::new(tool("uml_moo", "uml-utilities"))
        .arg(cow)
        .arg(out));
}

fn convert(cow: &Path, out: &Path) {
    run(ubd().arg("convert").arg(cow).arg(out));
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    File::open(path).unwrap().read_to_end(&mut bytes).unwrap();
    bytes
}

/// Asserts equal contents, naming the first differing offset.
fn assert_same(what: &str, ours: &[u8], theirs: &[u8]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ");
    if let Some(at) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {at}");
    }
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

struct Dir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().to_path_buf();
        Dir { _tmp: tmp, path }
    }
    fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// Converts `cow` with ubd and uml_moo and checks both against `model`:
/// uml_moo up to its last whole sector, ubd in full.
fn check_against_uml_moo(dir: &Dir, cow: &Path, model: &[u8]) {
    let (ours, theirs) = (dir.join("ubd.img"), dir.join("moo.img"));
    convert(cow, &ours);
    uml_moo(cow, &theirs);
    let (ours, theirs) = (read_all(&ours), read_all(&theirs));
    let whole = model.len() / 512 * 512;
    assert_eq!(theirs.len(), whole, "uml_moo keeps whole sectors only");
    assert_same("ubd convert vs uml_moo", &ours[..whole], &theirs);
    assert_same("ubd convert vs the model", &ours, model);
}

#[test]
fn matches_uml_moo_on_overlays_ubd_made() {
    for size in [1_000_448u64, 24 * MIB] {
        let dir = Dir::new();
        let (base, cow) = (dir.join("base.img"), dir.join("vm.cow"));
        let mut model = make_base(&base, size, &[(0, size / 2), (size - 4096, 4096)], 1);
        run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
        change(&cow, &changes_for(size), &mut model);
        check_against_uml_moo(&dir, &cow, &model);
    }
}

#[test]
fn matches_uml_moo_on_overlays_uml_mkcow_made() {
    let size = 12 * MIB;
    let dir = Dir::new();
    let (base, cow) = (dir.join("base.img"), dir.join("vm.cow"));
    let mut model = make_base(&base, size, &[(0, 5 * MIB), (9 * MIB, 1000)], 2);
    run(Command::new(tool("uml_mkcow", "uml-utilities"))
        .arg(&cow)
        .arg(&base));
    change(&cow, &changes_for(size), &mut model);
    check_against_uml_moo(&dir, &cow, &model);
}

/// uml_moo drops a trailing partial sector; ubd keeps it.
#[test]
fn keeps_the_trailing_partial_sector() {
    let size = 5 * MIB + 300;
    let dir = Dir::new();
    let (base, cow) = (dir.join("base.img"), dir.join("vm.cow"));
    let mut model = make_base(&base, size, &[(0, size)], 3);
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    // Changes inside the partial sector, and one beside it.
    let changes = [
        Change::Write(size - 100, pseudo_random_bytes(30, 50)),
        Change::Write(size - 812, pseudo_random_bytes(31, 400)),
        Change::Write(4096, pseudo_random_bytes(32, 4096)),
    ];
    change(&cow, &changes, &mut model);
    check_against_uml_moo(&dir, &cow, &model);
    let out = dir.join("ubd.img");
    assert_eq!(fs::metadata(&out).unwrap().len(), size);
    assert_eq!(
        read_all(&out)[(size - 300) as usize..],
        model[(size - 300) as usize..]
    );
}

#[test]
fn out_is_sparse_where_zero() {
    let size = 256 * MIB;
    let dir = Dir::new();
    let (base, cow, out) = (
        dir.join("base.img"),
        dir.join("vm.cow"),
        dir.join("out.img"),
    );
    let mut model = make_base(&base, size, &[(100 * MIB, MIB)], 4);
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    let changes = [
        Change::Write(7 * MIB, pseudo_random_bytes(40, MIB as usize)),
        // Zeros the overlay holds as data (not holes): still holes in OUT.
        Change::Write(20 * MIB, vec![0; 2 * MIB as usize]),
    ];
    change(&cow, &changes, &mut model);
    let json = run(ubd()
        .args(["convert", "--output", "json"])
        .arg(&cow)
        .arg(&out));
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["virtual_size"], size);
    assert_eq!(report["data_written"], 2 * MIB);
    assert_eq!(fs::metadata(&out).unwrap().len(), size);
    let used = allocated(&out);
    assert!(used <= 3 * MIB, "OUT takes {used} bytes for 2 MiB of data");
    assert_same("ubd convert vs the model", &read_all(&out), &model);

    // A raw image is copied, sparsely too.
    let copy = dir.join("copy.img");
    convert(&out, &copy);
    assert_same("copy of a raw image", &read_all(&copy), &model);
    assert!(allocated(&copy) <= 3 * MIB);
}

/// The sectors where `a` and `b` differ, counted independently of ubd: the
/// last partial sector compares its bytes only.
fn differing_sectors(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(512)
        .zip(b.chunks(512))
        .filter(|(x, y)| x != y)
        .count() as u64
}

#[test]
fn import_then_convert_reproduces_the_raw_image() {
    for size in [16 * MIB, 3 * MIB + 200] {
        let dir = Dir::new();
        let (base, raw) = (dir.join("base.img"), dir.join("raw.img"));
        let (cow, out) = (dir.join("raw.cow"), dir.join("out.img"));
        let base_bytes = make_base(&base, size, &[(0, size / 3), (size - 1000, 1000)], 5);
        let mut raw_bytes = base_bytes.clone();
        // Single bytes in scattered sectors, a run across a piece boundary,
        // data where the base has a hole, zeros over data, the last byte.
        for i in 0..50u64 {
            let at = (i * 7919 * 512 + i * 37) % size;
            raw_bytes[at as usize] ^= 0x5a;
        }
        let run_at = (size / 2).min(4 * MIB - 3000) as usize;
        raw_bytes[run_at..run_at + 10_000].copy_from_slice(&pseudo_random_bytes(50, 10_000));
        raw_bytes[(size / 2) as usize..(size / 2 + 3000) as usize].fill(0xee);
        raw_bytes[1024..4096].fill(0);
        *raw_bytes.last_mut().unwrap() ^= 1;
        fs::write(&raw, &raw_bytes).unwrap();
        let expected = differing_sectors(&raw_bytes, &base_bytes);
        assert!(expected > 50);

        let json = run(ubd()
            .args(["convert", "--output", "json", "--import"])
            .arg(&raw)
            .arg("--backing")
            .arg(&base)
            .arg(&cow));
        let report: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(report["sectors_present"], expected);
        assert_eq!(ubd_info(&cow)["sectors_present"], expected);
        run(ubd().arg("check").arg(&cow));
        convert(&cow, &out);
        assert_same("import then convert", &read_all(&out), &raw_bytes);
        assert_eq!(read_all(&base), base_bytes, "the base was changed");
    }
}

#[test]
fn import_refuses_a_base_of_another_size() {
    let dir = Dir::new();
    let (base, raw, cow) = (dir.join("base.img"), dir.join("raw.img"), dir.join("x.cow"));
    make_base(&base, MIB, &[], 0);
    make_base(&raw, MIB + 512, &[], 0);
    let out = output(
        ubd()
            .args(["convert", "--import"])
            .arg(&raw)
            .arg("--backing")
            .arg(&base)
            .arg(&cow),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("same size"), "{stderr}");
    assert!(!cow.exists());
}

#[test]
fn refuses_an_existing_out_without_force() {
    let dir = Dir::new();
    let (base, cow, out) = (
        dir.join("base.img"),
        dir.join("vm.cow"),
        dir.join("out.img"),
    );
    let model = make_base(&base, MIB, &[(0, MIB)], 6);
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    fs::write(&out, b"keep me").unwrap();
    let res = output(ubd().arg("convert").arg(&cow).arg(&out));
    assert_eq!(res.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("already exists") && stderr.contains("out.img"),
        "{stderr}"
    );
    assert_eq!(fs::read(&out).unwrap(), b"keep me");

    // --force never replaces the backing file being read.
    let res = output(ubd().args(["convert", "--force"]).arg(&cow).arg(&base));
    assert_eq!(res.status.code(), Some(1));
    assert_eq!(read_all(&base), model, "the backing file was changed");

    run(ubd().args(["convert", "--force"]).arg(&cow).arg(&out));
    assert_same("--force", &read_all(&out), &model);
}

/// `qemu-img check` of a qcow2 image: it exits 0 and finds no errors.
fn qemu_img_check(qcow2: &Path) {
    let checked = output(
        Command::new(tool("qemu-img", "qemu-utils"))
            .args(["check", "-f", "qcow2"])
            .arg(qcow2),
    );
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success() && said.contains("No errors were found"),
        "qemu-img check {}: {}\n{said}{}",
        qcow2.display(),
        checked.status,
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// `qemu-img info --output json` of a qcow2 image, parsed.
fn qemu_img_info(qcow2: &Path) -> serde_json::Value {
    serde_json::from_str(&run(Command::new(tool("qemu-img", "qemu-utils"))
        .args(["info", "--output", "json", "-f", "qcow2"])
        .arg(qcow2)))
    .unwrap()
}

/// `qemu-img` on a qcow2 image: `check` finds no errors, `info` gives the
/// size, `compare` finds it identical to `raw`, and `map` allocates only
/// the clusters `model` has data in.
fn check_qcow2_with_qemu(qcow2: &Path, raw: &Path, model: &[u8]) {
    let qemu_img = tool("qemu-img", "qemu-utils");
    qemu_img_check(qcow2);
    let info = qemu_img_info(qcow2);
    let size = (model.len() as u64).next_multiple_of(512);
    assert_eq!(info["virtual-size"].as_u64(), Some(size), "{info}");
    assert_eq!(info["cluster-size"].as_u64(), Some(64 * 1024), "{info}");
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(qcow2)
        .arg(raw));
    // Allocated clusters: those with a nonzero byte, no others.
    let map: serde_json::Value = serde_json::from_str(&run(Command::new(&qemu_img)
        .args(["map", "--output", "json", "-f", "qcow2"])
        .arg(qcow2)))
    .unwrap();
    let cluster = 64 * 1024;
    let mut allocated = vec![false; size.div_ceil(cluster) as usize];
    for e in map.as_array().unwrap() {
        if e["data"].as_bool() == Some(true) {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            for c in start / cluster..(start + len).div_ceil(cluster) {
                allocated[c as usize] = true;
            }
        }
    }
    for (c, chunk) in model.chunks(cluster as usize).enumerate() {
        let data = chunk.iter().any(|&b| b != 0);
        assert_eq!(
            allocated[c], data,
            "cluster {c}: allocated or not by its data"
        );
    }
}

#[test]
fn qcow2_output_holds_what_the_raw_output_holds() {
    // Past 512 MiB (two L2 tables), with a partial last sector.
    let size = 600 * MIB + 300;
    let dir = Dir::new();
    let (base, cow) = (dir.join("base.img"), dir.join("vm.cow"));
    let mut model = make_base(
        &base,
        size,
        &[(0, 3 * MIB), (520 * MIB - 7, 70_000), (size - 1000, 1000)],
        7,
    );
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    let mut changes = changes_for(size);
    changes.push(Change::Write(512 * MIB - 10, pseudo_random_bytes(106, 20)));
    change(&cow, &changes, &mut model);
    let (raw, qcow2) = (dir.join("out.img"), dir.join("out.qcow2"));
    convert(&cow, &raw);
    let said = run(ubd()
        .args(["convert", "-O", "qcow2", "--output", "json"])
        .arg(&cow)
        .arg(&qcow2));
    let report: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(report["format"], "qcow2", "{report}");
    assert_eq!(
        report["virtual_size"].as_u64(),
        Some(size.next_multiple_of(512))
    );
    check_qcow2_with_qemu(&qcow2, &raw, &model);
    // Back to raw with qemu-img: the model, with the sector's tail as zeros.
    let back = dir.join("back.img");
    run(Command::new(tool("qemu-img", "qemu-utils"))
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow2)
        .arg(&back));
    let mut padded = model.clone();
    padded.resize(size.next_multiple_of(512) as usize, 0);
    assert_same(
        "qemu-img's raw of ubd's qcow2 vs the model",
        &read_all(&back),
        &padded,
    );
    // A raw image converts too; an empty one gives an empty qcow2.
    let from_raw = dir.join("raw.qcow2");
    run(ubd()
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&from_raw));
    check_qcow2_with_qemu(&from_raw, &raw, &model);
    let empty = dir.join("empty.img");
    File::create(&empty).unwrap().set_len(MIB).unwrap();
    let empty_qcow2 = dir.join("empty.qcow2");
    run(ubd()
        .args(["convert", "-O", "qcow2"])
        .arg(&empty)
        .arg(&empty_qcow2));
    check_qcow2_with_qemu(&empty_qcow2, &empty, &vec![0; MIB as usize]);
}

/// `--keep-backing`: a qcow2 overlay over the same base, holding just the
/// clusters the overlay has sectors in.
#[test]
fn qcow2_over_the_backing_file_holds_the_overlays_clusters_only() {
    let size = 600 * MIB + 300;
    let dir = Dir::new();
    let (base, cow) = (dir.join("base.img"), dir.join("vm.cow"));
    let mut model = make_base(&base, size, &[(0, 3 * MIB), (size - 1000, 1000)], 8);
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    change(&cow, &changes_for(size), &mut model);
    let (raw, qcow2) = (dir.join("out.img"), dir.join("out.qcow2"));
    convert(&cow, &raw);
    let said = run(ubd()
        .args([
            "convert",
            "-O",
            "qcow2",
            "--keep-backing",
            "--output",
            "json",
        ])
        .arg(&cow)
        .arg(&qcow2));
    let report: serde_json::Value = serde_json::from_str(&said).unwrap();
    let base_abs = fs::canonicalize(&base).unwrap();
    assert_eq!(
        report["backing_file"].as_str(),
        base_abs.to_str(),
        "{report}"
    );
    let qemu_img = tool("qemu-img", "qemu-utils");
    qemu_img_check(&qcow2);
    let info = qemu_img_info(&qcow2);
    assert_eq!(
        info["backing-filename"].as_str(),
        base_abs.to_str(),
        "{info}"
    );
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    // qemu reads what the overlay reads, the base's data included.
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&qcow2)
        .arg(&raw));
    // The top layer has a cluster where the overlay has any sector.
    let cluster = 64 * 1024;
    let clusters = size.div_ceil(cluster) as usize;
    let mut want = vec![false; clusters];
    let ubd_map: serde_json::Value =
        serde_json::from_str(&run(ubd().args(["map", "--output", "json"]).arg(&cow))).unwrap();
    for e in ubd_map.as_array().unwrap() {
        if e["depth"].as_u64() == Some(1) {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            for c in start / cluster..(start + len).div_ceil(cluster) {
                want[c as usize] = true;
            }
        }
    }
    let mut got = vec![false; clusters];
    let map: serde_json::Value = serde_json::from_str(&run(Command::new(&qemu_img)
        .args(["map", "--output", "json", "-f", "qcow2"])
        .arg(&qcow2)))
    .unwrap();
    for e in map.as_array().unwrap() {
        if e["depth"].as_u64() == Some(0) {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            for c in start / cluster..(start + len).div_ceil(cluster) {
                got[c as usize] = true;
            }
        }
    }
    assert!(want.iter().any(|&w| w) && !want.iter().all(|&w| w));
    assert_eq!(got, want, "clusters in qcow2's top layer vs the overlay's");
    // A raw source has no backing file to keep, and raw output keeps none.
    for (args, why) in [
        (
            vec!["-O", "qcow2", "--keep-backing"],
            "has no backing file to keep",
        ),
        (vec!["--keep-backing"], "--keep-backing is for -O qcow2"),
    ] {
        let res = output(
            ubd()
                .arg("convert")
                .args(&args)
                .arg(&raw)
                .arg(dir.join("no.qcow2")),
        );
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(!dir.join("no.qcow2").exists());
    }
}

/// An overlay fragmented past what one block-status answer holds (every
/// other sector of its first 40 MiB present: 81,920 runs): the qcow2 over
/// the backing file still holds the overlay's clusters only. Each answer
/// ends early there, and the conversion asks again from where it ended;
/// it used to take the rest of its 1 GiB window as the overlay's, copying
/// the backing file's data into the top layer.
#[test]
fn qcow2_over_the_backing_file_of_a_fragmented_overlay_holds_its_clusters_only() {
    let size = 128 * MIB;
    let fragmented = 40 * MIB;
    let dir = Dir::new();
    let (base, cow) = (dir.join("base.img"), dir.join("vm.cow"));
    make_base(&base, size, &[(0, size)], 21);
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    let bitmap = ubd_info(&cow)["bitmap_offset"].as_u64().unwrap();
    File::options()
        .write(true)
        .open(&cow)
        .unwrap()
        .write_all_at(&vec![0x55; (fragmented / 512 / 8) as usize], bitmap)
        .unwrap();
    let (raw, qcow2) = (dir.join("out.img"), dir.join("out.qcow2"));
    convert(&cow, &raw);
    run(ubd()
        .args(["convert", "-O", "qcow2", "--keep-backing"])
        .arg(&cow)
        .arg(&qcow2));
    let qemu_img = tool("qemu-img", "qemu-utils");
    qemu_img_check(&qcow2);
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&qcow2)
        .arg(&raw));
    let map: serde_json::Value = serde_json::from_str(&run(Command::new(&qemu_img)
        .args(["map", "--output", "json", "-f", "qcow2"])
        .arg(&qcow2)))
    .unwrap();
    let top: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"].as_u64() == Some(0))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        top,
        [(0, fragmented)],
        "the qcow2's top layer (start, length) vs the overlay's 40 MiB"
    );
}

/// A qcow2 image is the device's size (the backing file's, rounded up to a
/// whole sector, as qemu and the device both count it), so it holds what
/// the overlay has written past the backing file's last byte, in that
/// sector: qemu reads there what the device reads.
#[test]
fn qcow2_keeps_what_the_overlay_holds_past_the_backing_files_end() {
    let size = 3 * 64 * 1024 + 1000;
    let dir = Dir::new();
    let (base, cow) = (dir.join("base.img"), dir.join("vm.cow"));
    let mut model = make_base(&base, size, &[(0, size)], 9);
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    let padded = size.next_multiple_of(512);
    model.resize(padded as usize, 0);
    // Through the device, whose capacity is the rounded size: the last
    // sector, across the backing file's end.
    change(
        &cow,
        &[Change::Write(size - 10, pseudo_random_bytes(33, 34))],
        &mut model,
    );
    let dev = Device::open(
        &cow,
        &DeviceOptions {
            read_only: true,
            ..DeviceOptions::default()
        },
    )
    .unwrap();
    assert_eq!(dev.capacity(), padded);
    let mut device_reads = vec![0u8; padded as usize];
    dev.read_at(0, &mut device_reads).unwrap();
    dev.close().unwrap();
    assert_same("the device vs the model", &device_reads, &model);
    let qemu_img = tool("qemu-img", "qemu-utils");
    for (name, qcow2) in both_qcow2s(&dir, &cow) {
        let back = dir.join("back.img");
        let _ = fs::remove_file(&back);
        run(Command::new(&qemu_img)
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&qcow2)
            .arg(&back));
        assert_same(
            &format!("qemu's read of {name} vs the device's"),
            &read_all(&back),
            &device_reads,
        );
    }
}

/// `cow` converted to qcow2 in `dir`, without and with --keep-backing:
/// (file name, path) of each.
fn both_qcow2s(dir: &Dir, cow: &Path) -> [(&'static str, PathBuf); 2] {
    [
        ("plain.qcow2", None),
        ("over.qcow2", Some("--keep-backing")),
    ]
    .map(|(name, extra)| {
        let qcow2 = dir.join(name);
        run(ubd()
            .args(["convert", "-O", "qcow2"])
            .args(extra)
            .arg(cow)
            .arg(&qcow2));
        (name, qcow2)
    })
}

/// An image of no bytes has no L1 table: qemu-img check finds no cluster
/// that nothing uses.
#[test]
fn qcow2_of_an_empty_image_has_no_leaked_cluster() {
    let dir = Dir::new();
    let (base, cow) = (dir.join("base.img"), dir.join("vm.cow"));
    File::create(&base).unwrap();
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    for (_, qcow2) in both_qcow2s(&dir, &cow) {
        qemu_img_check(&qcow2);
        let info = qemu_img_info(&qcow2);
        assert_eq!(info["virtual-size"].as_u64(), Some(0), "{info}");
    }
}

#[test]
fn other_output_formats_are_refused() {
    let dir = Dir::new();
    let (base, cow, out) = (
        dir.join("base.img"),
        dir.join("vm.cow"),
        dir.join("out.img"),
    );
    make_base(&base, MIB, &[], 0);
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    let res = output(ubd().args(["convert", "-O", "vmdk"]).arg(&cow).arg(&out));
    assert_eq!(res.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("raw and qcow2 images"), "{stderr}");
    assert!(!out.exists());
    // --import makes an overlay: no -O there.
    let res = output(
        ubd()
            .args(["convert", "-O", "qcow2", "--import"])
            .arg(&base)
            .arg("--backing")
            .arg(&base)
            .arg(dir.join("new.cow")),
    );
    assert_eq!(res.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("with --import"), "{stderr}");
    assert!(!dir.join("new.cow").exists());
}

/// Past 2 TiB, where uml_moo's counters stop: sparse files make it cheap.
#[test]
fn converts_past_2_tib() {
    let size = (2u64 << 40) + MIB + 300;
    let dir = Dir::new();
    let (base, cow, out) = (
        dir.join("base.img"),
        dir.join("big.cow"),
        dir.join("out.img"),
    );
    let f = File::create(&base).unwrap();
    f.set_len(size).unwrap();
    let past = (2u64 << 40) + 4096;
    f.write_all_at(b"from the base", past).unwrap();
    drop(f);
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    let dev = Device::open(&cow, &DeviceOptions::default()).unwrap();
    dev.write_at(past + 5000, b"from the overlay", Flags::default())
        .unwrap();
    dev.write_at(size - 7, b"the end", Flags::default())
        .unwrap();
    dev.flush().unwrap();
    dev.close().unwrap();
    drop(dev);

    convert(&cow, &out);
    let f = File::open(&out).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    let at = |offset: u64, len: usize| {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).unwrap();
        buf
    };
    assert_eq!(at(past, 13), b"from the base");
    assert_eq!(at(past + 5000, 16), b"from the overlay");
    assert_eq!(at(size - 7, 7), b"the end");
    assert_eq!(at(past - 4096, 4096), vec![0u8; 4096]);
    assert!(allocated(&out) < MIB);

    // As qcow2: qemu reads the same bytes (qemu-img compare skips what both
    // leave unallocated, so this stays quick).
    let qcow2 = dir.join("out.qcow2");
    run(ubd().args(["convert", "-O", "qcow2"]).arg(&cow).arg(&qcow2));
    let qemu_img = tool("qemu-img", "qemu-utils");
    qemu_img_check(&qcow2);
    run(Command::new(&qemu_img)
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&qcow2)
        .arg(&out));
    assert!(allocated(&qcow2) < 2 * MIB);
}

/// Ctrl-C (SIGINT) mid-copy removes the partial OUT and exits 130; if the
/// copy won the race, OUT is complete.
#[test]
fn interrupt_removes_the_partial_out() {
    let size = 192 * MIB;
    let dir = Dir::new();
    let (base, cow, out) = (
        dir.join("base.img"),
        dir.join("vm.cow"),
        dir.join("out.img"),
    );
    let model = make_base(&base, size, &[(0, size)], 7);
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    let mut child = ubd()
        .arg("convert")
        .arg(&cow)
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Signal once OUT exists (or the child is already done).
    while !out.exists() && child.try_wait().unwrap().is_none() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    output(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let res = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    match res.status.code() {
        Some(130) => {
            assert!(stderr.contains("interrupted"), "{stderr}");
            assert!(!out.exists(), "the partial OUT is still there");
        }
        Some(0) => assert_same("finished before the signal", &read_all(&out), &model),
        other => panic!("convert exited {other:?}: {stderr}"),
    }
}

/// A raw image that ends in a partial sector converts to a qcow2 image of
/// whole sectors (qemu's size for it), and the report gives that size, the
/// one qemu-img info reads.
#[test]
fn qcow2_of_a_raw_image_with_a_partial_sector_reports_the_images_size() {
    let dir = Dir::new();
    let raw = dir.join("ragged.img");
    fs::write(&raw, pseudo_random_bytes(41, 1000)).unwrap();
    let qcow2 = dir.join("ragged.qcow2");
    let said = run(ubd()
        .args(["convert", "-O", "qcow2", "--output", "json"])
        .arg(&raw)
        .arg(&qcow2));
    let report: serde_json::Value = serde_json::from_str(&said).unwrap();
    let info = qemu_img_info(&qcow2);
    assert_eq!(info["virtual-size"].as_u64(), Some(1024), "{info}");
    assert_eq!(
        report["virtual_size"], info["virtual-size"],
        "the report's size is not the image's: {report}"
    );
}
