//! `ubd create`, `info` and `check` against the real uml-utilities and against
//! files of every header version.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{output, run, tool, ubd, ubd_info as info};
use serde_json::Value;
use ubd_cow::{ByteOrder, Geometry, Header, Version, legacy};

fn sparse_file(path: &Path, len: u64) {
    File::create(path).unwrap().set_len(len).unwrap();
}

fn uml_mkcow(cow: &Path, backing: &Path) {
    run(Command::new(tool("uml_mkcow", "uml-utilities"))
        .arg(cow)
        .arg(backing));
}

/// The first `len` bytes of a file (fewer if it is shorter).
fn head(path: &Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = Vec::new();
    File::open(path)
        .unwrap()
        .take(len as u64)
        .read_to_end(&mut bytes)
        .unwrap();
    bytes
}

fn parse(path: &Path) -> Header {
    Header::parse(&head(path, ubd_cow::MAX_HEADER_SIZE)).unwrap()
}

/// Runs `ubd check` and returns its exit code and its one line of output.
fn check(path: &Path, extra: &[&str]) -> (i32, String) {
    let out = output(ubd().arg("check").args(extra).arg(path));
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(stdout.lines().count(), 1, "check printed {stdout:?}");
    (out.status.code().unwrap(), stdout)
}

fn set_bits(cow: &Path, sectors: &[u64]) {
    let h = parse(cow);
    let g = Geometry::new(&h).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(cow).unwrap();
    for &n in sectors {
        let at = g.bitmap_offset + n / 8;
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] |= 1 << (n % 8);
        f.write_all_at(&b, at).unwrap();
    }
}

/// Overlays made by uml_mkcow parse with the geometry cow-format.md measured.
#[test]
fn uml_mkcow_overlays_have_the_documented_geometry() {
    let dir = tempfile::tempdir().unwrap();
    for (size, bitmap_len, data_offset, file_len) in [
        (1_000_000u64, 245u64, 12_288u64, 1_012_288u64),
        (64 << 20, 16_384, 24_576, 67_133_440),
        (1 << 30, 262_144, 270_336, 1_074_012_160),
        (10 << 30, 2_621_440, 2_629_632, 10_740_047_872),
    ] {
        let base = dir.path().join(format!("base-{size}"));
        let cow = dir.path().join(format!("cow-{size}"));
        sparse_file(&base, size);
        uml_mkcow(&cow, &base);
        let h = parse(&cow);
        assert_eq!(h.version, Version::V3);
        assert_eq!(h.size, size);
        assert_eq!((h.sector_size, h.alignment), (512, 4096));
        let g = Geometry::new(&h).unwrap();
        assert_eq!(
            (g.bitmap_offset, g.bitmap_len, g.data_offset),
            (8192, bitmap_len, data_offset)
        );
        assert_eq!(fs::metadata(&cow).unwrap().len(), file_len);

        let j = info(&cow);
        assert_eq!(j["format"], "cow");
        assert_eq!(j["bitmap_length"], bitmap_len);
        assert_eq!(j["data_offset"], data_offset);
        assert_eq!(j["file_length"], file_len);
        assert_eq!(j["sectors_present"], 0);
        assert_eq!(j["sectors_total"], size.div_ceil(512));
        assert_eq!(j["backing_matches"], true);
        assert_eq!(check(&cow, &[]).0, 0);
    }
}

/// `ubd create` and `uml_mkcow` agree on every header field and on file length,
/// including backing paths through symlinked directories and odd sizes.
#[test]
fn ubd_create_agrees_with_uml_mkcow() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
    for size in [1u64, 511, 512, 1537, 1_000_000, 32 << 10, 64 << 20, 3 << 30] {
        let base = real.join(format!("base-{size}.img"));
        sparse_file(&base, size);
        // Name the backing file through the symlinked directory and a `..`.
        let named = dir.path().join(format!("link/../link/base-{size}.img"));
        let ours = dir.path().join(format!("ours-{size}.cow"));
        let theirs = dir.path().join(format!("theirs-{size}.cow"));
        run(ubd().args(["create", "--backing"]).arg(&named).arg(&ours));
        uml_mkcow(&theirs, &named);
        let (a, b) = (parse(&ours), parse(&theirs));
        assert_eq!(a, b, "size {size}");
        assert_eq!(
            a.backing_file,
            fs::canonicalize(&real)
                .unwrap()
                .join(format!("base-{size}.img"))
        );
        assert_eq!(
            fs::metadata(&ours).unwrap().len(),
            fs::metadata(&theirs).unwrap().len(),
            "size {size}"
        );
        // Our header is the same bytes up to the path's NUL, and zeros after.
        let g = Geometry::new(&a).unwrap();
        let len = g.data_offset as usize;
        let (x, y) = (head(&ours, len), head(&theirs, len));
        let end = 32 + a.backing_file.as_os_str().len() + 1;
        assert_eq!(x[..end], y[..end], "size {size}");
        assert!(x[end..].iter().all(|&b| b == 0));
        // Sparse: the data area takes no space.
        let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&ours).unwrap()) * 512;
        assert!(
            used <= g.data_offset + 4096,
            "size {size}: {used} bytes used"
        );
    }
}

/// v1 (both byte orders), v2 and broken-v3 files built here read with the
/// right geometry and bitmap, and check clean against a matching backing file.
#[test]
fn old_layouts_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let size = 1_000_000u64;
    sparse_file(&base, size);
    let mtime = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&base).unwrap().mtime() as u32
    };
    for (version, order, bitmap_offset, bitmap_len, data_offset) in [
        (Version::V1, ByteOrder::Little, 280u64, 244u64, 1024u64),
        (Version::V1, ByteOrder::Big, 280, 244, 1024),
        (Version::V2, ByteOrder::Big, 4120, 244, 4608),
        (Version::V3Broken, ByteOrder::Big, 8192, 245, 12288),
    ] {
        let header = Header {
            version,
            magic_order: order,
            backing_file: base.clone(),
            mtime,
            size,
            sector_size: 512,
            alignment: if version == Version::V3Broken {
                4096
            } else {
                512
            },
            cow_format: 0,
        };
        let cow = dir
            .path()
            .join(format!("{}-{}.cow", version.name(), order.name()));
        let mut bytes = legacy::encode(&header).unwrap();
        bytes.resize((data_offset + size) as usize, 0);
        fs::write(&cow, &bytes).unwrap();
        set_bits(&cow, &[0, 7, 8, 1000, 1951]);
        let j = info(&cow);
        let what = format!("{version:?} {order:?}");
        assert_eq!(j["version"], version.number(), "{what}");
        assert_eq!(j["layout"], version.name(), "{what}");
        assert_eq!(j["magic_byte_order"], order.name(), "{what}");
        assert_eq!(j["bitmap_offset"], bitmap_offset, "{what}");
        assert_eq!(j["bitmap_length"], bitmap_len, "{what}");
        assert_eq!(j["data_offset"], data_offset, "{what}");
        assert_eq!(j["sectors_present"], 5, "{what}");
        assert_eq!(j["sectors_total"], 1954, "{what}");
        assert_eq!(j["backing_file"], base.to_str().unwrap(), "{what}");
        let (code, line) = check(&cow, &[]);
        assert_eq!(code, 0, "{what}: {line}");
    }
}

#[test]
fn create_refuses_an_existing_file_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    sparse_file(&base, 1 << 20);
    let cow = dir.path().join("cow");
    fs::write(&cow, b"precious").unwrap();
    let before = fs::metadata(&cow).unwrap().modified().unwrap();
    let out = output(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(fs::read(&cow).unwrap(), b"precious");
    assert_eq!(fs::metadata(&cow).unwrap().modified().unwrap(), before);
    // Raw images too.
    let out = output(ubd().arg("create").arg(&cow).arg("1M"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(fs::read(&cow).unwrap(), b"precious");
}

/// `--force` truncates first: an old bitmap never survives under the new header
/// (which is what `uml_mkcow -f` does).
#[test]
fn create_force_starts_from_an_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    sparse_file(&base, 1 << 20);
    let cow = dir.path().join("cow");
    uml_mkcow(&cow, &base);
    set_bits(&cow, &[1, 2, 3, 2047]);
    // Leave data in the data area too.
    OpenOptions::new()
        .write(true)
        .open(&cow)
        .unwrap()
        .write_all_at(&[0xEE; 512], 12_288 + 512)
        .unwrap();
    assert_eq!(info(&cow)["sectors_present"], 4);
    run(ubd()
        .args(["create", "--force", "--backing"])
        .arg(&base)
        .arg(&cow));
    let j = info(&cow);
    assert_eq!(j["sectors_present"], 0);
    assert_eq!(j["file_length"], 12_288 + (1 << 20));
    let bytes = fs::read(&cow).unwrap();
    assert!(bytes[4128..].iter().all(|&b| b == 0));

    // Never over the backing file itself, whatever it is called.
    let alias = dir.path().join("alias.img");
    fs::hard_link(&base, &alias).unwrap();
    let base_bytes = fs::read(&base).unwrap();
    let out = output(
        ubd()
            .args(["create", "--force", "--backing"])
            .arg(&base)
            .arg(&alias),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("over itself"));
    assert_eq!(fs::read(&base).unwrap(), base_bytes);
}

/// A file another process holds a POSIX lock on (as UML does) is not replaced,
/// and the message names that process.
#[test]
fn create_force_refuses_a_locked_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    sparse_file(&base, 1 << 20);
    let cow = dir.path().join("cow");
    uml_mkcow(&cow, &base);
    set_bits(&cow, &[5]);
    let mut holder = common::hold_posix_lock(&cow);
    let out = output(
        ubd()
            .args(["create", "--force", "--backing"])
            .arg(&base)
            .arg(&cow),
    );
    let pid = holder.id();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains(&format!("process {pid}")),
        "{err}"
    );
    assert_eq!(info(&cow)["sectors_present"], 1);
}

fn fresh_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.img");
    fs::write(&base, common::pseudo_random_bytes(1, 1 << 20)).unwrap();
    let cow = dir.join("cow");
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    (base, cow)
}

#[test]
fn check_passes_a_clean_overlay_and_follows_a_moved_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = fresh_pair(dir.path());
    set_bits(&cow, &[0, 100]);
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 0, "{line}");
    assert!(
        line.contains("clean") && line.contains("2 of 2048"),
        "{line}"
    );

    // A rename keeps the mtime: the header's path no longer works, --backing does.
    let moved = dir.path().join("moved.img");
    fs::rename(&base, &moved).unwrap();
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 3, "{line}");
    assert!(line.contains("No such file"), "{line}");
    let (code, line) = check(&cow, &["--backing", moved.to_str().unwrap()]);
    assert_eq!(code, 0, "{line}");
    let j: Value = serde_json::from_str(&run(ubd()
        .args(["info", "--output", "json", "--backing"])
        .arg(&moved)
        .arg(&cow)))
    .unwrap();
    assert_eq!(j["backing_matches"], true);
}

#[test]
fn check_catches_a_changed_backing_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = fresh_pair(dir.path());
    run(Command::new("touch")
        .args(["-d", "2001-02-03 04:05:06"])
        .arg(&base));
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 3, "{line}");
    assert!(line.contains("mtime 981173106"), "{line}");
    assert!(line.contains("modified or touched"), "{line}");
    assert_eq!(info(&cow)["backing_matches"], false);
}

#[test]
fn check_catches_a_changed_backing_size() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = fresh_pair(dir.path());
    let f = OpenOptions::new().write(true).open(&base).unwrap();
    f.set_len(1 << 21).unwrap();
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 3, "{line}");
    assert!(
        line.contains("2097152 bytes") && line.contains("1048576"),
        "{line}"
    );
}

/// A backing file this user cannot read: check says so (exit 3) and info
/// does not call it a match, naming the file, instead of calling the pair
/// clean while every verb that reads it fails. As root, ubd runs as nobody
/// (setpriv), for whom the permissions bite.
#[test]
fn check_catches_a_backing_file_it_cannot_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mode = |path: &Path, mode| fs::set_permissions(path, fs::Permissions::from_mode(mode));
    mode(dir.path(), 0o755).unwrap();
    let (base, cow) = fresh_pair(dir.path());
    mode(&cow, 0o644).unwrap();
    let as_user = |args: &[&str]| {
        let mut cmd = if nix::unistd::geteuid().is_root() {
            let mut cmd = Command::new(tool("setpriv", "util-linux"));
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(common::ubd_bin());
            cmd
        } else {
            ubd()
        };
        let out = output(cmd.args(args).arg(&cow));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, line) = as_user(&["check"]);
    assert_eq!(code, Some(0), "{line}");
    mode(&base, 0o600).unwrap();
    let (code, line) = as_user(&["check"]);
    assert_eq!(code, Some(3), "{line}");
    assert!(
        line.contains(&format!(
            "{}: cannot open: Permission denied",
            base.display()
        )),
        "{line}"
    );
    let (code, json) = as_user(&["info", "--output", "json"]);
    assert_eq!(code, Some(0), "{json}");
    let j: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["backing_matches"], false, "{j}");
}

#[test]
fn check_catches_a_truncated_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cow) = fresh_pair(dir.path());
    let f = OpenOptions::new().write(true).open(&cow).unwrap();
    // Into the data area, then into the bitmap.
    f.set_len(12_288 + 4096).unwrap();
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 2, "{line}");
    assert!(
        line.contains("truncated") && line.contains("16384 bytes"),
        "{line}"
    );
    f.set_len(8192 + 10).unwrap();
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 2, "{line}");
    assert!(
        line.contains("shorter than its data offset 12288"),
        "{line}"
    );
    f.set_len(100).unwrap();
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 2, "{line}");
    assert!(
        line.contains("corrupt header") && line.contains("4128"),
        "{line}"
    );
}

#[test]
fn check_catches_a_corrupted_magic() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cow) = fresh_pair(dir.path());
    OpenOptions::new()
        .write(true)
        .open(&cow)
        .unwrap()
        .write_all_at(b"X", 0)
        .unwrap();
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("no COW magic"), "{line}");
    // info calls it a raw image.
    assert_eq!(info(&cow)["format"], "raw");
}

#[test]
fn check_catches_bits_past_the_last_sector() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    // 1954 sectors: the bitmap's last byte has 6 bits with no sector.
    sparse_file(&base, 1_000_000);
    let cow = dir.path().join("cow");
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    set_bits(&cow, &[1953]);
    assert_eq!(check(&cow, &[]).0, 0);
    set_bits(&cow, &[1955]);
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("1 bit(s) set past the last sector"), "{line}");
    // A header that lies about its version gets its own message.
    OpenOptions::new()
        .write(true)
        .open(&cow)
        .unwrap()
        .write_all_at(&7u32.to_be_bytes(), 4)
        .unwrap();
    let (code, line) = check(&cow, &[]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("unknown COW version 7"), "{line}");
}

#[test]
fn check_output_json_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cow) = fresh_pair(dir.path());
    let j: Value =
        serde_json::from_str(&run(ubd().args(["check", "--output", "json"]).arg(&cow))).unwrap();
    assert_eq!(j["result"], "clean");
    assert_eq!(j["exit_code"], 0);
    assert_eq!(j["sectors_present"], 0);
    // A file that cannot be read: exit 1, the path in the message.
    let missing = dir.path().join("nope.cow");
    let out = output(ubd().arg("check").arg(&missing));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope.cow") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn create_raw_image_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let text = run(ubd().arg("create").arg(&disk).arg("10G"));
    assert!(text.contains("10G (10737418240 bytes)"), "{text}");
    let j = info(&disk);
    assert_eq!(j["format"], "raw");
    assert_eq!(j["virtual_size"], 10u64 << 30);
    let human = run(ubd().arg("info").arg(&disk));
    assert!(human.contains("virtual size: 10G"), "{human}");
    let out = output(ubd().arg("create").arg(dir.path().join("x")).arg("12Q"));
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown size unit"));
}

/// A SIZE past what a file can hold is refused in words, before FILE is
/// touched: an existing one given with --force keeps its contents.
#[test]
fn create_refuses_a_size_no_file_can_hold() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, b"keep me").unwrap();
    for size in ["8E", "15E", "9223372036854775808"] {
        let out = output(ubd().args(["create", "--force"]).arg(&disk).arg(size));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{size}: {err}");
        assert!(
            err.contains("SIZE") && err.contains("more than a file can hold"),
            "{size}: {err}"
        );
        assert_eq!(fs::read(&disk).unwrap(), b"keep me", "{size}");
    }
    let out = output(ubd().arg("create").arg(dir.path().join("x")).arg("-1"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("negative"), "{err}");
}

/// An overlay given as another overlay's backing file (a slip for its
/// base): overlays do not chain, so `create` and the readers warn, naming
/// it, as for a qcow2 file there.
#[test]
fn an_overlay_as_a_backing_file_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, cow, _) = common::base_and_overlay(dir.path(), 5, 1 << 20);
    let over = dir.path().join("over.cow");
    let out = output(ubd().args(["create", "--backing"]).arg(&cow).arg(&over));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warning = format!(
        "{}: the backing file {}: is a UML COW overlay",
        over.display(),
        cow.display()
    );
    assert!(
        stderr.contains(&warning),
        "ubd create does not warn: {stderr}"
    );
    assert!(stderr.contains("ubd convert"), "{stderr}");
    let out = output(ubd().arg("map").arg(&over));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&warning), "ubd map does not warn: {stderr}");
}

/// A qcow2, VMDK or VDI file given where a raw image goes is still read as
/// a raw disk, but `info` says what it looks like, and the verbs that read
/// it warn, naming the file. qemu-img makes the images.
#[test]
fn images_of_other_formats_are_named_for_what_they_look_like() {
    let dir = tempfile::tempdir().unwrap();
    let qemu_img = tool("qemu-img", "qemu-utils");
    for (format, name) in [("qcow2", "qcow2"), ("vmdk", "VMDK"), ("vdi", "VDI")] {
        let path = dir.path().join(format!("disk.{format}"));
        run(Command::new(&qemu_img)
            .args(["create", "-q", "-f", format])
            .arg(&path)
            .arg("16M"));
        let report = info(&path);
        assert_eq!(report["format"], "raw", "{report}");
        assert_eq!(report["starts_like"], name, "{report}");
        let human = run(ubd().arg("info").arg(&path));
        assert!(
            human.contains(&format!("starts with a {name} header")),
            "{human}"
        );
        let out = output(ubd().arg("map").arg(&path));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("{}: starts with a {name} header", path.display())),
            "ubd map does not warn: {stderr}"
        );
        // Imported as a raw image: `convert --import` warns.
        let base = dir.path().join("zero.img");
        sparse_file(&base, 16 << 20);
        let imported = dir.path().join(format!("imported-{format}.cow"));
        let out = output(
            ubd()
                .args(["convert", "--import"])
                .arg(&path)
                .arg("--backing")
                .arg(&base)
                .arg(&imported),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{}: starts with a {name} header", path.display())),
            "ubd convert --import does not warn: {stderr}"
        );
        // As an overlay's backing file: `create` and the readers warn.
        let cow = dir.path().join(format!("over-{format}.cow"));
        let out = output(ubd().args(["create", "--backing"]).arg(&path).arg(&cow));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let warning = format!(
            "the backing file {}: starts with a {name} header",
            path.display()
        );
        assert!(
            stderr.contains(&warning),
            "ubd create does not warn: {stderr}"
        );
        for verb in [&["map"][..], &["rebase", "--backing"][..]] {
            let mut cmd = ubd();
            cmd.args(verb);
            if verb.len() > 1 {
                cmd.arg(&path);
            }
            let out = output(cmd.arg(&cow));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{verb:?}: {stderr}");
            assert!(
                stderr.contains(&format!("{}: {warning}", cow.display())),
                "ubd {verb:?} of the overlay does not warn: {stderr}"
            );
        }
        // `commit` writes into it: warned first (it goes on, as before).
        let out = output(ubd().arg("commit").arg(&cow));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "commit: {stderr}");
        assert!(
            stderr.contains(&format!("{}: {warning}", cow.display())),
            "ubd commit does not warn: {stderr}"
        );
    }
    // A raw disk with a file system (or nothing) at its start: no such word.
    let raw = dir.path().join("fs.img");
    sparse_file(&raw, 16 << 20);
    run(Command::new(tool("mkfs.ext4", "e2fsprogs"))
        .args(["-q", "-F"])
        .arg(&raw));
    assert_eq!(info(&raw).get("starts_like"), None);
    let out = output(ubd().arg("map").arg(&raw));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("header"));
}
