//! `--backing-dir DIR`: an overlay from someone else can name any backing
//! path; with DIR given, a backing file whose fully resolved path (symlinks
//! and `..` resolved) is not inside DIR is refused by every verb that reads
//! one, and the message names the overlay, the path it names and DIR. `ubd
//! serve` logs and `ubd info` shows the file that will be read.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::server::{Server, serve_refused};
use common::{output, run, ubd, ubd_info};

/// `trusted/base.img` and `outside/base.img` (the same size), and the
/// canonical form of each directory.
struct Tree {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    trusted: PathBuf,
    outside: PathBuf,
}

impl Tree {
    fn new() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(tmp.path()).unwrap();
        let (trusted, outside) = (root.join("trusted"), root.join("outside"));
        for (dir, seed) in [(&trusted, 1), (&outside, 2)] {
            fs::create_dir(dir).unwrap();
            fs::write(
                dir.join("base.img"),
                common::pseudo_random_bytes(seed, 1 << 20),
            )
            .unwrap();
        }
        Tree {
            _tmp: tmp,
            root,
            trusted,
            outside,
        }
    }

    /// A new overlay `name` over `backing`.
    fn overlay(&self, name: &str, backing: &Path) -> PathBuf {
        let cow = self.root.join(name);
        run(ubd().args(["create", "--backing"]).arg(backing).arg(&cow));
        cow
    }

    fn dir_arg(&self) -> [&std::ffi::OsStr; 2] {
        ["--backing-dir".as_ref(), self.trusted.as_os_str()]
    }
}

/// Rewrites the backing path of a v3 overlay's header.
fn name_backing(cow: &Path, path: &Path) {
    let mut field = vec![0u8; 4096];
    let name = path.as_os_str().as_encoded_bytes();
    field[..name.len()].copy_from_slice(name);
    fs::OpenOptions::new()
        .write(true)
        .open(cow)
        .unwrap()
        .write_all_at(&field, 32)
        .unwrap();
}

/// `ubd VERB ARGS...`: exit code and stdout + stderr.
fn ubd_says(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = output(ubd().args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// info, check and serve all refuse `cow` (with `extra` arguments), naming
/// the overlay, the path it names (`named`), where it resolves and DIR.
fn assert_refused_by_all(t: &Tree, cow: &Path, extra: &[&std::ffi::OsStr], named: &Path) {
    let resolved = t.outside.join("base.img");
    let shown = if named == resolved {
        format!("backing file {}", named.display())
    } else {
        format!(
            "backing file {} (resolves to {})",
            named.display(),
            resolved.display()
        )
    };
    let words = format!(
        "{shown} is outside the backing directory {} (--backing-dir): refusing to read it",
        t.trusted.display()
    );
    let mut args: Vec<&std::ffi::OsStr> = t.dir_arg().to_vec();
    args.extend_from_slice(extra);
    args.push(cow.as_os_str());
    for (verb, code) in [("info", 1), ("check", 3)] {
        let mut a = vec![verb.as_ref()];
        a.extend_from_slice(&args);
        let (got, text) = ubd_says(&a);
        assert_eq!(got, Some(code), "{verb}: {text}");
        assert!(text.contains(&words), "{verb}: {text}\nwanted: {words}");
        assert!(text.contains(cow.to_str().unwrap()), "{verb}: {text}");
    }
    let (code, err) = serve_refused(&t.root.join("s.sock"), &args);
    assert_eq!(code, Some(1), "serve: {err}");
    assert!(
        err.contains(&words) && err.contains(cow.to_str().unwrap()),
        "serve: {err}\nwanted: {words}"
    );
}

#[test]
fn a_symlink_out_of_the_directory_is_refused() {
    let t = Tree::new();
    let link = t.trusted.join("link.img");
    symlink("../outside/base.img", &link).unwrap();
    // The header records the symlink's name, as uml_mkcow does.
    let cow = t.overlay("vm.cow", &link);
    assert_eq!(ubd_info(&cow)["backing_file"], link.to_str().unwrap());
    assert_refused_by_all(&t, &cow, &[], &link);
}

#[test]
fn a_dotdot_path_out_of_the_directory_is_refused() {
    let t = Tree::new();
    let cow = t.overlay("vm.cow", &t.outside.join("base.img"));
    let named = t.trusted.join("../outside/base.img");
    name_backing(&cow, &named);
    // Without --backing-dir the pair is fine: the path is only resolved.
    assert_eq!(ubd_info(&cow)["backing_matches"], true);
    assert_refused_by_all(&t, &cow, &[], &named);
}

#[test]
fn a_backing_override_outside_the_directory_is_refused() {
    let t = Tree::new();
    let cow = t.overlay("vm.cow", &t.trusted.join("base.img"));
    // A copy with the same size and mtime: the pair would match.
    let copy = t.outside.join("copy.img");
    run(Command::new("cp")
        .arg("-p")
        .arg(t.trusted.join("base.img"))
        .arg(&copy));
    fs::rename(&copy, t.outside.join("base.img")).unwrap();
    let named = t.outside.join("base.img");
    assert_refused_by_all(&t, &cow, &["--backing".as_ref(), named.as_os_str()], &named);
}

/// Inside DIR everything works, also through a symlink that stays inside it
/// and with DIR itself named through a symlink; `info` shows the resolved
/// file and `serve` logs it.
#[test]
fn a_backing_file_inside_the_directory_is_served() {
    let t = Tree::new();
    let alias = t.trusted.join("current.img");
    symlink("base.img", &alias).unwrap();
    let cow = t.overlay("vm.cow", &alias);
    let dir_link = t.root.join("dir-link");
    symlink(&t.trusted, &dir_link).unwrap();
    let real = t.trusted.join("base.img");

    let json = run(ubd()
        .args(["info", "--output", "json", "--backing-dir"])
        .arg(&dir_link)
        .arg(&cow));
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["backing_file"], alias.to_str().unwrap());
    assert_eq!(j["backing_resolved"], real.to_str().unwrap());
    assert_eq!(j["backing_matches"], true);
    let text = run(ubd().arg("info").args(t.dir_arg()).arg(&cow));
    assert!(
        text.contains(&format!("backing file: {}\n", alias.display()))
            && text.contains(&format!("backing file resolves to: {}\n", real.display())),
        "{text}"
    );
    let (code, line) = ubd_says(&[
        "check".as_ref(),
        t.dir_arg()[0],
        t.dir_arg()[1],
        cow.as_ref(),
    ]);
    assert_eq!(code, Some(0), "{line}");

    let socket = t.root.join("s.sock");
    let mut args: Vec<&std::ffi::OsStr> = t.dir_arg().to_vec();
    args.push(cow.as_os_str());
    let server = Server::start(&socket, &args);
    let got = common::run_bytes(
        Command::new(common::tool("nbdcopy", "libnbd-bin"))
            .arg(server.uri())
            .arg("-"),
    );
    assert!(
        got == fs::read(&real).unwrap(),
        "the export is not the backing file"
    );
    let (status, log) = server.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("backing={}", real.display())),
        "serve does not log the backing file it reads:\n{log}"
    );
}

/// Every other verb that reads a backing file refuses one outside DIR, and
/// writes nothing.
#[test]
fn every_verb_that_reads_a_backing_file_checks_the_directory() {
    let t = Tree::new();
    let outside_base = t.outside.join("base.img");
    let cow = t.overlay("vm.cow", &outside_base);
    let before = fs::read(&outside_base).unwrap();
    let out_img = t.root.join("merged.img");
    let new_cow = t.root.join("new.cow");
    let raw = t.root.join("raw.img");
    fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let d = t.dir_arg();
    let (c, o, n, r, b) = (
        cow.as_os_str(),
        out_img.as_os_str(),
        new_cow.as_os_str(),
        raw.as_os_str(),
        outside_base.as_os_str(),
    );
    let cases: Vec<(Vec<&std::ffi::OsStr>, i32)> = vec![
        (vec!["map".as_ref(), d[0], d[1], c], 1),
        (vec!["compare".as_ref(), d[0], d[1], c, r], 2),
        (vec!["convert".as_ref(), d[0], d[1], c, o], 1),
        (
            vec![
                "convert".as_ref(),
                d[0],
                d[1],
                "--import".as_ref(),
                r,
                "--backing".as_ref(),
                b,
                n,
            ],
            1,
        ),
        (vec!["commit".as_ref(), d[0], d[1], c], 1),
        (
            vec!["rebase".as_ref(), d[0], d[1], "--backing".as_ref(), b, c],
            1,
        ),
        (
            vec![
                "bench".as_ref(),
                "--count".as_ref(),
                "1".as_ref(),
                d[0],
                d[1],
                c,
            ],
            1,
        ),
    ];
    for (args, want) in cases {
        let (code, text) = ubd_says(&args);
        assert_eq!(code, Some(want), "{args:?}: {text}");
        assert!(
            text.contains("is outside the backing directory")
                && text.contains(&*t.trusted.to_string_lossy()),
            "{args:?}: {text}"
        );
    }
    assert!(!out_img.exists() && !new_cow.exists());
    assert_eq!(fs::read(&outside_base).unwrap(), before);
    // The same verbs work with the directory that holds it.
    let d = ["--backing-dir".as_ref(), t.outside.as_os_str()];
    run(ubd().arg("map").args(d).arg(&cow));
    run(ubd().arg("convert").args(d).arg(&cow).arg(&out_img));
    run(ubd().arg("compare").args(d).arg(&cow).arg(&out_img));
}
