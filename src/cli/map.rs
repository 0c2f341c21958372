//! `ubd map`: where each run of the device reads from (the overlay, the
//! backing file, or nothing: zeros), in the spirit of `qemu-img map`.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use ubd::device::{Device, DeviceOptions, Extent};
use ubd::image::Image;

use super::units::format_size;
use super::{BackingDir, Outcome, Output};

/// Block status is asked for this much of the device at a time, so that a
/// huge image never needs all its runs in one reply.
const PIECE: u64 = 1 << 30;

/// Show where each part of an image's data lives.
///
/// Lists the device as consecutive runs, each one of:
///   overlay  written in the overlay: read from the overlay file, at
///            data offset + START
///   backing  not written in the overlay: read from the backing file, at START
///   zero     reads as zeros without any data behind it: a hole in the overlay
///            (a trimmed or zeroed range) or in the backing file, or the part
///            of the device past the backing file's end
/// A raw image (no COW magic) is one file: its runs are `overlay` (data in
/// the image itself, depth 1) or `zero` (holes).
///
/// Runs of the same kind are merged. The JSON output is an array of objects
/// {start, length, kind, depth, zero, file, offset}: depth 1 is the overlay
/// (or the raw image), 2 the backing file, 0 neither; `file` and `offset` say
/// where a run with depth 1 or 2 lives (also for its holes), null for depth 0.
///
/// The image is opened read-only; an overlay that UML or a `ubd` server has
/// open is refused as in use.
///
/// Examples:
///   ubd map vm.cow
///   ubd map --output json vm.cow
///   ubd map --backing /new/place/base.img vm.cow
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Read this backing file instead of the one the overlay's header names
    /// (for a backing file that has moved; its size and mtime must match).
    #[arg(short, long, value_name = "PATH")]
    backing: Option<PathBuf>,
    #[command(flatten)]
    backing_dir: BackingDir,
    /// Report as text or JSON.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// The overlay or raw image to map.
    file: PathBuf,
}

/// One run of the device, as the JSON shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Run {
    start: u64,
    length: u64,
    /// `overlay`, `backing` or `zero`.
    kind: &'static str,
    depth: u8,
    zero: bool,
    /// The file the run lives in (depth 1 or 2).
    file: Option<String>,
    /// Where in `file` the run starts.
    offset: Option<u64>,
}

/// The files behind the device's depths.
struct Layout {
    /// Depth 1: the overlay or the raw image.
    main: String,
    /// Where the overlay's data area starts (0 for a raw image).
    data_offset: u64,
    /// Depth 2: the backing file, for an overlay.
    backing: Option<String>,
}

impl Layout {
    fn of(path: &Path, backing: Option<&Path>) -> Result<Layout, ubd::image::ImageError> {
        let main = path.to_string_lossy().into_owned();
        Ok(match Image::probe(path)? {
            Image::Raw(_) => Layout {
                main,
                data_offset: 0,
                backing: None,
            },
            Image::Cow(cow) => Layout {
                main,
                data_offset: cow.geometry.data_offset,
                backing: Some(cow.backing_path(backing).to_string_lossy().into_owned()),
            },
        })
    }

    fn run(&self, start: u64, e: &Extent) -> Run {
        let (file, offset) = match e.depth {
            1 => (Some(self.main.clone()), Some(self.data_offset + start)),
            2 => (self.backing.clone(), Some(start)),
            _ => (None, None),
        };
        let kind = match (e.zero, e.depth) {
            (true, _) | (false, 0) => "zero",
            (false, 1) => "overlay",
            (false, _) => "backing",
        };
        Run {
            start,
            length: e.len,
            kind,
            depth: e.depth,
            zero: e.zero || e.depth == 0,
            file,
            offset,
        }
    }
}

/// Writes the runs as they come, as a table or a JSON array.
struct Printer<W: Write> {
    out: W,
    output: Output,
    first: bool,
}

impl<W: Write> Printer<W> {
    fn begin(&mut self) -> io::Result<()> {
        match self.output {
            Output::Json => write!(self.out, "["),
            Output::Human => writeln!(
                self.out,
                "{:<20} {:<20} {:<8} {:<20} File",
                "Start", "Length", "Kind", "Offset"
            ),
        }
    }

    fn run(&mut self, r: &Run) -> io::Result<()> {
        match self.output {
            Output::Json => {
                let sep = if self.first { "" } else { "," };
                let json = serde_json::to_string(r).map_err(io::Error::other)?;
                write!(self.out, "{sep}\n{json}")?;
            }
            Output::Human => {
                let offset = match (r.kind, r.offset) {
                    ("zero", _) | (_, None) => "-".to_string(),
                    (_, Some(o)) => o.to_string(),
                };
                let file = match (r.kind, r.depth, &r.file) {
                    (_, 0, _) => "(past the end of the backing file)".to_string(),
                    ("zero", _, Some(f)) => format!("(hole in {f})"),
                    (_, _, Some(f)) => f.clone(),
                    (_, _, None) => "-".to_string(),
                };
                let length = format!("{} ({})", r.length, format_size(r.length));
                writeln!(
                    self.out,
                    "{:<20} {:<20} {:<8} {:<20} {file}",
                    r.start, length, r.kind, offset
                )?;
            }
        }
        self.first = false;
        Ok(())
    }

    fn end(&mut self) -> io::Result<()> {
        if self.output == Output::Json {
            writeln!(self.out, "{}]", if self.first { "" } else { "\n" })?;
        }
        self.out.flush()
    }
}

/// Walks the device's block status a piece at a time and hands each merged
/// run to `each`.
fn walk(
    dev: &Device,
    layout: &Layout,
    mut each: impl FnMut(&Run) -> io::Result<()>,
) -> Result<(), Box<dyn std::error::Error>> {
    let capacity = dev.capacity();
    let mut pending: Option<Run> = None;
    let mut at = 0u64;
    while at < capacity {
        let len = (capacity - at).min(PIECE);
        let extents = dev.block_status(at, len)?;
        let mut got = 0u64;
        for e in extents.iter().filter(|e| e.len > 0) {
            let e = Extent {
                len: e.len.min(len - got),
                ..*e
            };
            let run = layout.run(at + got, &e);
            got += e.len;
            match &mut pending {
                Some(p) if p.depth == run.depth && p.zero == run.zero && p.kind == run.kind => {
                    p.length += run.length;
                }
                _ => {
                    if let Some(p) = pending.replace(run) {
                        each(&p)?;
                    }
                }
            }
            if got == len {
                break;
            }
        }
        if got == 0 {
            return Err(format!(
                "{}: block status at offset {at} reported nothing",
                layout.main
            )
            .into());
        }
        at += got;
    }
    if let Some(p) = pending {
        each(&p)?;
    }
    Ok(())
}

pub fn run(args: Args) -> Outcome {
    let opts = DeviceOptions {
        read_only: true,
        backing: args.backing.clone(),
        backing_dir: args.backing_dir.dir.clone(),
        // Block status moves no data: a small pool is enough.
        pool_size: 1 << 20,
        ..Default::default()
    };
    let dev = Device::open(&args.file, &opts)?;
    let layout = Layout::of(&args.file, args.backing.as_deref())?;
    let mut printer = Printer {
        out: BufWriter::new(io::stdout().lock()),
        output: args.output,
        first: true,
    };
    let printed = printer
        .begin()
        .map_err(Into::into)
        .and_then(|()| walk(&dev, &layout, |r| printer.run(r)))
        .and_then(|()| printer.end().map_err(Into::into));
    dev.close()?;
    match printed {
        Ok(()) => Ok(0),
        // `ubd map | head`: the reader has seen enough.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(0)
        }
        Err(e) => Err(e),
    }
}
