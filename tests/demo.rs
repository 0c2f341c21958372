//! `ubd demo`, the README's first command: it builds its disk, serves it, and
//! a real client finds the demo's files in it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::signal;
use common::{run, run_bytes, sha256_hex, tool, ubd};

const MIB: usize = 1 << 20;

/// `ubd demo --dir DIR`, its banner on a pipe.
fn start_demo(dir: &std::path::Path, stderr: Stdio) -> std::process::Child {
    ubd()
        .arg("demo")
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start ubd demo")
}

#[test]
fn demo_serves_an_ext4_disk_with_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let socket = dir.join("nbd.sock");
    let mut child = start_demo(&dir, Stdio::piped());
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "ubd demo exited with {status}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "demo never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let base = dir.join("base.img");
    let base_sum = sha256_hex(&std::fs::read(&base).unwrap());
    let uri = format!("nbd+unix:///?socket={}", socket.display());

    let info = run(Command::new(tool("nbdinfo", "libnbd-bin"))
        .arg("--json")
        .arg(&uri));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 64 << 20, "{info}");

    // Write through the server, then read the whole disk and look inside.
    run(Command::new(tool("qemu-io", "qemu-utils")).args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0x5a 60M 4096",
    ]));
    let copy = tmp.path().join("copy.img");
    run(Command::new(tool("nbdcopy", "libnbd-bin"))
        .arg(&uri)
        .arg(&copy));
    let hello = run(Command::new(tool("debugfs", "e2fsprogs"))
        .args(["-R", "cat /hello.txt"])
        .arg(&copy));
    assert_eq!(hello.trim(), "Hello from ubd.");
    let numbers = run(Command::new(tool("debugfs", "e2fsprogs"))
        .args(["-R", "cat /data/numbers.txt"])
        .arg(&copy));
    assert_eq!(numbers.lines().count(), 10_000);
    assert_eq!(numbers.lines().last(), Some("10000"));
    let copied = run_bytes(Command::new("dd").args([
        &format!("if={}", copy.display()),
        "bs=1M",
        "skip=60",
        "count=1",
        "status=none",
    ]));
    assert!(copied[..4096].iter().all(|&b| b == 0x5a));
    // The rest of that MiB is the base's, though the overlay holds it.
    let base_bytes = std::fs::read(&base).unwrap();
    assert!(copied[4096..] == base_bytes[60 * MIB + 4096..61 * MIB]);

    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "demo exit {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&uri), "banner lacks the URI: {stdout}");
    for cmd in ["nbdinfo", "qemu-io", "nbdfuse"] {
        assert!(stdout.contains(cmd), "banner lacks {cmd}: {stdout}");
    }
    assert!(!socket.exists(), "the socket file is left behind");
    assert_eq!(sha256_hex(&std::fs::read(&base).unwrap()), base_sum);
    // qemu-io wrote with FUA, so the server would copy that MiB of the base
    // into the overlay first (the whole MiB the overlay's), unless the base
    // has only a hole there (the demo's ext4 image is sparse): then only the
    // 8 sectors written are.
    let info = common::ubd_info(&dir.join("demo.cow"));
    let base_file = std::fs::File::open(&base).unwrap();
    let (from, to) = (60 * MIB as u64, 61 * MIB as u64);
    let hole = ubd::image::next_data(&base_file, from, to) == to;
    let want = if hole { 8 } else { 2048 };
    assert_eq!(info["sectors_present"], want, "hole: {hole}, {info}");
}

/// The banner's three commands, run as printed (by root, as CI runs; a user
/// gets `sudo` before the two steps that need root): `nbdinfo`, `qemu-io`
/// reading the file system's label, and `nbdfuse` + `mount` showing the
/// demo's README. Mounts and the nbdfuse process are cleaned up by the
/// script itself, and lazily again if it failed.
#[test]
fn the_demo_banner_commands_work_as_printed() {
    use std::io::{BufRead, BufReader};

    let tmp = tempfile::tempdir().unwrap();
    // A path with characters special to URIs and to the shell.
    let dir = tmp.path().join("a demo #1");
    let mut child = start_demo(&dir, Stdio::null());
    let mut banner = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("ubd demo ended before its banner was whole: {banner:#?}");
        };
        if line.starts_with("Press Ctrl-C") {
            break;
        }
        banner.push(line);
    }
    let at = banner
        .iter()
        .position(|l| l.starts_with("Try, from another terminal"))
        .unwrap_or_else(|| panic!("no commands in the banner: {banner:#?}"));
    let commands: Vec<&str> = banner[at + 1..].iter().map(|l| l.trim_start()).collect();
    assert_eq!(commands.len(), 4, "{commands:#?}");
    let bash = |script: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .expect("run bash");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{script}\nexited {}:\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let info = bash(commands[0]);
    assert!(info.contains("export-size: 67108864"), "{info}");
    let label = bash(commands[1]);
    assert!(label.contains("ubd.demo"), "{label}");
    let (mnt, root) = (dir.join("mnt"), dir.join("root"));
    // nbdfuse runs in the background of the printed lines: the script ends
    // it by unmounting its directory, and waits for it.
    let script = format!(
        "{}\n{}\nstatus=$?\numount '{root}'\nfusermount3 -u '{mnt}' || umount '{mnt}'\nwait\nexit $status",
        commands[2],
        commands[3],
        root = root.display(),
        mnt = mnt.display()
    );
    let result = std::panic::catch_unwind(|| bash(&script));
    let _ = Command::new("umount").arg("-l").arg(&root).status();
    let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    let readme = result.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(
        readme.contains("This file system is the backing image of a ubd demo."),
        "{readme}"
    );
    signal(child.id(), "INT");
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit {status}");
}

/// `--dir` naming a directory of the user's that holds no demo: the demo
/// refuses at once, and nothing there (not even a `content` directory or a
/// `base.img.tmp`, the names it builds its base image under) is touched.
#[test]
fn demo_refuses_a_directory_that_is_not_a_demo() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("content")).unwrap();
    std::fs::write(dir.join("content/thesis.txt"), "years of work\n").unwrap();
    std::fs::write(dir.join("base.img.tmp"), "mine\n").unwrap();
    std::fs::write(dir.join("demo.cow"), "also mine\n").unwrap();
    let mut child = start_demo(dir, Stdio::piped());
    let status = common::waited(
        &mut child,
        "ubd demo in a directory that is not a demo",
        Duration::from_secs(30),
    );
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&dir.display().to_string()) && stderr.contains("not empty"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("content/thesis.txt")).unwrap(),
        "years of work\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("base.img.tmp")).unwrap(),
        "mine\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("demo.cow")).unwrap(),
        "also mine\n"
    );
    assert!(!dir.join("base.img").exists());
}

/// A demo stopped while it built its base (Ctrl-C during mkfs) leaves its
/// staging directory and half a file system behind; the next run builds
/// them again instead of refusing the directory as not a demo.
#[test]
fn demo_builds_again_after_an_interrupted_build() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join(".ubd-demo-content/data")).unwrap();
    std::fs::write(dir.join(".ubd-demo-content/hello.txt"), "half\n").unwrap();
    std::fs::write(dir.join("base.img.ubd-demo-tmp"), vec![0u8; 4096]).unwrap();
    demo_until_served(dir);
    assert!(dir.join("base.img").exists());
    assert!(!dir.join(".ubd-demo-content").exists());
    assert!(!dir.join("base.img.ubd-demo-tmp").exists());
}

/// Runs `ubd demo --dir DIR` until it serves, then stops it with SIGINT;
/// panics if it exits first.
fn demo_until_served(dir: &std::path::Path) {
    let mut child = start_demo(dir, Stdio::piped());
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(dir.join("nbd.sock")).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "ubd demo --dir {} exited with {status}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "demo never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(child.id(), "INT");
    assert!(child.wait().unwrap().success());
}

/// A demo directory moved elsewhere serves from there (its overlay names
/// the base's old path); one whose base was touched since is refused with
/// a word about `--fresh`, which then starts over.
#[test]
fn demo_runs_again_after_its_directory_moved_and_says_fresh_when_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let (old, new) = (tmp.path().join("old"), tmp.path().join("new"));
    demo_until_served(&old);
    std::fs::rename(&old, &new).unwrap();
    demo_until_served(&new);

    run(Command::new("touch")
        .args(["-d", "2001-01-01"])
        .arg(new.join("base.img")));
    let out = common::output(ubd().arg("demo").arg("--dir").arg(&new));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("demo.cow") && stderr.contains("--fresh"),
        "{stderr}"
    );
    let mut fresh = ubd()
        .arg("demo")
        .arg("--fresh")
        .arg("--dir")
        .arg(&new)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ubd demo --fresh");
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(new.join("nbd.sock")).is_err() {
        assert!(
            fresh.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(60),
            "ubd demo --fresh did not serve"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(fresh.id(), "INT");
    assert!(fresh.wait().unwrap().success());
}
