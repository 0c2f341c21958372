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

/// The first `size` bytes of the device over `cow`, read-only.
fn device_bytes(cow: &Path, size: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    let dev = Device::open(
        cow,
        &DeviceOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    dev.read_at(0, &mut bytes).unwrap();
    dev.close().unwrap();
    bytes
}

/// What `uml_moo -d` makes of copies of `base` and `cow`: the reference a
/// commit must equal.
fn uml_moo_reference(dir: &Path, base: &Path, cow: &Path) -> PathBuf {
    let reference = dir.join("reference.img");
    let cow2 = dir.join("cow2.img");
    copy_keep_mtime(base, &reference);
    copy_keep_mtime(cow, &cow2);
    uml_moo_in_place(&cow2, &reference);
    reference
}

/// `ubd commit COW` started, its output piped.
fn spawn_commit(cow: &Path) -> std::process::Child {
    Command::new(common::ubd_bin())
        .arg("commit")
        .arg(cow)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
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
    let expect = device_bytes(&cow, size);
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
    let reference = uml_moo_reference(dir.path(), &base, &cow);
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
    // Committing the empty overlay writes nothing: the pair stays usable,
    // and the report says so rather than calling the overlay stale.
    let j: serde_json::Value =
        serde_json::from_str(&run(ubd().args(["commit", "--output", "json"]).arg(&cow))).unwrap();
    assert_eq!(j["sectors_committed"], 0, "{j}");
    assert_eq!(j["overlay"], "unchanged", "{j}");
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

fn mtime(path: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().mtime()
}

fn set_mtime(path: &Path, secs: i64) {
    run(Command::new("touch")
        .arg("-d")
        .arg(format!("@{secs}"))
        .arg(path));
}

/// Two overlays over one base, each with its own writes.
fn two_overlays(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (base, a) = overlay(dir, 1 << 20, 0);
    let b = dir.join("b.cow");
    create_overlay(&b, &base, false).unwrap();
    let dev = Device::open(&b, &DeviceOptions::default()).unwrap();
    dev.write_at(8192, &[0xbb; 4096], Flags::default()).unwrap();
    dev.close().unwrap();
    (base, a, b)
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    let want = fs::canonicalize(path).unwrap();
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .any(|e| fs::read_link(e.path()).is_ok_and(|p| p == want))
        })
        .unwrap_or(false)
}

/// Waits until `ubd commit` (process `pid`) waits for the lock on `base`:
/// it opens the backing file to lock it only after its first checks, and
/// holds it open while it waits (seen twice, 50 ms apart).
fn wait_for_lock_wait(pid: u32, base: &Path) {
    let start = std::time::Instant::now();
    loop {
        if has_open(pid, base) {
            std::thread::sleep(Duration::from_millis(50));
            if has_open(pid, base) {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ubd commit never waited for the lock on {}",
            base.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `ubd commit` started while the backing file is locked, interrupted
/// while it waits.
fn commit_interrupted_while_waiting(cow: &Path, base: &Path) -> std::process::Output {
    let mut holder = common::hold_posix_lock(base);
    let child = spawn_commit(cow);
    wait_for_lock_wait(child.id(), base);
    common::server::signal(child.id(), "INT");
    holder.kill().unwrap();
    holder.wait().unwrap();
    child.wait_with_output().unwrap()
}

/// A commit that waited for the backing file's lock checks the file again
/// once it has it: another commit may have changed it meanwhile.
#[test]
fn commit_checks_the_backing_file_again_once_it_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 1 << 20, 0);
    let before = fs::read(&base).unwrap();
    let mut holder = common::hold_posix_lock(&base);
    let child = spawn_commit(&cow);
    // What another commit would leave: a new mtime.
    wait_for_lock_wait(child.id(), &base);
    set_mtime(&base, mtime(&base) + 10);
    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refusing to commit"), "{stderr}");
    assert!(fs::read(&base).unwrap() == before);
}

/// A commit interrupted before it wrote anything says so and leaves no
/// marker: it cannot later take another commit's changes to the backing
/// file for its own.
#[test]
fn a_commit_interrupted_before_writing_leaves_nothing_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a, b) = two_overlays(dir.path());
    let before = fs::read(&base).unwrap();
    let out = commit_interrupted_while_waiting(&a, &base);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert!(!PathBuf::from(format!("{}.commit", a.display())).exists());
    assert!(fs::read(&base).unwrap() == before);
    // Another overlay is committed; the first is stale now.
    run(ubd().arg("commit").arg(&b));
    let out = output(ubd().arg("commit").arg(&a));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refusing to commit"), "{stderr}");
    assert_eq!(&fs::read(&base).unwrap()[..512], &before[..512]);
}

/// A commit interrupted part way records the mtime it left the backing
/// file with; run again, it finishes only if the file still has it.
#[test]
fn an_interrupted_commit_resumes_only_over_what_it_left() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 64 << 20, 48 << 20);
    let reference = uml_moo_reference(dir.path(), &base, &cow);
    let marker = PathBuf::from(format!("{}.commit", cow.display()));
    let mut part_way = false;
    for delay_ms in [0u64, 5, 15, 30] {
        let mut child = Command::new(common::ubd_bin())
            .arg("commit")
            .arg(&cow)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The marker is written just before the copy starts (and after
        // the interrupt handler is in place).
        while !marker.exists() && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        // Not once it has been reaped: its pid may be another's by then.
        if child.try_wait().unwrap().is_none() {
            common::server::signal(child.id(), "INT");
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            break;
        }
        if stderr.contains("partly merged") {
            part_way = true;
            break;
        }
        assert!(stderr.contains("nothing was written"), "{stderr}");
        assert!(!marker.exists());
    }
    if part_way {
        let left = mtime(&base);
        let text = fs::read_to_string(&marker).unwrap();
        assert!(text.ends_with(&format!("left mtime: {left}\n")), "{text}");
        set_mtime(&base, left + 10);
        let out = output(ubd().arg("commit").arg(&cow));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("since the interrupted commit"), "{stderr}");
        set_mtime(&base, left);
        run(ubd().arg("commit").arg(&cow));
    } else if marker.exists() || fs::read(&base).unwrap() != fs::read(&reference).unwrap() {
        run(ubd().arg("commit").arg(&cow));
    }
    assert!(fs::read(&base).unwrap() == fs::read(&reference).unwrap());
    assert!(!marker.exists());
    eprintln!("interrupted part way: {part_way}");
}

/// The marker a commit stopped part way leaves (as `ubd commit` writes it):
/// run again, the commit goes on only while the backing file has the mtime
/// the marker records, and then finishes as one that ran through.
#[test]
fn a_commit_marker_with_a_left_mtime_resumes_only_over_that_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 1 << 20, 0);
    let reference = uml_moo_reference(dir.path(), &base, &cow);
    // A commit that wrote something, then was interrupted.
    let left = mtime(&base) + 100;
    set_mtime(&base, left);
    let marker = PathBuf::from(format!("{}.commit", cow.display()));
    fs::write(
        &marker,
        format!(
            "ubd commit in progress\nbacking: {}\nsize: {}\nleft mtime: {left}\n",
            fs::canonicalize(&base).unwrap().display(),
            1 << 20
        ),
    )
    .unwrap();
    // Something else changed the file since.
    set_mtime(&base, left + 1);
    let out = output(ubd().arg("commit").arg(&cow));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("since the interrupted commit"), "{stderr}");
    assert!(marker.exists());
    // As the interrupted commit left it.
    set_mtime(&base, left);
    run(ubd().arg("commit").arg(&cow));
    assert!(fs::read(&base).unwrap() == fs::read(&reference).unwrap());
    assert!(!marker.exists());
}

/// A marker of another commit (into another file, with --backing) is the
/// only record of that file half merged: a commit into the overlay's own
/// backing file refuses to run over it.
#[test]
fn commit_keeps_the_marker_of_another_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 1 << 20, 0);
    let before = fs::read(&base).unwrap();
    let marker = PathBuf::from(format!("{}.commit", cow.display()));
    let text =
        "ubd commit in progress\nbacking: /elsewhere/other.img\nsize: 1048576\nleft mtime: 5\n";
    fs::write(&marker, text).unwrap();
    let out = output(ubd().arg("commit").arg(&cow));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/elsewhere/other.img"), "{stderr}");
    assert_eq!(fs::read_to_string(&marker).unwrap(), text);
    assert!(fs::read(&base).unwrap() == before);
}

/// An overlay whose file ends with the backing file's data, inside its last
/// sector (the backing file's size is not a multiple of 512): committed
/// whole, as the device reads it. (`uml_moo -d` silently keeps the backing
/// file's old bytes for that sector.)
#[test]
fn commit_takes_a_last_sector_cut_at_the_backing_files_end() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1_000_000usize;
    let (base, cow) = overlay(dir.path(), size, 0);
    let data_offset = ubd_info(&cow)["data_offset"].as_u64().unwrap();
    let f = fs::OpenOptions::new().write(true).open(&cow).unwrap();
    f.set_len(data_offset + size as u64).unwrap();
    drop(f);
    run(ubd().arg("check").arg(&cow));
    let expect = device_bytes(&cow, size);
    assert!(expect != fs::read(&base).unwrap());
    // Block status and convert take it too.
    run(ubd().arg("map").arg(&cow));
    let out_img = dir.path().join("out.img");
    run(ubd().arg("convert").arg(&cow).arg(&out_img));
    assert!(fs::read(&out_img).unwrap()[..size] == expect[..]);
    run(ubd().arg("commit").arg(&cow));
    assert!(fs::read(&base).unwrap() == expect);
    assert!(!PathBuf::from(format!("{}.commit", cow.display())).exists());
}

/// Committed through a symlink the header names: the overlay is stale (its
/// backing file changed), and commit says so.
#[test]
fn commit_through_a_symlink_reports_the_overlay_stale() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = overlay(dir.path(), 1 << 20, 0);
    let alias = dir.path().join("alias.img");
    std::os::unix::fs::symlink(&base, &alias).unwrap();
    let cow = dir.path().join("via-alias.cow");
    create_overlay(&cow, &alias, false).unwrap();
    let dev = Device::open(&cow, &DeviceOptions::default()).unwrap();
    dev.write_at(0, &[9u8; 4096], Flags::default()).unwrap();
    dev.close().unwrap();
    let j: serde_json::Value = serde_json::from_str(&run(ubd()
        .args(["commit", "--output", "json", "--backing"])
        .arg(&base)
        .arg(&cow)))
    .unwrap();
    assert_eq!(j["overlay"], "stale", "{j}");
    assert_eq!(output(ubd().arg("check").arg(&cow)).status.code(), Some(3));
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

/// Rewrites the v3 overlay `cow` with `alignment` in place of its own: the
/// bitmap and data move to where that alignment puts them.
fn relayout(cow: &Path, alignment: u32) {
    let old = fs::read(cow).unwrap();
    let mut header = ubd_cow::Header::parse(&old).unwrap();
    let from = ubd_cow::Geometry::new(&header).unwrap();
    header.alignment = alignment;
    let to = ubd_cow::Geometry::new(&header).unwrap();
    let mut new = header.encode().unwrap();
    new.resize(to.bitmap_offset as usize, 0);
    let bitmap = from.bitmap_offset as usize..(from.bitmap_offset + from.bitmap_len) as usize;
    new.extend_from_slice(&old[bitmap]);
    new.resize(to.data_offset as usize, 0);
    new.extend_from_slice(&old[from.data_offset as usize..]);
    fs::write(cow, new).unwrap();
}

/// A v3 overlay whose alignment is not 4096 (UML on a host with 64 KiB
/// pages writes 65536): rebase keeps its alignment, so the bitmap and data
/// stay where the header says they are and the disk reads the same.
#[test]
fn rebase_keeps_an_alignment_other_than_4096() {
    for alignment in [512u32, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let (base, cow) = overlay(dir.path(), 1 << 20, 0);
        let before = device_bytes(&cow, 1 << 20);
        relayout(&cow, alignment);
        assert_eq!(ubd_info(&cow)["alignment"], alignment);
        assert!(
            device_bytes(&cow, 1 << 20) == before,
            "relayout changed the disk"
        );
        let moved = dir.path().join("moved.img");
        fs::rename(&base, &moved).unwrap();
        run(ubd().args(["rebase", "--backing"]).arg(&moved).arg(&cow));
        run(ubd().arg("check").arg(&cow));
        assert_eq!(ubd_info(&cow)["alignment"], alignment);
        assert!(
            device_bytes(&cow, 1 << 20) == before,
            "alignment {alignment}: the disk reads differently after rebase"
        );
    }
}

/// An overlay cut short inside its data (check calls it truncated) is
/// refused before anything is written: the copy would otherwise stop at the
/// missing data with the backing file half merged, and every re-run stop
/// there again.
#[test]
fn commit_refuses_an_overlay_truncated_inside_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 1 << 20, 0);
    let data_offset = ubd_info(&cow)["data_offset"].as_u64().unwrap();
    // The first writes survive, the one near the end is cut off.
    fs::OpenOptions::new()
        .write(true)
        .open(&cow)
        .unwrap()
        .set_len(data_offset + 600_000)
        .unwrap();
    assert_eq!(output(ubd().arg("check").arg(&cow)).status.code(), Some(2));
    let before = fs::read(&base).unwrap();
    let before_mtime = mtime(&base);
    let out = output(ubd().arg("commit").arg(&cow));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(cow.to_str().unwrap())
            && err.contains("truncated?")
            && err.contains("unchanged"),
        "{err}"
    );
    assert!(
        fs::read(&base).unwrap() == before,
        "the backing file was written"
    );
    assert_eq!(mtime(&base), before_mtime);
    assert!(!dir.path().join("cow.img.commit").exists());
    // Cut after the last sector's data instead: the commit goes through.
    let size = 1 << 20;
    fs::OpenOptions::new()
        .write(true)
        .open(&cow)
        .unwrap()
        .set_len(data_offset + size)
        .unwrap();
    run(ubd().arg("commit").arg(&cow));
}

/// A FIFO where the commit marker goes (`COW.commit`) is not read: the
/// commit is refused at once, naming it, with the backing file unchanged.
/// Reading it blocked for ever, and commit, which catches SIGTERM, then
/// ignored `timeout` too.
#[test]
fn commit_refuses_a_fifo_in_place_of_its_marker_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cow) = overlay(dir.path(), 1 << 20, 0);
    let marker = dir.path().join("cow.img.commit");
    run(Command::new("mkfifo").arg(&marker));
    let before = fs::read(&base).unwrap();
    let mut child = spawn_commit(&cow);
    let status = common::waited(
        &mut child,
        "ubd commit with a FIFO as its marker",
        Duration::from_secs(10),
    );
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(marker.to_str().unwrap()), "{err}");
    assert!(
        fs::read(&base).unwrap() == before,
        "the backing file was written"
    );
}
