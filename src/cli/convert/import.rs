//! `ubd convert --import RAW --backing BASE COW`: a new overlay over BASE
//! holding only the sectors where RAW differs from it, written through the
//! block device and flushed before success is reported.

use std::fs::File;
use std::path::Path;

use serde::Serialize;
use ubd::device::{Device, DeviceOptions, Flags};
use ubd::image::{self, Image, ImageError};

use super::{INTERRUPTED, PIECE, SECTOR, device_err, discard, io_err};
use crate::cli::progress::{Progress, catch_interrupts, interrupted};
use crate::cli::units::format_size;
use crate::cli::{Outcome, Output};

#[derive(Debug, Serialize)]
struct ImportReport {
    filename: String,
    format: &'static str,
    source: String,
    backing_file: String,
    virtual_size: u64,
    /// Sectors that differ, now present in the overlay.
    sectors_present: u64,
}

/// Fills `buf` from `file` at `offset`; zeros past the end of the file.
fn read_padded(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
    let done = image::read_full_at(file, buf, offset).map_err(io_err(path, "cannot read"))?;
    buf[done..].fill(0);
    Ok(())
}

pub(super) fn import(
    raw: &Path,
    base: &Path,
    cow: &Path,
    backing_dir: Option<&Path>,
    force: bool,
    output: Output,
) -> Outcome {
    catch_interrupts();
    // BASE is read here, and is the new overlay's backing file.
    let base_resolved = image::vet(cow, base, backing_dir)?;
    if let Image::Cow(_) = Image::probe(raw)? {
        return Err(format!(
            "{} is a UML COW overlay, not a raw image: `ubd convert {} OUT` makes a raw image of it",
            raw.display(),
            raw.display()
        )
        .into());
    }
    let raw_file = File::open(raw).map_err(io_err(raw, "cannot open"))?;
    image::warn_if_container(&raw_file, raw, None);
    // (BASE is named by `create_overlay`'s warning, if it needs one.)
    let base_file = image::open_vetted(cow, base, &base_resolved, backing_dir, false, false)?;
    let raw_len = image::stamp(raw)?.size;
    let base_len = image::stamp(base)?.size;
    if raw_len != base_len {
        return Err(format!(
            "{} is {raw_len} bytes but {} is {base_len} bytes: an overlay has exactly its \
             backing file's size, so RAW and BASE must be the same size",
            raw.display(),
            base.display()
        )
        .into());
    }
    if image::same_file(cow, raw) {
        return Err(format!(
            "refusing to create {} over itself: it is the image to import, {}",
            cow.display(),
            raw.display()
        )
        .into());
    }
    let header = image::create_overlay(cow, base, force)?;
    // Only the sectors that differ go into the overlay.
    let opts = DeviceOptions {
        read_only: false,
        backing_dir: backing_dir.map(Path::to_path_buf),
        copy_up: false,
        ..Default::default()
    };
    let dev = match Device::open(cow, &opts) {
        Ok(dev) => dev,
        Err(e) => {
            discard(cow, "failed");
            return Err(device_err(cow, e));
        }
    };
    let files = Pair {
        raw: (&raw_file, raw),
        base: (&base_file, base),
    };
    let result = files.write_differences(&dev, cow, raw_len);
    let result = result.and_then(|r| {
        if let Imported::Done { .. } = r {
            dev.flush().map_err(|e| device_err(cow, e))?;
        }
        Ok(r)
    });
    let closed = dev.close().map_err(|e| device_err(cow, e));
    drop(dev);
    let sectors = match result.and_then(|r| closed.map(|()| r)) {
        Ok(Imported::Done { sectors }) => sectors,
        Ok(Imported::Interrupted) => {
            discard(cow, "interrupted");
            return Ok(INTERRUPTED);
        }
        Err(e) => {
            discard(cow, "failed");
            return Err(e);
        }
    };
    let (file, src) = (cow.to_string_lossy(), raw.to_string_lossy());
    let capacity = header.size.next_multiple_of(SECTOR);
    match output {
        Output::Json => {
            let report = ImportReport {
                filename: file.into_owned(),
                format: "cow",
                source: src.into_owned(),
                backing_file: header.backing_file.to_string_lossy().into_owned(),
                virtual_size: capacity,
                sectors_present: sectors,
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Output::Human => println!(
            "Imported {src} as overlay {file} over {}, {} ({capacity} bytes): \
             {sectors} sectors differ ({})",
            header.backing_file.display(),
            format_size(capacity),
            format_size(sectors * SECTOR),
        ),
    }
    Ok(0)
}

enum Imported {
    Done { sectors: u64 },
    Interrupted,
}

/// The image to import and its base, each with its name.
struct Pair<'a> {
    raw: (&'a File, &'a Path),
    base: (&'a File, &'a Path),
}

impl Pair<'_> {
    /// Compares the two files piece by piece and writes the sectors where
    /// they differ to the device, in runs. Ranges that are holes in both are
    /// skipped unread.
    fn write_differences(
        &self,
        dev: &Device,
        cow: &Path,
        len: u64,
    ) -> Result<Imported, Box<dyn std::error::Error>> {
        let progress = Progress::new(len, "Importing");
        let mut a = vec![0u8; PIECE as usize];
        let mut b = vec![0u8; PIECE as usize];
        let mut sectors = 0;
        let mut at = 0;
        while at < len {
            if interrupted() {
                progress.finish();
                return Ok(Imported::Interrupted);
            }
            // Skip what is a hole in both files, in whole sectors.
            let data =
                image::next_data(self.raw.0, at, len).min(image::next_data(self.base.0, at, len));
            let skip_to = (data / SECTOR * SECTOR).max(at);
            if skip_to > at {
                progress.inc(skip_to - at);
                at = skip_to;
                continue;
            }
            let piece_end = (at / PIECE + 1).saturating_mul(PIECE).min(len);
            // Whole sectors: the last piece runs to the capacity, zero-padded.
            let n = (piece_end.next_multiple_of(SECTOR) - at) as usize;
            read_padded(self.raw.0, self.raw.1, &mut a[..n], at)?;
            read_padded(self.base.0, self.base.1, &mut b[..n], at)?;
            if a[..n] != b[..n] {
                sectors += write_runs(dev, cow, &a[..n], &b[..n], at)?;
            }
            progress.inc(piece_end - at);
            at = piece_end;
        }
        progress.finish();
        Ok(Imported::Done { sectors })
    }
}

/// Writes to the device the runs of sectors where `new` differs from `old`
/// (both hold whole sectors from `offset`); returns the sectors written.
fn write_runs(
    dev: &Device,
    cow: &Path,
    new: &[u8],
    old: &[u8],
    offset: u64,
) -> Result<u64, Box<dyn std::error::Error>> {
    let s = SECTOR as usize;
    let count = new.len() / s;
    let differs = |i: usize| new[i * s..(i + 1) * s] != old[i * s..(i + 1) * s];
    let mut sectors = 0;
    let mut i = 0;
    while i < count {
        if !differs(i) {
            i += 1;
            continue;
        }
        let first = i;
        while i < count && differs(i) {
            i += 1;
        }
        dev.write_at(
            offset + (first * s) as u64,
            &new[first * s..i * s],
            Flags::default(),
        )
        .map_err(|e| device_err(cow, e))?;
        sectors += (i - first) as u64;
    }
    Ok(sectors)
}
