//! Overlays whose header lies: a size the file cannot hold, a bitmap too large
//! to hold in memory, a backing path naming a device node, FIFO or socket, a
//! backing path without its NUL. `ubd info`, `ubd check` and `ubd serve` each
//! refuse them with a clear message naming the file, at once: no panic, no
//! hang, no huge allocation.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::server::serve_refused;
use common::{output, run, ubd};
use ubd_cow::{ByteOrder, Header, Version, legacy};

fn sparse_file(path: &Path, len: u64) {
    File::create(path).unwrap().set_len(len).unwrap();
}

/// An honest overlay `cow` over a 1 MiB `base.img` in `dir`.
fn honest(dir: &Path) -> PathBuf {
    let base = dir.join("base.img");
    sparse_file(&base, 1 << 20);
    let cow = dir.join("cow");
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    cow
}

fn patch(cow: &Path, at: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(cow)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

/// Makes the v3 header of `cow` name `path` as its backing file.
fn name_backing(cow: &Path, path: &Path) {
    let mut field = vec![0u8; 4096];
    let name = path.as_os_str().as_encoded_bytes();
    field[..name.len()].copy_from_slice(name);
    patch(cow, 32, &field);
}

/// What `ubd info`, `ubd check` and `ubd serve` did with `cow`: exit code
/// and the message (stderr for info and serve, check's line).
struct Verdicts {
    info: (Option<i32>, String),
    check: (Option<i32>, String),
    serve: (Option<i32>, String),
}

fn verdicts(cow: &Path) -> Verdicts {
    let out = output(ubd().arg("info").arg(cow));
    let info = (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    let out = output(ubd().arg("check").arg(cow));
    let check = (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    );
    let serve = serve_refused(&cow.with_extension("sock"), &[cow]);
    Verdicts { info, check, serve }
}

/// Each verb exited with its code and said `words`, naming the overlay.
fn assert_refused(cow: &Path, v: &Verdicts, codes: [i32; 3], words: &str) {
    let name = cow.to_str().unwrap();
    for (verb, (code, msg), want) in [
        ("info", &v.info, codes[0]),
        ("check", &v.check, codes[1]),
        ("serve", &v.serve, codes[2]),
    ] {
        assert_eq!(*code, Some(want), "{verb}: {msg}");
        assert!(msg.contains(name), "{verb} does not name {name}: {msg}");
        assert!(msg.contains(words), "{verb} does not say {words:?}: {msg}");
        assert!(!msg.contains("panicked"), "{verb}: {msg}");
    }
}

/// The header claims a 1 TiB backing file, whose 256 MiB bitmap runs past the
/// end of the 1 MiB overlay.
#[test]
fn a_bitmap_past_the_end_of_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cow = honest(dir.path());
    patch(&cow, 12, &(1u64 << 40).to_be_bytes());
    let v = verdicts(&cow);
    assert_refused(
        &cow,
        &v,
        [1, 2, 1],
        "shorter than its data offset 268443648",
    );
    assert!(v.check.1.contains("truncated"), "{}", v.check.1);
}

/// A header that claims a huge backing file, in a sparse file big enough to
/// hold the bitmap it implies (8 TiB): check and info answer at once (holes
/// in the bitmap are skipped), and nothing tries to hold that bitmap: the
/// device refuses the pair before reading it.
#[test]
fn a_lying_header_with_a_huge_bitmap_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cow = honest(dir.path());
    patch(&cow, 12, &(1u64 << 55).to_be_bytes());
    OpenOptions::new()
        .write(true)
        .open(&cow)
        .unwrap()
        .set_len(9 << 40)
        .unwrap();
    let out = output(ubd().args(["check"]).arg(&cow));
    let line = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{line}");
    assert!(line.contains("truncated"), "{line}");
    let j = common::ubd_info(&cow);
    assert_eq!(j["backing_matches"], false);
    assert_eq!(j["sectors_present"], 0);
    let lie = "made for 36028797018963968 bytes";
    let out = output(ubd().args(["bench", "--count", "1"]).arg(&cow));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(lie));
    let (code, err) = serve_refused(&dir.path().join("s.sock"), &[&cow]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(lie) && err.contains(cow.to_str().unwrap()),
        "{err}"
    );
}

/// A bitmap too large to hold, behind a header that matches its backing
/// file (1 PiB, sparse on tmpfs, which holds files that large): the 256 GiB
/// bitmap is refused before anything is allocated; info and check skip its
/// holes and answer at once.
#[test]
fn a_bitmap_larger_than_memory_is_refused_before_it_is_allocated() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let base = dir.path().join("base.img");
    sparse_file(&base, 1 << 50);
    let cow = dir.path().join("big.cow");
    run(ubd().args(["create", "--backing"]).arg(&base).arg(&cow));
    let j = common::ubd_info(&cow);
    assert_eq!(j["bitmap_length"], 1u64 << 38);
    assert_eq!(j["backing_matches"], true);
    let out = output(ubd().arg("check").arg(&cow));
    assert_eq!(out.status.code(), Some(0));
    let (code, err) = serve_refused(&dir.path().join("s.sock"), &[&cow]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(cow.to_str().unwrap())
            && err.contains("cannot hold the bitmap in memory")
            && err.contains("274877906944-byte bitmap"),
        "{err}"
    );
    // commit holds the bitmap too.
    let out = output(ubd().arg("commit").arg(&cow));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot hold the bitmap"));
}

/// A block device, a character device, a FIFO and a socket as the backing
/// file, named directly or through a symlink: refused, not opened (a FIFO
/// would make an open hang; a device would serve the host's data).
#[test]
fn a_backing_path_naming_a_device_node_fifo_or_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let blk = dir.path().join("blk");
    run(Command::new("mknod").arg(&blk).args(["b", "7", "250"]));
    let fifo = dir.path().join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let link = dir.path().join("zero-link");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    for (target, kind) in [
        (blk, "is a block device"),
        (PathBuf::from("/dev/zero"), "is a character device"),
        (fifo, "is a FIFO"),
        (sock, "is a socket"),
        (
            link.clone(),
            "(resolves to /dev/zero) is a character device",
        ),
        (dir.path().to_path_buf(), "is a directory"),
    ] {
        let case = tempfile::tempdir().unwrap();
        let cow = honest(case.path());
        name_backing(&cow, &target);
        let v = verdicts(&cow);
        let words = format!("{} {kind}, not a regular file", target.display());
        assert_refused(&cow, &v, [1, 3, 1], &words);
    }
    // --backing naming one is refused the same way, and `create` makes no
    // overlay over one.
    let cow = honest(dir.path());
    let out = output(ubd().args(["info", "--backing", "/dev/zero"]).arg(&cow));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
    let out = output(
        ubd()
            .args(["create", "--backing"])
            .arg(&link)
            .arg(dir.path().join("new.cow")),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a character device"));
    assert!(!dir.path().join("new.cow").exists());
}

/// A backing path that fills its field without a NUL. UML's reader
/// (`read_cow_header`) copies the field with an unbounded `strdup`, running
/// into the bytes after it; ubd refuses the header instead, in v3 (4096-byte
/// field at offset 32) and v1 (256 bytes at offset 8) alike.
#[test]
fn a_backing_path_without_its_nul_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cow = honest(dir.path());
    patch(&cow, 32, &[b'a'; 4096]);
    let v = verdicts(&cow);
    let words = "backing file path at offset 32 is not NUL-terminated within its 4096-byte field";
    assert_refused(&cow, &v, [1, 2, 1], words);

    let v1 = dir.path().join("v1.cow");
    let header = Header {
        version: Version::V1,
        magic_order: ByteOrder::Little,
        backing_file: dir.path().join("base.img"),
        mtime: 0,
        size: 1 << 20,
        sector_size: 512,
        alignment: 512,
        cow_format: 0,
    };
    let mut bytes = legacy::encode(&header).unwrap();
    bytes[8..264].fill(b'/');
    bytes.resize(1024 + (1 << 20), 0);
    fs::write(&v1, &bytes).unwrap();
    let v = verdicts(&v1);
    let words = "backing file path at offset 8 is not NUL-terminated within its 256-byte field";
    assert_refused(&v1, &v, [1, 2, 1], words);
}

/// Runs `ubd ARGS...`, which must exit within 10 s; kills it and fails
/// otherwise. Returns its exit code and stderr.
fn exits_at_once(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::Duration;
    let mut cmd = ubd();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let command = common::command_line(&cmd);
    let mut child = cmd.spawn().unwrap();
    let status = common::waited(&mut child, &command, Duration::from_secs(10));
    let mut stderr = String::new();
    child
        .stderr
        .as_mut()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

/// A FIFO, a directory or a character device given as the image itself:
/// every verb refuses it at once, naming it. A FIFO with no writer made the
/// open block for ever (and convert, compare and commit, which catch
/// SIGTERM, then ignored `timeout`); /dev/zero was read as an empty disk.
#[test]
fn an_image_that_is_a_fifo_directory_or_character_device_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cow = honest(dir.path());
    let base = dir.path().join("base.img");
    let fifo = dir.path().join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    let out = dir.path().join("out.img");
    let new = dir.path().join("new.cow");
    for (image, kind) in [
        (fifo.as_path(), "FIFO"),
        (dir.path(), "directory"),
        (Path::new("/dev/zero"), "character device"),
    ] {
        let i = image.as_os_str();
        let verbs: [&[&std::ffi::OsStr]; 9] = [
            &["info".as_ref(), i],
            &["check".as_ref(), i],
            &["map".as_ref(), i],
            &["bench".as_ref(), "--count".as_ref(), "1".as_ref(), i],
            &["convert".as_ref(), "--force".as_ref(), i, out.as_os_str()],
            &["compare".as_ref(), cow.as_os_str(), i],
            &["commit".as_ref(), i],
            &["rebase".as_ref(), "--backing".as_ref(), base.as_os_str(), i],
            &[
                "convert".as_ref(),
                "--import".as_ref(),
                i,
                "--backing".as_ref(),
                base.as_os_str(),
                new.as_os_str(),
            ],
        ];
        for args in verbs {
            let (code, err) = exits_at_once(args);
            let words = format!(
                "{}: cannot open: it is a {kind}, not a regular file or block device",
                image.display()
            );
            assert!(matches!(code, Some(1 | 2)), "{args:?}: {code:?} {err}");
            assert!(err.contains(&words), "{args:?}: {err}");
        }
        let (code, err) = serve_refused(&dir.path().join("s.sock"), &[image]);
        assert_eq!(code, Some(1), "{err}");
        // Opened for writing, a directory fails the open itself (EISDIR).
        assert!(
            err.contains(&format!("{}: cannot open", image.display())),
            "{err}"
        );
    }
}

/// An overlay that names itself (or a hard link to itself) as its backing
/// file is refused, saying so, by every verb that would read it; before,
/// the read-only verbs read the overlay's own header and bitmap as the disk,
/// and serve and commit blamed "another process" for the lock it held itself.
#[test]
fn an_overlay_naming_itself_as_its_backing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cow = honest(dir.path());
    let link = dir.path().join("link.cow");
    fs::hard_link(&cow, &link).unwrap();
    for named in [&cow, &link] {
        name_backing(&cow, named);
        let words = format!("backing file {} is the overlay itself", named.display());
        let v = verdicts(&cow);
        assert_refused(&cow, &v, [1, 3, 1], &words);
        for verb in ["map", "commit"] {
            let out = output(ubd().arg(verb).arg(&cow));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{verb}: {err}");
            assert!(err.contains(&words), "{verb}: {err}");
        }
    }
}
