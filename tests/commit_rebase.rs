//! `ubd commit` against `uml_moo -d`, interrupted and re-run; `ubd rebase`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{output, run, tool, ubd, ubd_info};
use ubd::device::{Device, DeviceOptions, Flags};
use ubd::image::create_overlay;

/// A base of `size` random bytes and an overlay over it with writes at odd
/// places (partial sectors included) and `bulk` bytes written at 1 MiB.
fn overlay(dir: &Path, size: usize, bulk: usize) -> (PathBuf, PathBuf) {
    let base = dir.join("base.img");
    fs::write(&base, common::pseudo_random_bytes(1, size)).unwrap();
    let cow = dir.join("cow.img");
    create_overlay(&cow, &base, false).unwrap();
    let dev = Device::open(&cow, &DeviceOptions::default()).unwrap();
    for (i, (off, len)) in [
        (0u64, 512usize),
        (1000, 3000),
        (65_537, 70_000),
        (size as u64 - 700, 700),
    ]
    .into_iter()
    .enumerate()
    {
        dev.write_at(
            off,
            &common::pseudo_random_bytes(10 + i as u64, len),
            Flags::default(),
        )
        .unwrap();
    }
    if bulk > 0 {
        dev.write_at(
            1 << 20,
            &common::pseudo_random_bytes(99, bulk),
            Flags::default(),
        )
        .unwrap();
    }
    dev.flush().unwrap();
    dev.close().unwrap();
    (base, cow)
}

/// Copies `from` to `to` keeping its mtime (as `cp -p` does).
fn copy_keep_mtime(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-p").arg(from).arg(to));
}

fn uml_moo_in_place(cow: &Path, backing: &Path) {
    run(Command::new(tool("uml_moo", "uml-utilities"))
        .arg("-d")
        .arg("-b")
        .arg(backing)
        .arg(cow));
}

#[test]
fn commit_equals_uml_moo_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 4 << 20, 0);
    let ours = dir.path().join("ours.img");
    let theirs = dir.path().join("theirs.img");
    copy_keep_mtime(&base, &ours);
    copy_keep_mtime(&base, &theirs);
    let cow2 = dir.path().join("cow2.img");
    copy_keep_mtime(&cow, &cow2);
    let text = run(ubd().args(["commit", "--backing"]).arg(&ours).arg(&cow));
    assert!(text.contains("unchanged"), "{text}");
    uml_moo_in_place(&cow2, &theirs);
    assert!(
        fs::read(&ours).unwrap() == fs::read(&theirs).unwrap(),
        "commit differs from uml_moo -d"
    );
    assert!(fs::read(&ours).unwrap() != fs::read(&base).unwrap());
    // The overlay's own backing file was not touched, and the pair still checks.
    run(ubd().arg("check").arg(&cow));
}

#[test]
fn commit_of_a_ragged_size_never_grows_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let size = (1 << 20) + 300;
    let (base, cow) = overlay(dir.path(), size, 0);
    let mut expect = vec![0u8; size];
    let dev = Device::open(
        &cow,
        &DeviceOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    dev.read_at(0, &mut expect).unwrap();
    dev.close().unwrap();
    drop(dev);
    let j: serde_json::Value =
        serde_json::from_str(&run(ubd().args(["commit", "--output", "json"]).arg(&cow))).unwrap();
    assert_eq!(j["overlay"], "stale");
    let got = fs::read(&base).unwrap();
    assert_eq!(got.len(), size);
    assert!(got == expect);
    // The overlay is stale now: check says the backing file changed.
    let out = output(ubd().arg("check").arg(&cow));
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn commit_killed_and_run_again_equals_one_that_ran_through() {
    let dir = tempfile::tempdir().unwrap();
    // 48 MiB present: long enough to kill the commit part way.
    let (base, cow) = overlay(dir.path(), 64 << 20, 48 << 20);
    let reference = dir.path().join("reference.img");
    let cow2 = dir.path().join("cow2.img");
    copy_keep_mtime(&base, &reference);
    copy_keep_mtime(&cow, &cow2);
    uml_moo_in_place(&cow2, &reference);
    let mut killed_part_way = false;
    for delay_ms in [15u64, 40, 80] {
        let mut child = Command::new(common::ubd_bin())
            .arg("commit")
            .arg(&cow)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let marker = PathBuf::from(format!("{}.commit", cow.display()));
        if !status.success() && marker.exists() {
            killed_part_way = true;
            break;
        }
        if status.success() {
            break;
        }
    }
    // Run it (again) to the end.
    run(ubd().arg("commit").arg(&cow));
    assert!(fs::read(&base).unwrap() == fs::read(&reference).unwrap());
    assert!(!PathBuf::from(format!("{}.commit", cow.display())).exists());
    eprintln!("killed part way: {killed_part_way}");
}

#[test]
fn commit_reset_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 1 << 20, 0);
    run(ubd().args(["commit", "--reset"]).arg(&cow));
    let j = ubd_info(&cow);
    assert_eq!(j["sectors_present"], 0);
    assert_eq!(j["backing_matches"], true);
    run(ubd().arg("check").arg(&cow));
    // Write again, then commit and delete the overlay.
    let dev = Device::open(&cow, &DeviceOptions::default()).unwrap();
    dev.write_at(4096, &[7u8; 4096], Flags::default()).unwrap();
    dev.close().unwrap();
    drop(dev);
    run(ubd().args(["commit", "--discard-overlay"]).arg(&cow));
    assert!(!cow.exists());
    assert_eq!(&fs::read(&base).unwrap()[4096..8192], &[7u8; 4096]);
}

#[test]
fn commit_refuses_a_locked_overlay_and_a_changed_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 1 << 20, 0);
    let before = fs::read(&base).unwrap();
    let mut holder = common::hold_posix_lock(&cow);
    let out = output(ubd().arg("commit").arg(&cow));
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert!(fs::read(&base).unwrap() == before);
    run(Command::new("touch").arg(&base));
    let out = output(ubd().arg("commit").arg(&cow));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to commit"));
    assert!(fs::read(&base).unwrap() == before);
}

#[test]
fn rebase_follows_a_moved_backing_file_and_refuses_a_changed_one() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 1 << 20, 0);
    let moved = dir.path().join("moved.img");
    fs::rename(&base, &moved).unwrap();
    assert_eq!(output(ubd().arg("check").arg(&cow)).status.code(), Some(3));
    run(ubd().args(["rebase", "--backing"]).arg(&moved).arg(&cow));
    run(ubd().arg("check").arg(&cow));
    assert_eq!(ubd_info(&cow)["backing_file"], moved.to_str().unwrap());
    // A copy without its mtime: refused, then taken with --unsafe.
    let copy = dir.path().join("copy.img");
    fs::copy(&moved, &copy).unwrap();
    run(Command::new("touch").args(["-d", "2001-01-01"]).arg(&copy));
    let out = output(ubd().args(["rebase", "--backing"]).arg(&copy).arg(&cow));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--unsafe"));
    assert_eq!(ubd_info(&cow)["backing_file"], moved.to_str().unwrap());
    let out = output(
        ubd()
            .args(["rebase", "--unsafe", "--backing"])
            .arg(&copy)
            .arg(&cow),
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
    run(ubd().arg("check").arg(&cow));
    // A different size is refused even with --unsafe.
    let other = dir.path().join("other.img");
    fs::write(&other, vec![0u8; 4096]).unwrap();
    let out = output(
        ubd()
            .args(["rebase", "--unsafe", "--backing"])
            .arg(&other)
            .arg(&cow),
    );
    assert_eq!(out.status.code(), Some(1));
}
