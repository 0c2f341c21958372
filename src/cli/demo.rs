//! `ubd demo`: a ready-made disk to try `ubd serve` on.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use ubd::device::DeviceOptions;

use super::Outcome;
use super::serve::{Plan, serve};

/// Serve a demo disk: an ext4 file system with a few files, under an overlay.
///
/// Makes DIR/base.img (a 64 MiB ext4 file system, read-only, built with
/// mkfs.ext4 -d) and DIR/demo.cow (an empty UML COW overlay over it) unless
/// they exist (a DIR without base.img must be new or empty, but for what an
/// interrupted demo left), then serves the overlay on DIR/nbd.sock and
/// prints commands to try. Writes land in the overlay; the base image never
/// changes. Ctrl-C stops the server; --fresh starts again from an empty
/// overlay.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Where the demo files go.
    #[arg(long, default_value = "ubd-demo")]
    dir: PathBuf,
    /// Throw away the overlay (the demo's writes) first.
    #[arg(long)]
    fresh: bool,
}

/// Size of the demo file system.
const BASE_SIZE: &str = "64M";

/// The staging directory and the file system being built, in DIR while the
/// demo builds its base: names no one else's files have.
const STAGING: &str = ".ubd-demo-content";
const BASE_TMP: &str = "base.img.ubd-demo-tmp";
const BUILD_LEFTOVERS: [&str; 2] = [STAGING, BASE_TMP];

pub fn run(args: Args) -> Outcome {
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("{}: cannot create the directory: {e}", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let base = dir.join("base.img");
    let cow = dir.join("demo.cow");
    let socket = dir.join("nbd.sock");
    if !base.exists() {
        // The demo makes its files (and its staging directory) only where
        // nothing of anyone else's can be in the way.
        // What a demo stopped while it built its base leaves (it builds
        // them again) does not count.
        let empty = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: cannot read the directory: {e}", dir.display()))?
            .filter_map(Result::ok)
            .all(|entry| {
                BUILD_LEFTOVERS
                    .iter()
                    .any(|name| entry.file_name() == *name)
            });
        if !empty {
            return Err(format!(
                "{}: not empty, and not a demo directory (it has no base.img); \
                 give --dir a new or empty directory",
                dir.display()
            )
            .into());
        }
        make_base(&dir, &base)?;
    }
    if args.fresh || !cow.exists() {
        ubd::image::create_overlay(&cow, &base, true)?;
    } else if let Ok(ubd::image::Image::Cow(overlay)) = ubd::image::Image::probe(&cow) {
        // The overlay reads DIR/base.img, wherever DIR has moved; one that
        // no longer matches it (a copied or touched base) cannot be served.
        let problem = match overlay.backing(Some(&base), None) {
            Ok(examined) => examined.state.problem(&overlay.header, &base),
            Err(e) => Some(ubd::error_chain(&e)),
        };
        if let Some(problem) = problem {
            return Err(format!(
                "{}: {problem}; `ubd demo --fresh` starts again with an empty overlay",
                cow.display()
            )
            .into());
        }
    }
    let uri = ubd::nbd::uri::unix(false, &socket, "");
    let mnt = dir.join("mnt");
    let mut banner = String::new();
    let _ = writeln!(
        banner,
        "\nThe disk is {} (writes) over {} (a {BASE_SIZE} ext4 file system, never written).",
        cow.display(),
        base.display()
    );
    let _ = writeln!(banner, "Try, from another terminal:");
    let _ = writeln!(banner, "  nbdinfo '{uri}'");
    let _ = writeln!(
        banner,
        "  qemu-io -f raw '{uri}' -c 'read -v 1144 16'    # the file system's label"
    );
    // Mounting takes root, and a FUSE file serves only the user who made
    // it: both steps run as root (`sudo -b` asks for a password before it
    // puts nbdfuse in the background).
    let (fuse, bg, mount) = if nix::unistd::geteuid().is_root() {
        ("nbdfuse", " &", "mount")
    } else {
        ("sudo -b nbdfuse", "", "sudo mount")
    };
    let root = dir.join("root");
    let _ = writeln!(
        banner,
        "  mkdir -p {m} {r} && {fuse} {disk} '{uri}'{bg}\n  \
         sleep 1 && {mount} -o loop {disk} {r} && cat {readme}",
        m = sh_quote(&mnt),
        r = sh_quote(&root),
        disk = sh_quote(&mnt.join("disk")),
        readme = sh_quote(&root.join("README.txt")),
    );
    let _ = write!(banner, "Press Ctrl-C to stop.");
    serve(Plan {
        exports: vec![(String::new(), cow)],
        socket: Some(socket),
        tcp: None,
        listen_asked: false,
        device: DeviceOptions {
            backing: Some(base),
            ..DeviceOptions::default()
        },
        pid_file: None,
        max_connections: 64,
        handshake_limit: ubd::nbd::server::HANDSHAKE_LIMIT,
        fail_alloc: false,
        banner: Some(banner),
        tls: None,
        fork: false,
        log_file: None,
    })
}

/// `path` as one shell word: as it is if nothing in it is special to the
/// shell, else in single quotes.
fn sh_quote(path: &Path) -> String {
    let text = path.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Builds the demo's ext4 base image from a few generated files.
fn make_base(dir: &Path, base: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mkfs = ["/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| find_in_path("mkfs.ext4"))
        .ok_or("the demo needs mkfs.ext4 (Debian package e2fsprogs)")?;
    let staging = dir.join(STAGING);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("data"))?;
    std::fs::write(
        staging.join("README.txt"),
        "This file system is the backing image of a ubd demo.\n\
         Everything you change here is written to the overlay (demo.cow);\n\
         base.img stays as it was. `ubd info demo.cow` shows how much changed,\n\
         `ubd map demo.cow` where, and `ubd commit demo.cow` would merge it.\n",
    )?;
    std::fs::write(staging.join("hello.txt"), "Hello from ubd.\n")?;
    let mut numbers = String::new();
    for i in 1..=10_000u32 {
        let _ = writeln!(numbers, "{i}");
    }
    std::fs::write(staging.join("data/numbers.txt"), numbers)?;
    // A megabyte of reproducible noise (xorshift64*), to copy around.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect();
    std::fs::write(staging.join("data/noise.bin"), noise)?;
    let tmp = dir.join(BASE_TMP);
    let out = Command::new(&mkfs)
        .args(["-q", "-F", "-L", "ubd-demo", "-d"])
        .arg(&staging)
        .arg(&tmp)
        .arg(BASE_SIZE)
        .output()
        .map_err(|e| format!("{}: {e}", mkfs.display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "{} failed: {}",
            mkfs.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    std::fs::rename(&tmp, base)?;
    let _ = std::fs::remove_dir_all(&staging);
    let mut perms = std::fs::metadata(base)?.permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(base, perms)?;
    Ok(())
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.exists())
}
