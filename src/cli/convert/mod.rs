//! `ubd convert`: merge an overlay (or copy a raw image) into a new sparse raw
//! image, as `uml_moo COW OUT` does, or into a new qcow2 image; and with
//! `--import`, the way back: a new overlay over a base holding only the
//! sectors where a raw image differs.
//!
//! Reads go through the block device (so OUT is what a reader of the device
//! sees); OUT is written with plain file I/O and synced before success is
//! reported. Ctrl-C stops between pieces and removes the partial file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use ubd::device::{Device, DeviceError, DeviceOptions};
use ubd::image::qcow2::{self, Qcow2Writer};
use ubd::image::{self, Image, ImageError, LockKind};

mod import;

use super::progress::{Progress, catch_interrupts, interrupted};
use super::units::format_size;
use super::{BackingDir, Outcome, Output};

/// Bytes read (and compared) at a time.
const PIECE: u64 = 4 << 20;
/// Bytes asked about in one block-status request.
const WINDOW: u64 = 1 << 30;
/// OUT is written (or left a hole) in blocks of this many bytes.
const BLOCK: u64 = 4096;
/// Zero ranges shorter than this between data are read rather than skipped.
const MIN_SKIP: u64 = 1 << 20;
const SECTOR: u64 = 512;
// qcow2 clusters: whole ones in each piece and window.
const _: () = assert!(PIECE % qcow2::CLUSTER == 0 && WINDOW % qcow2::CLUSTER == 0);
/// Exit code after Ctrl-C (128 + SIGINT), as shells report it.
const INTERRUPTED: u8 = 130;

/// The formats OUT can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

fn parse_format(text: &str) -> Result<Format, String> {
    match text.to_ascii_lowercase().as_str() {
        "raw" => Ok(Format::Raw),
        "qcow2" => Ok(Format::Qcow2),
        _ => Err(format!(
            "ubd convert writes raw and qcow2 images (-O raw, -O qcow2), not {text:?}; \
             convert the raw result further with `qemu-img convert -f raw -O {text} OUT NEW`"
        )),
    }
}

/// Merge an overlay into a new raw or qcow2 image, or import a raw image as
/// an overlay.
///
/// `ubd convert COW OUT` writes OUT, a new raw disk image holding what the
/// overlay COW reads as: the overlay's own sectors where it has them, its
/// backing file's everywhere else. This is what `uml_moo COW OUT` makes, byte
/// for byte, except that ubd keeps a trailing partial sector of the backing
/// file (uml_moo drops it) and handles images past 2 TiB. OUT is exactly as
/// long as the backing file, and sparse: ranges that read as zeros are left
/// as holes. OUT is synced to disk before ubd reports success. COW may also be
/// a raw image, which is then copied (sparsely). Neither COW nor its backing
/// file is changed.
///
/// `-O qcow2` writes the same data as a qcow2 image instead (version 3, 64 KiB
/// clusters, no backing file), for qemu and the tools that read qcow2: 64 KiB
/// clusters that read as zeros are left unallocated. Its size is the backing
/// file's rounded up to a whole 512-byte sector, as qemu counts sizes.
///
/// `ubd convert --import RAW --backing BASE COW` goes the other way: it
/// creates a new overlay COW over BASE holding exactly the 512-byte sectors
/// where RAW differs from BASE (the two must be the same size). COW read over
/// BASE then gives RAW, and takes only the space of the differences.
///
/// An existing OUT (or COW, with --import) is refused unless --force is given.
/// Ctrl-C stops the work and removes the unfinished file (exit status 130).
///
/// Examples:
///   ubd convert vm.cow merged.img
///   ubd convert -O raw --backing /new/place/base.img vm.cow merged.img
///   ubd convert -O qcow2 vm.cow merged.qcow2
///   ubd convert --import edited.img --backing base.img edited.cow
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Format of OUT: `raw` (a plain disk image) or `qcow2`.
    #[arg(short = 'O', long = "output-format", value_name = "FORMAT",
          default_value = "raw", value_parser = parse_format)]
    format: Format,
    /// Import RAW: make COW a new overlay over --backing BASE holding the
    /// sectors where RAW differs from BASE.
    #[arg(long, value_name = "RAW")]
    import: Option<PathBuf>,
    /// Without --import: read this backing file instead of the one the
    /// overlay names (for a backing file that has moved). With --import: the
    /// base the new overlay reads unchanged sectors from (required).
    #[arg(short, long, value_name = "PATH")]
    backing: Option<PathBuf>,
    #[command(flatten)]
    backing_dir: BackingDir,
    /// Replace the file to be written if it exists. A file another process
    /// holds locked, the source and its backing file are never replaced.
    #[arg(short, long)]
    force: bool,
    /// With -O qcow2: OUT keeps the overlay's backing file (raw, by its
    /// absolute path) as its own, and holds only the 64 KiB clusters the
    /// overlay has written: a qcow2 overlay for qemu over the same base.
    #[arg(long)]
    keep_backing: bool,
    /// Report as text or JSON.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// The overlay (or raw image) to convert; with --import, the overlay to create.
    #[arg(value_name = "COW")]
    source: PathBuf,
    /// The image to create (not with --import).
    #[arg(value_name = "OUT")]
    target: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct MergeReport {
    filename: String,
    format: &'static str,
    source: String,
    /// With --keep-backing: OUT's backing file.
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_file: Option<String>,
    virtual_size: u64,
    /// Bytes of data written to OUT (the rest are holes, or for qcow2
    /// unallocated clusters).
    data_written: u64,
    /// Bytes OUT takes on disk.
    actual_size: u64,
}

pub fn run(args: Args) -> Outcome {
    match &args.import {
        Some(_) if args.format != Format::Raw => Err(format!(
            "with --import, ubd convert makes an overlay ({}); -O {} is for OUT without it",
            args.source.display(),
            args.format.name()
        )
        .into()),
        Some(raw) => {
            let Some(base) = &args.backing else {
                return Err("--import RAW needs --backing BASE: the base image the new \
                            overlay reads unchanged sectors from"
                    .into());
            };
            if let Some(extra) = &args.target {
                return Err(format!(
                    "with --import, give only the overlay to create ({}), not also {}",
                    args.source.display(),
                    extra.display()
                )
                .into());
            }
            import::import(
                raw,
                base,
                &args.source,
                args.backing_dir.get(),
                args.force,
                args.output,
            )
        }
        None => {
            let Some(target) = &args.target else {
                return Err(format!(
                    "give the image to write: ubd convert {} OUT",
                    args.source.display()
                )
                .into());
            };
            if args.keep_backing && args.format != Format::Qcow2 {
                return Err(
                    "--keep-backing is for -O qcow2: a raw image has no backing file".into(),
                );
            }
            merge(&args, target)
        }
    }
}

/// A device error as one line that names the file (image errors already do).
fn device_err(path: &Path, e: DeviceError) -> Box<dyn std::error::Error> {
    match e {
        DeviceError::Image(e) => e.into(),
        // It names the file already.
        e @ DeviceError::Ring { .. } => ubd::error_chain(&e).into(),
        e => format!("{}: {}", path.display(), ubd::error_chain(&e)).into(),
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl Fn(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Whether `a` and `b` name the same file (both must exist).
fn same_file(a: &fs::Metadata, b: &Path) -> bool {
    fs::metadata(b).is_ok_and(|b| (a.dev(), a.ino()) == (b.dev(), b.ino()))
}

/// Opens `path` to be written from scratch: a new file, or with `force` an
/// existing one that is none of `keep`, locked and truncated to nothing.
fn open_target(path: &Path, force: bool, keep: &[&Path]) -> Result<File, ImageError> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if !force {
                return Err(ImageError::Exists {
                    path: path.to_path_buf(),
                });
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_err(path, "cannot open"))?;
            let meta = file.metadata().map_err(io_err(path, "cannot stat"))?;
            if let Some(other) = keep.iter().find(|k| same_file(&meta, k)) {
                return Err(ImageError::Io {
                    path: path.to_path_buf(),
                    op: "refusing to overwrite it",
                    source: io::Error::other(format!(
                        "it is the same file as {}, which is being read",
                        other.display()
                    )),
                });
            }
            file
        }
        Err(e) => return Err(io_err(path, "cannot create")(e)),
    };
    image::lock(&file, path, LockKind::Exclusive, Duration::ZERO)?;
    file.set_len(0).map_err(io_err(path, "cannot truncate"))?;
    Ok(file)
}

/// Removes a half-written file; says so on stderr.
fn discard(path: &Path, why: &str) {
    match fs::remove_file(path) {
        Ok(()) => eprintln!("ubd: {why}: removed the unfinished {}", path.display()),
        Err(e) => eprintln!(
            "ubd: {why}: could not remove the unfinished {}: {e}",
            path.display()
        ),
    }
}

/// The `[start, end)` ranges of `start..end` (`start` a multiple of
/// `align`) that `pick` takes, from block status extents, widened to
/// multiples of `align` (but not past `end`) and merged where they meet or
/// are less than `gap` apart. Anything the extents leave out is taken.
fn pick_ranges(
    extents: &[ubd::device::Extent],
    (start, end): (u64, u64),
    align: u64,
    gap: u64,
    pick: impl Fn(&ubd::device::Extent) -> bool,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |from: u64, to: u64| {
        let (from, to) = (from - from % align, to.next_multiple_of(align).min(end));
        match out.last_mut() {
            Some(last) if from <= last.1 || from - last.1 < gap => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    };
    let mut at = start;
    for e in extents {
        if at >= end {
            break;
        }
        let e_end = at.saturating_add(e.len).min(end);
        if pick(e) {
            push(at, e_end);
        }
        at = e_end;
    }
    if at < end {
        push(at, end);
    }
    out
}

/// Writes the blocks of `buf` (which holds OUT's bytes from `offset`) that
/// are not all zeros, coalesced; returns the bytes written.
fn write_nonzero(out: &File, path: &Path, buf: &[u8], offset: u64) -> Result<u64, ImageError> {
    static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
    let end = offset + buf.len() as u64;
    let mut written = 0;
    let mut run: Option<u64> = None;
    let mut at = offset;
    let flush_run = |from: u64, to: u64| -> Result<u64, ImageError> {
        let slice = &buf[(from - offset) as usize..(to - offset) as usize];
        out.write_all_at(slice, from)
            .map_err(io_err(path, "cannot write"))?;
        Ok(to - from)
    };
    while at < end {
        let block_end = (at / BLOCK + 1).saturating_mul(BLOCK).min(end);
        let block = &buf[(at - offset) as usize..(block_end - offset) as usize];
        let zero = block == &ZEROS[..block.len()];
        match (zero, run) {
            (true, Some(from)) => {
                written += flush_run(from, at)?;
                run = None;
            }
            (false, None) => run = Some(at),
            _ => {}
        }
        at = block_end;
    }
    if let Some(from) = run {
        written += flush_run(from, end)?;
    }
    Ok(written)
}

/// What a merge ended with.
enum Merged {
    Done { written: u64 },
    Interrupted,
}

fn merge(args: &Args, target: &Path) -> Outcome {
    let (format, source, backing) = (args.format, args.source.as_path(), args.backing.as_deref());
    catch_interrupts();
    // The size OUT gets: the backing file's (the header's), not the device's
    // capacity, which rounds it up to whole sectors.
    let (size, backing_path) = match Image::probe(source)? {
        Image::Cow(cow) => {
            let path = cow.backing_path(backing).to_path_buf();
            (cow.header.size, Some(path))
        }
        Image::Raw(raw) => {
            if let Some(b) = backing {
                return Err(format!(
                    "{} is a raw image, not an overlay: it has no backing file to replace with {}",
                    source.display(),
                    b.display()
                )
                .into());
            }
            (raw.len, None)
        }
    };
    // With --keep-backing, OUT names the backing file by its absolute path.
    let keep_backing = match (&backing_path, args.keep_backing) {
        (_, false) => None,
        (None, true) => {
            return Err(format!(
                "{} is a raw image, not an overlay: it has no backing file to keep",
                source.display()
            )
            .into());
        }
        (Some(path), true) => Some(fs::canonicalize(path).map_err(io_err(path, "cannot resolve"))?),
    };
    let opts = DeviceOptions {
        read_only: true,
        backing: backing.map(Path::to_path_buf),
        backing_dir: args.backing_dir.get().map(Path::to_path_buf),
        ..Default::default()
    };
    let dev = Device::open(source, &opts).map_err(|e| device_err(source, e))?;
    if dev.capacity() < size {
        return Err(format!(
            "{}: the device holds {} bytes, fewer than the {size} its header promises",
            source.display(),
            dev.capacity()
        )
        .into());
    }
    let mut keep = vec![source];
    keep.extend(backing_path.as_deref());
    let out = open_target(target, args.force, &keep)?;
    // A qcow2 image is whole sectors, as the device is: it holds what the
    // device reads in the last one, past the backing file's end too (a raw
    // source's device ends at its last byte: the writer pads the sector).
    let read = match format {
        Format::Raw => size,
        Format::Qcow2 => qcow2::guest_size(size).min(dev.capacity()),
    };
    let result = match format {
        Format::Raw => copy_device(&dev, source, &out, target, read),
        Format::Qcow2 => copy_qcow2(&dev, source, (&out, target), read, keep_backing.as_deref()),
    };
    // The size the image has, which the report gives.
    let size = match format {
        Format::Raw => size,
        Format::Qcow2 => qcow2::guest_size(size),
    };
    let closed = dev.close().map_err(|e| device_err(source, e));
    let written = match result.and_then(|m| closed.map(|()| m)) {
        Ok(Merged::Done { written }) => written,
        Ok(Merged::Interrupted) => {
            drop(out);
            discard(target, "interrupted");
            return Ok(INTERRUPTED);
        }
        Err(e) => {
            drop(out);
            discard(target, "failed");
            return Err(e);
        }
    };
    let allocated = out.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    drop(out);
    let (file, src) = (target.to_string_lossy(), source.to_string_lossy());
    let over = keep_backing
        .as_ref()
        .map(|b| b.to_string_lossy().into_owned());
    match args.output {
        Output::Json => {
            let report = MergeReport {
                filename: file.into_owned(),
                format: format.name(),
                source: src.into_owned(),
                backing_file: over,
                virtual_size: size,
                data_written: written,
                actual_size: allocated,
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Output::Human => println!(
            "Converted {src} to {} image {file}{}, {} ({size} bytes); {} of data written, \
             the rest {}",
            format.name(),
            over.as_ref()
                .map_or(String::new(), |b| format!(" over {b}")),
            format_size(size),
            format_size(written),
            match (format, &over) {
                (Format::Raw, _) => "left as holes",
                (Format::Qcow2, None) => "left as unallocated clusters",
                (Format::Qcow2, Some(_)) => "read from the backing file",
            }
        ),
    }
    Ok(0)
}

/// Copies the device's first `size` bytes into `out`, which is empty: sets
/// its length, writes the blocks that are not zero, and syncs it.
fn copy_device(
    dev: &Device,
    source: &Path,
    out: &File,
    target: &Path,
    size: u64,
) -> Result<Merged, Box<dyn std::error::Error>> {
    out.set_len(size)
        .map_err(io_err(target, "cannot set the length of"))?;
    let mut written = 0;
    let finished = read_data(dev, source, size, (Which::Data, 1), |at, piece| {
        written += write_nonzero(out, target, piece, at)?;
        Ok(())
    })?;
    if !finished {
        return Ok(Merged::Interrupted);
    }
    out.sync_all().map_err(io_err(target, "cannot sync"))?;
    Ok(Merged::Done { written })
}

/// Writes the device's first `size` bytes into `out`, which is empty, as a
/// qcow2 image, and syncs it. Over `backing`, only the clusters the overlay
/// holds any of: the rest read from there.
fn copy_qcow2(
    dev: &Device,
    source: &Path,
    (out, target): (&File, &Path),
    size: u64,
    backing: Option<&Path>,
) -> Result<Merged, Box<dyn std::error::Error>> {
    static ZEROS: [u8; qcow2::CLUSTER as usize] = [0; qcow2::CLUSTER as usize];
    let mut image = Qcow2Writer::new(out, target, size, backing)?;
    let which = match backing {
        Some(_) => Which::Overlay,
        None => Which::Data,
    };
    let finished = read_data(dev, source, size, (which, qcow2::CLUSTER), |at, piece| {
        for (i, cluster) in piece.chunks(qcow2::CLUSTER as usize).enumerate() {
            let index = at / qcow2::CLUSTER + i as u64;
            if cluster != &ZEROS[..cluster.len()] {
                image.write_cluster(index, cluster)?;
            } else if backing.is_some() {
                image.zero_cluster(index)?;
            }
        }
        Ok(())
    })?;
    if !finished {
        return Ok(Merged::Interrupted);
    }
    let written = image.data_written();
    image.finish()?;
    out.sync_all().map_err(io_err(target, "cannot sync"))?;
    Ok(Merged::Done { written })
}

type BoxError = Box<dyn std::error::Error>;

/// Which ranges of the device [`read_data`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    /// Where block status finds data: the rest reads as zeros.
    Data,
    /// What the overlay holds (data or not): the rest reads from the
    /// backing file.
    Overlay,
}

/// Reads the device's first `size` bytes in the ranges `which` names and
/// hands them to `emit` in order, in pieces of at most `PIECE` that start at
/// multiples of `align` (a power of two that divides `PIECE`), with a
/// progress bar. `Ok(false)` after Ctrl-C.
fn read_data(
    dev: &Device,
    source: &Path,
    size: u64,
    (which, align): (Which, u64),
    mut emit: impl FnMut(u64, &[u8]) -> Result<(), BoxError>,
) -> Result<bool, BoxError> {
    let progress = Progress::new(size, "Converting");
    let mut buf = vec![0u8; PIECE as usize];
    let mut reported = 0;
    let mut window = 0;
    while window < size {
        let window_end = window.saturating_add(WINDOW).min(size);
        let extents = dev
            .block_status(window, window_end - window)
            .map_err(|e| device_err(source, e))?;
        // An answer may end early (a fragmented range): the window then
        // ends where it does, rounded down to `align`, and the next one
        // asks again from there. (If that leaves nothing, the rest is
        // taken as `pick_ranges` takes what extents leave out.)
        let covered = extents.iter().fold(0u64, |n, e| n.saturating_add(e.len));
        let covered_end = window.saturating_add(covered);
        let window_end = match covered_end - covered_end % align {
            end if end > window && end < window_end => end,
            _ => window_end,
        };
        let ranges = match which {
            Which::Data => {
                pick_ranges(&extents, (window, window_end), align, MIN_SKIP, |e| !e.zero)
            }
            Which::Overlay => {
                pick_ranges(&extents, (window, window_end), align, 0, |e| e.depth == 1)
            }
        };
        for (start, end) in ranges {
            let mut at = start;
            while at < end {
                if interrupted() {
                    progress.finish();
                    return Ok(false);
                }
                let piece_end = (at / PIECE + 1).saturating_mul(PIECE).min(end);
                let piece = &mut buf[..(piece_end - at) as usize];
                dev.read_at(at, piece).map_err(|e| device_err(source, e))?;
                emit(at, piece)?;
                progress.inc(piece_end.saturating_sub(reported));
                reported = reported.max(piece_end);
                at = piece_end;
            }
        }
        progress.inc(window_end - reported);
        reported = window_end;
        window = window_end;
        if interrupted() {
            progress.finish();
            return Ok(false);
        }
    }
    progress.finish();
    Ok(true)
}
