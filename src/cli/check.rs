//! `ubd check`: is an overlay sound, and does its backing file still match?

use std::path::{Path, PathBuf};

use serde::Serialize;
use ubd::image::{CowImage, Image, ImageError};
use ubd_cow::CowError;

use super::progress::Progress;
use super::units::format_size;
use super::{BackingDir, Outcome, Output};

/// Exit code: the overlay is sound and its backing file matches.
const CLEAN: u8 = 0;
// Exit code 1, the check could not run (the file could not be read), comes
// from main's error path.
/// Exit code: the overlay is corrupt.
const CORRUPT: u8 = 2;
/// Exit code: the overlay is sound but its backing file is missing, changed
/// or refused (not a regular file, or outside --backing-dir).
const BACKING: u8 = 3;

/// Check an overlay for damage and a changed backing file.
///
/// Checks that the header is sane, that the file is as long as the header says
/// (header, bitmap and data area), that no bitmap bit is set past the last
/// sector, and that the backing file exists with the size and mtime (whole
/// seconds) recorded when the overlay was made: UML refuses the pair otherwise.
/// A backing file that is not a regular file, or (with --backing-dir) whose
/// resolved path is outside DIR, is refused.
///
/// Exit status: 0 clean; 1 the check could not run; 2 the overlay is corrupt;
/// 3 the overlay is sound but its backing file is missing, changed or
/// refused. The reason is printed on one line.
///
/// Example:
///   ubd check overlay.cow
///   ubd check --backing /new/place/base.img overlay.cow
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Check against this backing file instead of the one the header names
    /// (for a backing file that has moved, as UML's second name allows).
    #[arg(short, long, value_name = "PATH")]
    backing: Option<PathBuf>,
    #[command(flatten)]
    backing_dir: BackingDir,
    /// Report as text or JSON.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// The overlay to check.
    file: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    filename: String,
    /// `clean`, `corrupt` or `backing-mismatch`.
    result: &'static str,
    exit_code: u8,
    message: String,
    sectors_present: Option<u64>,
}

/// Runs the checks in order of gravity and returns the first finding.
fn examine(
    cow: &CowImage,
    backing: Option<&Path>,
    dir: Option<&Path>,
) -> Result<(u8, String, Option<u64>), ImageError> {
    let g = &cow.geometry;
    if let Err(e) = cow.check_len() {
        return Ok((
            CORRUPT,
            format!("truncated: {}", ubd::error_chain(&e)),
            None,
        ));
    }
    // A bitmap is 1/4096 of the disk: 256 MiB for 1 TiB. Show progress.
    let progress = Progress::new(g.bitmap_len, "check");
    let scan = cow.scan_bitmap_with(|n| progress.inc(n));
    progress.finish();
    let scan = match scan {
        Ok(scan) => scan,
        Err(ImageError::Format { source, .. }) => {
            return Ok((CORRUPT, format!("truncated: {source}"), None));
        }
        Err(e) => return Err(e),
    };
    let present = Some(scan.present);
    if cow.file_len < g.full_len() {
        return Ok((
            CORRUPT,
            format!(
                "truncated: file is {} bytes, but an overlay of a {}-byte backing file is {} bytes \
                 (data offset {} + size)",
                cow.file_len,
                cow.header.size,
                g.full_len(),
                g.data_offset
            ),
            present,
        ));
    }
    if scan.stray > 0 {
        return Ok((
            CORRUPT,
            format!(
                "corrupt bitmap: {} bit(s) set past the last sector ({} sectors; bitmap at offset {})",
                scan.stray, g.sectors, g.bitmap_offset
            ),
            present,
        ));
    }
    let path = cow.backing_path(backing);
    let state = match cow.backing(backing, dir) {
        Ok(examined) => examined.state,
        Err(ImageError::BackingRefused { refusal, .. }) => {
            return Ok((BACKING, refusal.to_string(), present));
        }
        Err(e) => return Err(e),
    };
    if let Some(problem) = state.problem(&cow.header, path) {
        return Ok((BACKING, problem, present));
    }
    Ok((
        CLEAN,
        format!(
            "clean: UML COW {} overlay, {} of {} sectors present ({}), backing file {} matches",
            cow.header.version.name(),
            scan.present,
            g.sectors,
            format_size(scan.present * 512),
            path.display()
        ),
        present,
    ))
}

pub fn run(args: Args) -> Outcome {
    let (code, message, sectors_present) = match Image::probe(&args.file) {
        Ok(Image::Cow(cow)) => examine(&cow, args.backing.as_deref(), args.backing_dir.get())?,
        Ok(Image::Raw(_)) => (
            CORRUPT,
            format!(
                "not a UML COW overlay: {} (a raw image, or an overlay whose header is damaged)",
                CowError::NotCow
            ),
            None,
        ),
        Err(ImageError::Format { source, .. }) => {
            (CORRUPT, format!("corrupt header: {source}"), None)
        }
        Err(e) => return Err(e.into()),
    };
    let filename = args.file.to_string_lossy().into_owned();
    match args.output {
        Output::Json => {
            let result = match code {
                CLEAN => "clean",
                CORRUPT => "corrupt",
                BACKING => "backing-mismatch",
                _ => "error",
            };
            let report = Report {
                filename,
                result,
                exit_code: code,
                message,
                sectors_present,
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Output::Human => println!("{filename}: {message}"),
    }
    Ok(code)
}
