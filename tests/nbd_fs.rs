//! Real file systems through `ubd serve` (issue 4): the kernel's ext4 on a
//! loop device over an `nbdfuse` file, and User-Mode Linux on both sides of
//! the server.
//!
//! - `ext4_through_nbdfuse_survives_a_server_restart`: nbdfuse exposes the
//!   export as a file; `mkfs.ext4`, loop mount, files written, `sync`,
//!   `fstrim`, unmount, `e2fsck -fn` clean; the server stops on SIGTERM
//!   (exit 0), starts again, and the files read back with their checksums.
//! - `an_overlay_uml_wrote_is_served_and_read_back`: UML writes files into an
//!   overlay; `ubd serve` serves it; `nbdcopy` copies the export out and
//!   `debugfs` finds UML's files in the copy.
//! - `an_overlay_written_over_nbd_boots_in_uml`: a client writes files into
//!   the ext4 of a served overlay (loop mount of an nbdfuse file, so every
//!   write goes through the server); UML boots that overlay and its init finds
//!   them.
//!
//! The backing image is checked unchanged (content and mtime) throughout.
//! Mounts, loop devices and nbdfuse processes are cleaned up by a guard even
//! when a test fails. Needs root (mount, losetup), `libnbd-bin` (nbdfuse,
//! nbdcopy, nbdinfo), `e2fsprogs`, `util-linux`, `fuse3` in the kernel,
//! `user-mode-linux` and `busybox-static`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::server::Server;
use common::{pseudo_random_bytes, run, run_bytes, sha256_hex, tool, ubd, uml};
use serde_json::Value;

/// Upper bound for one UML boot; a normal one takes about 1.5 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Generous upper bounds that only turn a hang into a failure.
const FUSE_READY_LIMIT: Duration = Duration::from_secs(60);
const FUSE_EXIT_LIMIT: Duration = Duration::from_secs(60);

/// SHA-256 and modification time of a file, to prove a backing file untouched.
fn fingerprint(path: &Path) -> (String, SystemTime) {
    let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mtime = fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (sha256_hex(&data), mtime)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// An nbdfuse process and the directory it mounted.
struct Fuse {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

/// Host mounts, loop devices and nbdfuse processes a test made; whatever is
/// still there when it is dropped (a failed test) is lazily unmounted,
/// detached and killed, innermost first.
#[derive(Default)]
struct Host {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuses: Vec<Fuse>,
}

impl Host {
    /// Starts `nbdfuse [-r] DIR/disk URI` and waits until `DIR/disk` exists.
    /// Returns the path of that file.
    fn nbdfuse(&mut self, dir: &Path, uri: &str, read_only: bool) -> PathBuf {
        fs::create_dir_all(dir).expect("create the nbdfuse mount point");
        let disk = dir.join("disk");
        let log = dir.with_extension("nbdfuse.log");
        let mut cmd = Command::new(tool("nbdfuse", "libnbd-bin"));
        if read_only {
            cmd.arg("-r");
        }
        cmd.arg(&disk)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("create the nbdfuse log"));
        let child = cmd.spawn().expect("start nbdfuse");
        self.fuses.push(Fuse {
            child,
            dir: dir.to_path_buf(),
            log: log.clone(),
        });
        let start = Instant::now();
        while !disk.exists() {
            let fuse = self.fuses.last_mut().expect("just pushed");
            if let Ok(Some(status)) = fuse.child.try_wait() {
                let log = fs::read_to_string(&log).unwrap_or_default();
                self.fuses.pop();
                panic!("nbdfuse {uri} exited with {status} before serving:\n{log}");
            }
            assert!(
                start.elapsed() < FUSE_READY_LIMIT,
                "nbdfuse did not show {} within {FUSE_READY_LIMIT:?}",
                disk.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
        disk
    }

    /// Unmounts an nbdfuse directory and waits for nbdfuse to exit (status 0).
    fn stop_nbdfuse(&mut self, dir: &Path) {
        let at = self
            .fuses
            .iter()
            .position(|f| f.dir == dir)
            .expect("a running nbdfuse");
        run(Command::new(tool("umount", "mount")).arg(dir));
        let mut fuse = self.fuses.remove(at);
        let start = Instant::now();
        let status = loop {
            if let Some(status) = fuse.child.try_wait().expect("wait for nbdfuse") {
                break status;
            }
            if start.elapsed() > FUSE_EXIT_LIMIT {
                let _ = fuse.child.kill();
                let _ = fuse.child.wait();
                panic!("nbdfuse did not exit within {FUSE_EXIT_LIMIT:?} of its unmount");
            }
            thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "nbdfuse exited with {status}:\n{}",
            fs::read_to_string(&fuse.log).unwrap_or_default()
        );
    }

    /// `losetup --find --show [-r] FILE`.
    fn losetup(&mut self, file: &Path, read_only: bool) -> String {
        let mut cmd = Command::new(tool("losetup", "mount"));
        cmd.arg("--find").arg("--show");
        if read_only {
            cmd.arg("--read-only");
        }
        let dev = run(cmd.arg(file)).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loops.push(dev.clone());
        dev
    }

    fn detach(&mut self, dev: &str) {
        run(Command::new(tool("losetup", "mount")).arg("-d").arg(dev));
        self.loops.retain(|d| d != dev);
    }

    fn mount(&mut self, dev: &str, mnt: &Path, read_only: bool) {
        fs::create_dir_all(mnt).expect("create the mount point");
        let mut cmd = Command::new(tool("mount", "mount"));
        cmd.args(["-t", "ext4"]);
        if read_only {
            cmd.args(["-o", "ro"]);
        }
        run(cmd.arg(dev).arg(mnt));
        self.mounts.push(mnt.to_path_buf());
    }

    fn umount(&mut self, mnt: &Path) {
        run(Command::new(tool("umount", "mount")).arg(mnt));
        self.mounts.retain(|m| m != mnt);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let quiet = |cmd: &mut Command| {
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        for mnt in self.mounts.drain(..).rev() {
            quiet(Command::new("umount").arg("-l").arg(&mnt));
        }
        for dev in self.loops.drain(..).rev() {
            quiet(Command::new("losetup").arg("-d").arg(&dev));
        }
        for mut fuse in self.fuses.drain(..).rev() {
            quiet(Command::new("umount").arg("-l").arg(&fuse.dir));
            let _ = fuse.child.kill();
            let _ = fuse.child.wait();
        }
    }
}

/// `e2fsck -fn FILE` must find the file system clean.
fn e2fsck_clean(image: &Path) {
    run(Command::new(tool("e2fsck", "e2fsprogs"))
        .arg("-fn")
        .arg(image));
}

/// `ubd check COW` must call the overlay clean.
fn ubd_check_clean(cow: &Path) {
    run(ubd().arg("check").arg(cow));
}

/// Stops a server with SIGTERM; it must exit 0.
fn stop_ok(server: Server) {
    let (status, stderr) = server.stop();
    assert!(
        status.success(),
        "ubd serve exited with {status} on SIGTERM\nstderr:\n{stderr}"
    );
}

/// Files the file-system test writes: name and size. Sizes straddle block
/// and page boundaries; `big` spans many extents.
const FS_FILES: &[(&str, usize)] = &[
    ("one-byte", 1),
    ("page", 4096),
    ("odd", 7001),
    ("dir/sub/mib-plus", (1 << 20) + 17),
    ("dir/big", 5 << 20),
];

#[test]
fn ext4_through_nbdfuse_survives_a_server_restart() {
    ext4_through_nbdfuse(&[]);
}

#[test]
fn ext4_through_nbdfuse_with_writeback_cache_survives_a_server_restart() {
    ext4_through_nbdfuse(&["--cache", "writeback"]);
}

/// The file-system round trip, with `ubd serve COW EXTRA...`.
fn ext4_through_nbdfuse(extra: &[&str]) {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let base = dir.path().join("base.img");
    let cow = dir.path().join("disk.cow");
    let socket = dir.path().join("nbd.sock");
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");

    // A backing image of pseudo-random bytes: any sector the overlay gets
    // wrong reads as garbage, not as plausible zeros.
    fs::write(&base, pseudo_random_bytes(0xf5, 96 << 20)).expect("write the backing image");
    run(ubd().arg("create").arg("--backing").arg(&base).arg(&cow));
    let base_before = fingerprint(&base);

    let files: BTreeMap<&str, Vec<u8>> = FS_FILES
        .iter()
        .enumerate()
        .map(|(i, &(name, size))| (name, pseudo_random_bytes(1000 + i as u64, size)))
        .collect();

    let mut args: Vec<&std::ffi::OsStr> = vec![cow.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let server = Server::start(&socket, &args);
    let mut host = Host::default();
    let disk = host.nbdfuse(&fuse_dir, &server.uri(), false);
    run(Command::new(tool("mkfs.ext4", "e2fsprogs"))
        .args(["-q", "-F", "-b", "4096", "-L", "ubd-nbd"])
        .arg(&disk));
    let dev = host.losetup(&disk, false);
    host.mount(&dev, &mnt, false);
    for (name, data) in &files {
        let path = mnt.join(name);
        fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir in the mount");
        fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    // Junk to delete, so that fstrim has freed blocks to discard.
    fs::write(mnt.join("junk"), pseudo_random_bytes(7, 12 << 20)).expect("write junk");
    run(&mut Command::new(tool("sync", "coreutils")));
    fs::remove_file(mnt.join("junk")).expect("remove junk");
    run(&mut Command::new(tool("sync", "coreutils")));
    let trimmed = run(Command::new(tool("fstrim", "util-linux"))
        .arg("-v")
        .arg(&mnt));
    assert!(
        !trimmed.contains(" 0 B ") && !trimmed.contains("(0 bytes)"),
        "fstrim discarded nothing: {trimmed}"
    );
    // Still there after the discard, read through the page cache dropped by
    // a remount.
    host.umount(&mnt);
    host.mount(&dev, &mnt, false);
    for (name, data) in &files {
        let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        assert!(got == *data, "{name} reads back wrong after fstrim");
    }
    host.umount(&mnt);
    host.detach(&dev);
    run(Command::new(tool("sync", "coreutils")).arg(&disk));
    e2fsck_clean(&disk);
    host.stop_nbdfuse(&fuse_dir);
    stop_ok(server);
    assert!(!socket.exists(), "ubd serve left its socket behind");
    ubd_check_clean(&cow);
    assert_eq!(fingerprint(&base), base_before, "the backing image changed");

    // A fresh server on the same overlay: the file system and the files are
    // there. Mounted read-only, through a read-only nbdfuse.
    let server = Server::start(&socket, &args);
    let disk = host.nbdfuse(&fuse_dir, &server.uri(), true);
    e2fsck_clean(&disk);
    let dev = host.losetup(&disk, true);
    host.mount(&dev, &mnt, true);
    for (name, data) in &files {
        let got = fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        assert_eq!(
            sha256_hex(&got),
            sha256_hex(data),
            "{name} after a server restart"
        );
    }
    assert!(
        !mnt.join("junk").exists(),
        "the deleted file is back after a server restart"
    );
    host.umount(&mnt);
    host.detach(&dev);
    host.stop_nbdfuse(&fuse_dir);
    stop_ok(server);
    ubd_check_clean(&cow);
    assert_eq!(fingerprint(&base), base_before, "the backing image changed");
}

/// Files UML writes in [`an_overlay_uml_wrote_is_served_and_read_back`].
const GUEST_FILES: &[(&str, usize)] = &[
    ("tiny", 1),
    ("odd", 7001),
    ("pages", 16384),
    ("big", 393_216),
];

#[test]
fn an_overlay_uml_wrote_is_served_and_read_back() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let base = dir.path().join("base.img");
    let cow = dir.path().join("cow.img");
    let socket = dir.path().join("nbd.sock");
    let copy = dir.path().join("copy.raw");
    let converted = dir.path().join("converted.raw");

    let specs: Vec<String> = GUEST_FILES
        .iter()
        .map(|(n, s)| format!("{n}:{s}"))
        .collect();
    let body = format!(
        r#"mkdir -p /tmp/gen /data
for spec in {specs}; do
    name=${{spec%%:*}}
    size=${{spec#*:}}
    head -c "$size" /dev/urandom > "/tmp/gen/$name"
    [ "$(stat -c %s "/tmp/gen/$name")" -eq "$size" ]
done
cp /tmp/gen/* /data/
sync
for f in /tmp/gen/*; do
    cmp "$f" "/data/${{f##*/}}"
    set -- $(sha256sum "$f")
    echo "UBD-SUM ${{f##*/}} $1"
done
"#,
        specs = specs.join(" ")
    );
    uml::make_rootfs(&base, 32, &body, &[]).expect("build the base root image");
    let base_before = fingerprint(&base);
    run(ubd().arg("create").arg("--backing").arg(&base).arg(&cow));
    let console = uml::boot_ok(
        &[format!("ubd0={},{}", path_str(&cow), path_str(&base))],
        BOOT_TIMEOUT,
    );
    let sums: BTreeMap<&str, &str> = uml::tagged_lines(&console, "UBD-SUM ")
        .into_iter()
        .map(|line| {
            line.split_once(' ')
                .unwrap_or_else(|| panic!("malformed UBD-SUM line {line:?}"))
        })
        .collect();
    assert_eq!(
        sums.len(),
        GUEST_FILES.len(),
        "the guest did not report every file:\n{console}"
    );
    ubd_check_clean(&cow);
    assert_eq!(
        fingerprint(&base),
        base_before,
        "UML changed the backing image"
    );

    let server = Server::start(&socket, &[&cow]);
    // Where the data lives: some in the overlay (UML's writes), the rest in
    // the backing image.
    let map_json = run(Command::new(tool("nbdinfo", "libnbd-bin"))
        .arg("--json")
        .arg("--map=qemu:allocation-depth")
        .arg(server.uri()));
    let map: Value = serde_json::from_str(&map_json)
        .unwrap_or_else(|e| panic!("nbdinfo --map printed invalid JSON ({e}):\n{map_json}"));
    let extents = map
        .as_array()
        .expect("nbdinfo --map --json prints an array");
    let depth_bytes = |depth: u64| -> u64 {
        extents
            .iter()
            .filter(|e| e["type"].as_u64() == Some(depth))
            .filter_map(|e| e["length"].as_u64())
            .sum()
    };
    assert!(
        depth_bytes(1) > 0,
        "nbdinfo shows nothing in the overlay:\n{map_json}"
    );
    assert!(
        depth_bytes(2) > 0,
        "nbdinfo shows nothing in the backing image:\n{map_json}"
    );
    assert_eq!(
        extents
            .iter()
            .filter_map(|e| e["length"].as_u64())
            .sum::<u64>(),
        fs::metadata(&base).expect("stat base").len(),
        "the allocation-depth map does not cover the disk:\n{map_json}"
    );

    run(Command::new(tool("nbdcopy", "libnbd-bin"))
        .arg(server.uri())
        .arg(&copy));
    stop_ok(server);

    // UML remounted / read-only before powering off: the copy is clean.
    e2fsck_clean(&copy);
    let debugfs = tool("debugfs", "e2fsprogs");
    for &(name, size) in GUEST_FILES {
        let data = run_bytes(
            Command::new(&debugfs)
                .arg("-R")
                .arg(format!("cat /data/{name}"))
                .arg(&copy),
        );
        assert_eq!(data.len(), size, "size of /data/{name} read over NBD");
        assert_eq!(
            sha256_hex(&data),
            sums[name],
            "SHA-256 of /data/{name} read over NBD differs from the guest's"
        );
    }
    // And the export is byte for byte what `ubd convert` merges.
    run(ubd().arg("convert").arg(&cow).arg(&converted));
    assert!(
        fs::read(&copy).expect("read the copy") == fs::read(&converted).expect("read convert"),
        "the export copied over NBD differs from `ubd convert` of the overlay"
    );
    ubd_check_clean(&cow);
    assert_eq!(fingerprint(&base), base_before, "the backing image changed");
}

/// Files a client writes over NBD in [`an_overlay_written_over_nbd_boots_in_uml`].
const NBD_FILES: &[(&str, usize)] = &[
    ("one", 1),
    ("odd", 5000),
    ("pages", 65536),
    ("big", (3 << 20) + 123),
];

#[test]
fn an_overlay_written_over_nbd_boots_in_uml() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let base = dir.path().join("base.img");
    let cow = dir.path().join("cow.img");
    let socket = dir.path().join("nbd.sock");
    let fuse_dir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");

    // The guest reports what it finds: the files' checksums, the note, and
    // /etc/greeting (which the base image has and the client rewrites).
    let body = r#"if [ -f /data/from-nbd/manifest ]; then
    while read -r name; do
        set -- $(sha256sum "/data/from-nbd/$name")
        echo "UBD-NBD-SUM $name $1"
    done < /data/from-nbd/manifest
    while read -r line; do echo "UBD-NBD-NOTE $line"; done < /data/from-nbd/note.txt
else
    echo "UBD-NBD-MISSING"
fi
echo "UBD-NBD-GREETING $(cat /etc/greeting)"
"#;
    uml::make_rootfs(
        &base,
        48,
        body,
        &[("etc/greeting", b"hello from the base image\n")],
    )
    .expect("build the base root image");
    let base_before = fingerprint(&base);
    run(ubd().arg("create").arg("--backing").arg(&base).arg(&cow));

    let files: BTreeMap<&str, Vec<u8>> = NBD_FILES
        .iter()
        .enumerate()
        .map(|(i, &(name, size))| (name, pseudo_random_bytes(77 + i as u64, size)))
        .collect();
    let note = "written over NBD by nbdfuse and a loop mount";

    // Write into the guest's root file system through the server.
    let server = Server::start(&socket, &[&cow]);
    let mut host = Host::default();
    let disk = host.nbdfuse(&fuse_dir, &server.uri(), false);
    let dev = host.losetup(&disk, false);
    host.mount(&dev, &mnt, false);
    let target = mnt.join("data/from-nbd");
    fs::create_dir_all(&target).expect("mkdir /data/from-nbd");
    for (name, data) in &files {
        fs::write(target.join(name), data).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }
    let manifest: String = files.keys().map(|n| format!("{n}\n")).collect();
    fs::write(target.join("manifest"), manifest).expect("write the manifest");
    fs::write(target.join("note.txt"), format!("{note}\n")).expect("write the note");
    fs::write(mnt.join("etc/greeting"), "rewritten over NBD\n").expect("rewrite /etc/greeting");
    run(&mut Command::new(tool("sync", "coreutils")));
    host.umount(&mnt);
    host.detach(&dev);
    run(Command::new(tool("sync", "coreutils")).arg(&disk));
    e2fsck_clean(&disk);
    host.stop_nbdfuse(&fuse_dir);
    stop_ok(server);
    ubd_check_clean(&cow);
    assert_eq!(
        fingerprint(&base),
        base_before,
        "writing over NBD changed the backing image"
    );

    let console = uml::boot_ok(
        &[format!("ubd0={},{}", path_str(&cow), path_str(&base))],
        BOOT_TIMEOUT,
    );
    assert!(
        uml::tagged_lines(&console, "UBD-NBD-MISSING").is_empty(),
        "the guest did not find /data/from-nbd:\n{console}"
    );
    let sums: BTreeMap<&str, &str> = uml::tagged_lines(&console, "UBD-NBD-SUM ")
        .into_iter()
        .map(|line| {
            line.split_once(' ')
                .unwrap_or_else(|| panic!("malformed UBD-NBD-SUM line {line:?}"))
        })
        .collect();
    let want: BTreeMap<&str, String> = files.iter().map(|(n, d)| (*n, sha256_hex(d))).collect();
    assert_eq!(
        sums,
        want.iter().map(|(n, s)| (*n, s.as_str())).collect(),
        "the files the guest found differ from those written over NBD:\n{console}"
    );
    assert_eq!(
        uml::tagged_lines(&console, "UBD-NBD-NOTE "),
        vec![note],
        "{console}"
    );
    assert_eq!(
        uml::tagged_lines(&console, "UBD-NBD-GREETING "),
        vec!["rewritten over NBD"],
        "{console}"
    );
    ubd_check_clean(&cow);
    assert_eq!(
        fingerprint(&base),
        base_before,
        "UML changed the backing image"
    );
}
