//! `ubd create`: a new overlay over a backing file, or a new raw image.

use std::path::PathBuf;

use ubd::image;

use super::units::{format_size, parse_size};
use super::{Outcome, Output};

/// Create an empty overlay over a backing file, or a blank raw image.
///
/// With --backing, FILE becomes a new UML COW v3 overlay (the format uml_mkcow
/// writes): a header recording the backing file's absolute path, size and mtime,
/// an all-zero bitmap, and a sparse data area. It is `data_offset + size` bytes
/// long but takes almost no disk space until sectors are written.
///
/// Without --backing, FILE becomes a sparse raw image of SIZE bytes.
///
/// Examples:
///   ubd create --backing base.img overlay.cow
///   ubd create disk.img 10G
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The backing image the overlay reads unwritten sectors from. It is never
    /// written; `ubd create` only reads its size and mtime.
    #[arg(short, long, value_name = "BASE")]
    backing: Option<PathBuf>,
    /// Replace FILE if it exists: it is truncated to nothing first, so no old
    /// bitmap survives. Refused while another process has the file locked.
    #[arg(short, long)]
    force: bool,
    /// Report as text or JSON.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// The overlay or raw image to create.
    file: PathBuf,
    /// Size of a raw image (e.g. 512M, 10G); an overlay takes its size from BASE.
    #[arg(value_parser = parse_size, allow_negative_numbers = true)]
    size: Option<u64>,
}

pub fn run(args: Args) -> Outcome {
    let (format, backing, size) = match (&args.backing, args.size) {
        (Some(_), Some(_)) => {
            return Err(
                "an overlay takes its size from its backing file: give --backing or SIZE, not both"
                    .into(),
            );
        }
        (None, None) => {
            return Err("give --backing BASE for an overlay, or a SIZE for a raw image".into());
        }
        (Some(backing), None) => {
            let header = image::create_overlay(&args.file, backing, args.force)?;
            let size = header.size.next_multiple_of(512);
            ("cow", Some(header.backing_file), size)
        }
        (None, Some(size)) => {
            // Refused before FILE is touched (with --force, truncated).
            if i64::try_from(size).is_err() {
                return Err(format!(
                    "SIZE {} ({size} bytes) is more than a file can hold ({} bytes at most)",
                    format_size(size),
                    i64::MAX
                )
                .into());
            }
            image::create_raw(&args.file, size, args.force)?;
            ("raw", None, size)
        }
    };
    let file = args.file.to_string_lossy();
    match args.output {
        Output::Json => {
            let mut report = serde_json::json!({
                "filename": file,
                "format": format,
                "virtual_size": size,
            });
            if let Some(backing) = &backing {
                report["backing_file"] = backing.to_string_lossy().into();
            }
            println!("{report}");
        }
        Output::Human => match &backing {
            Some(backing) => println!(
                "Created overlay {file} over {}, {} ({size} bytes)",
                backing.display(),
                format_size(size),
            ),
            None => println!(
                "Created raw image {file}, {} ({size} bytes)",
                format_size(size)
            ),
        },
    }
    Ok(0)
}
