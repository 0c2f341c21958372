//! Without io_uring (turned off by a seccomp filter, as a container's default
//! profile does, or absent from the kernel), every verb that does I/O fails
//! at once with a message that names the file and says why, and leaves
//! nothing behind: no socket file, no commit marker, no output image.

mod common;

use common::{base_and_overlay, output, ubd_bin};
use std::path::Path;
use std::process::Command;

/// `ubd ARGS` with io_uring_setup failing with `errno`.
fn ubd_without_io_uring(errno: i32, dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let deny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/no_io_uring/deny.py");
    let out = output(
        Command::new("/usr/bin/python3")
            .arg(deny)
            .arg(errno.to_string())
            .arg(ubd_bin())
            .args(args)
            .current_dir(dir),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn without_io_uring_each_verb_says_why_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, cow, _) = base_and_overlay(dir.path(), 7, 1 << 20);
    assert!(cow.ends_with("cow.img"));
    let before = std::fs::read_dir(dir.path()).unwrap().count();
    // (arguments, exit code: `compare` keeps 1 for "they differ")
    let cases: [(&[&str], i32); 6] = [
        (&["map", "cow.img"], 1),
        (&["convert", "cow.img", "out.img"], 1),
        (&["commit", "cow.img"], 1),
        (&["bench", "cow.img"], 1),
        (&["compare", "cow.img", "base.img"], 2),
        (&["serve", "cow.img", "--socket", "nbd.sock"], 1),
    ];
    for (errno, why) in [
        (libc::EPERM, "io_uring is turned off for this process"),
        (libc::ENOSYS, "this kernel has no io_uring"),
    ] {
        for (args, exit) in cases {
            let (code, stderr) = ubd_without_io_uring(errno, dir.path(), args);
            assert_eq!(code, Some(exit), "ubd {args:?} (errno {errno}): {stderr}");
            assert!(
                stderr.contains("cow.img: cannot set up io_uring") && stderr.contains(why),
                "ubd {args:?} (errno {errno}) does not say what failed and why:\n{stderr}"
            );
            assert_eq!(
                stderr.matches("cow.img:").count(),
                1,
                "ubd {args:?} names the file more than once:\n{stderr}"
            );
            let left: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left.len(), before, "ubd {args:?} left files: {left:?}");
        }
    }
    // The same commands work with io_uring.
    let out = output(common::ubd().arg("map").arg(&cow));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
