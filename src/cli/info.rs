//! `ubd info`: what an image is, where its data lives, and whether its backing
//! file still matches.

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use ubd::image::{BackingState, CowImage, Examined, Image, RawImage};

use super::units::format_size;
use super::{BackingDir, Outcome, Output};

/// Show what an overlay or raw image holds.
///
/// For an overlay: its format version, the backing file it names (the file
/// that will be read for unwritten sectors; where it resolves to, when that
/// differs) with the size and mtime recorded for it, whether the file on disk
/// still matches them, the layout (sector size, alignment, bitmap and data
/// offsets), how many sectors the overlay holds, and how much disk space it
/// takes. A file without COW magic is reported as a raw image. A backing file
/// that is not a regular file, or (with --backing-dir) is outside DIR, is
/// refused.
///
/// Example:
///   ubd info overlay.cow
///   ubd info --output json overlay.cow
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Check this file as the backing file instead of the one the header names
    /// (for a backing file that has moved).
    #[arg(short, long, value_name = "PATH")]
    backing: Option<PathBuf>,
    #[command(flatten)]
    backing_dir: BackingDir,
    /// Report as text or JSON.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// The overlay or image to inspect.
    file: PathBuf,
}

/// Everything `info` reports, as its JSON shows it.
#[derive(Debug, Serialize)]
struct Report {
    filename: String,
    /// `cow` or `raw`.
    format: &'static str,
    /// Device capacity in bytes.
    virtual_size: u64,
    file_length: u64,
    /// Bytes allocated on disk.
    actual_size: u64,
    /// A raw image that starts with another disk image format's header:
    /// that format's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    starts_like: Option<&'static str>,
    #[serde(flatten)]
    cow: Option<CowReport>,
}

#[derive(Debug, Serialize)]
struct CowReport {
    version: u32,
    /// `v1`, `v2`, `v3` or `broken v3`.
    layout: &'static str,
    magic_byte_order: &'static str,
    backing_file: String,
    /// The file reads would go to: `backing_file` with symlinks and `..`
    /// resolved; null when it does not resolve (a missing file).
    backing_resolved: Option<String>,
    backing_size: u64,
    backing_mtime: u32,
    sector_size: u32,
    alignment: u32,
    bitmap_offset: u64,
    bitmap_length: u64,
    data_offset: u64,
    sectors_present: u64,
    sectors_total: u64,
    backing_matches: bool,
    backing_problem: Option<String>,
}

fn raw_report(raw: &RawImage) -> Report {
    Report {
        filename: raw.path.to_string_lossy().into_owned(),
        format: "raw",
        virtual_size: raw.len,
        file_length: raw.len,
        actual_size: raw.allocated,
        starts_like: raw.container,
        cow: None,
    }
}

fn cow_report(
    cow: &CowImage,
    backing: Option<&Path>,
    dir: Option<&Path>,
) -> Result<Report, ubd::image::ImageError> {
    let scan = cow.scan_bitmap()?;
    let (h, g) = (&cow.header, &cow.geometry);
    let Examined {
        named,
        resolved,
        state,
    } = cow.backing(backing, dir)?;
    Ok(Report {
        filename: cow.path.to_string_lossy().into_owned(),
        format: "cow",
        virtual_size: g.capacity(),
        file_length: cow.file_len,
        actual_size: cow.allocated,
        starts_like: None,
        cow: Some(CowReport {
            version: h.version.number(),
            layout: h.version.name(),
            magic_byte_order: h.magic_order.name(),
            backing_file: named.to_string_lossy().into_owned(),
            backing_resolved: resolved.map(|p| p.to_string_lossy().into_owned()),
            backing_size: h.size,
            backing_mtime: h.mtime,
            sector_size: h.sector_size,
            alignment: h.alignment,
            bitmap_offset: g.bitmap_offset,
            bitmap_length: g.bitmap_len,
            data_offset: g.data_offset,
            sectors_present: scan.present,
            sectors_total: g.sectors,
            backing_matches: state == BackingState::Matches,
            backing_problem: state.problem(h, &named),
        }),
    })
}

fn sized(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_size(bytes))
}

fn print_human(r: &Report) {
    println!("image: {}", r.filename);
    match &r.cow {
        None => match r.starts_like {
            None => println!("format: raw (no COW magic: a plain disk image)"),
            Some(f) => println!(
                "format: raw (no COW magic), but it starts with a {f} header: ubd reads it \
                 as a plain disk image; if it is a {f} image, `qemu-img convert -O raw` \
                 makes a raw image of the disk it holds"
            ),
        },
        Some(c) => println!(
            "format: UML COW {} (magic {})",
            c.layout, c.magic_byte_order
        ),
    }
    println!("virtual size: {}", sized(r.virtual_size));
    if let Some(c) = &r.cow {
        let when = humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_secs(u64::from(c.backing_mtime)),
        );
        println!("backing file: {}", c.backing_file);
        match &c.backing_resolved {
            Some(r) if *r != c.backing_file => println!("backing file resolves to: {r}"),
            _ => {}
        }
        println!("backing size: {}", sized(c.backing_size));
        println!("backing mtime: {when} ({})", c.backing_mtime);
        match &c.backing_problem {
            None => println!("backing on disk: matches"),
            Some(problem) => println!("backing on disk: DOES NOT MATCH: {problem}"),
        }
        println!("sector size: {}", c.sector_size);
        println!("alignment: {}", c.alignment);
        println!(
            "bitmap: {} bytes at offset {}",
            c.bitmap_length, c.bitmap_offset
        );
        println!("data offset: {}", c.data_offset);
        let share = if c.sectors_total == 0 {
            0.0
        } else {
            100.0 * c.sectors_present as f64 / c.sectors_total as f64
        };
        println!(
            "sectors present: {} of {} ({share:.1}%, {})",
            c.sectors_present,
            c.sectors_total,
            format_size(c.sectors_present * 512)
        );
    }
    println!("file length: {}", sized(r.file_length));
    println!("disk size: {}", sized(r.actual_size));
}

pub fn run(args: Args) -> Outcome {
    let report = match Image::probe(&args.file)? {
        Image::Raw(raw) => raw_report(&raw),
        Image::Cow(cow) => cow_report(&cow, args.backing.as_deref(), args.backing_dir.get())?,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => print_human(&report),
    }
    Ok(0)
}
