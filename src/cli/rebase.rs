//! `ubd rebase`: point an overlay at a backing file that has moved.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use ubd::image::{self, BackingState, Image, LockKind};
use ubd_cow::{Geometry, Header, Version};

use super::{BackingDir, Outcome, Output};

/// Point an overlay at a backing file that has moved.
///
/// Rewrites the backing file path in the overlay's header. NEW must have the
/// size and the mtime (whole seconds) the header records, which is what
/// `mv`, `cp -p` and `touch -r` keep; otherwise the command refuses, since
/// the overlay's unwritten sectors would then read from a different file.
///
/// --unsafe records NEW's mtime too, so a NEW whose mtime differs is taken.
/// That is only right if NEW holds exactly the data the old backing file
/// held: otherwise every sector the overlay has not written reads different
/// data, and the disk's file system will look corrupt. NEW's size must still
/// match (the bitmap's length depends on it).
///
/// Example:
///   ubd rebase --backing /srv/images/base.img vm.cow
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The backing file's new place.
    #[arg(short, long, value_name = "NEW")]
    backing: PathBuf,
    #[command(flatten)]
    backing_dir: BackingDir,
    /// Accept a NEW whose mtime differs (see above for what that risks).
    #[arg(long = "unsafe")]
    unsafe_: bool,
    /// Report as text or JSON.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// The overlay to change.
    file: PathBuf,
}

pub fn run(args: Args) -> Outcome {
    let cow = match Image::probe(&args.file)? {
        Image::Cow(c) => c,
        Image::Raw(_) => {
            return Err(format!("{}: not a UML COW overlay", args.file.display()).into());
        }
    };
    if cow.header.version != Version::V3 {
        return Err(format!(
            "{}: a {} overlay; only v3 headers are written",
            args.file.display(),
            cow.header.version.name()
        )
        .into());
    }
    // NEW must be a regular file (inside --backing-dir, if given).
    image::vet(&args.file, &args.backing, args.backing_dir.get())?;
    let new = image::resolve(&args.backing)?;
    let stamp = image::stamp(&new)?;
    if let Ok(file) = std::fs::File::open(&new) {
        image::warn_if_container(&file, &new, Some(&args.file));
    }
    let mut mtime = cow.header.mtime;
    match BackingState::of(&cow.header, &new) {
        BackingState::Matches => {}
        BackingState::MtimeDiffers { on_disk } if args.unsafe_ => {
            mtime = u32::try_from(on_disk).map_err(|_| {
                format!(
                    "{}: mtime {on_disk} does not fit the COW header",
                    new.display()
                )
            })?;
            eprintln!(
                "ubd: warning: {} has mtime {on_disk}, not {}: recording it anyway (--unsafe). \
                 If its data differs from the old backing file's, the overlay's unwritten \
                 sectors now read different data.",
                new.display(),
                cow.header.mtime
            );
        }
        state => {
            let problem = state
                .problem(&cow.header, &new)
                .unwrap_or_else(|| "does not match".to_string());
            let hint = if matches!(state, BackingState::MtimeDiffers { .. }) {
                " (--unsafe takes it anyway; see --help for what that risks)"
            } else {
                ""
            };
            return Err(format!(
                "{}: {problem}; refusing to rebase{hint}",
                args.file.display()
            )
            .into());
        }
    }
    let mut header =
        Header::new_v3(&new, stamp.size, mtime).map_err(|e| format!("{}: {e}", new.display()))?;
    // The alignment places the bitmap and the data: keep the overlay's (UML
    // on a host with 64 KiB pages writes 65536), or both would move.
    header.alignment = cow.header.alignment;
    if Geometry::new(&header).ok() != Some(cow.geometry) {
        return Err(format!(
            "{}: the new header would move the bitmap or the data; refusing to rebase",
            args.file.display()
        )
        .into());
    }
    let bytes = header
        .encode()
        .map_err(|e| format!("{}: {e}", new.display()))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.file)
        .map_err(|e| format!("{}: cannot open: {e}", args.file.display()))?;
    image::lock(
        &file,
        &args.file,
        LockKind::Exclusive,
        Duration::from_secs(2),
    )?;
    // The header is one 4128-byte write at offset 0; the rest of the path
    // field is zero-filled, so no old name survives after the new one.
    file.write_all_at(&bytes, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: cannot write the header: {e}", args.file.display()))?;
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "filename": args.file.to_string_lossy(),
                "backing_file": new.to_string_lossy(),
                "backing_mtime": mtime,
                "unsafe": args.unsafe_ && mtime != cow.header.mtime,
            })
        ),
        Output::Human => println!(
            "{} now reads its unwritten sectors from {}",
            args.file.display(),
            new.display()
        ),
    }
    Ok(0)
}
