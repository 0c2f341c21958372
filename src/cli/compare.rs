//! `ubd compare`: do two images (overlays or raw) hold the same bytes? In the
//! spirit of `qemu-img compare`.

use std::error::Error;
use std::path::{Path, PathBuf};

use serde::Serialize;
use ubd::device::{Device, DeviceOptions};

use super::progress::{Progress, catch_interrupts, interrupted};
use super::units::format_size;
use super::{BackingDir, Outcome, Output};

/// Exit code: the images read the same.
const IDENTICAL: u8 = 0;
/// Exit code: they differ.
const MISMATCH: u8 = 1;
/// Exit code: the comparison could not be made.
const ERROR: u8 = 2;
/// Exit code: stopped by Ctrl-C (or SIGTERM), as a shell reports SIGINT.
const INTERRUPTED: u8 = 130;

/// Bytes read from each image at a time.
const PIECE: u64 = 4 << 20;
/// Block status is asked for this much of an image at a time.
const STATUS_WINDOW: u64 = 1 << 30;

/// Compare two images by content.
///
/// Reads both images as a guest would see them (an overlay through its backing
/// file, a raw image as it is) and reports the first byte where they differ.
/// Ranges both images know to read as zeros (holes, unwritten space past a
/// backing file's end) are skipped without reading. Where they live on disk
/// does not matter: an overlay and the image `uml_moo` merges from it compare
/// identical.
///
/// Images of different sizes compare like qemu-img compare: the common part
/// must match and the longer image's extra part must read as zeros; a warning
/// says the sizes differ.
///
/// Exit status: 0 identical; 1 they differ ("Content mismatch at offset N!",
/// N the first differing byte); 2 the comparison could not be made (a file
/// cannot be opened or read, an overlay is in use, or the command line is
/// wrong); 130 interrupted.
///
/// Both images are opened read-only; an overlay that UML or a `ubd` server has
/// open is refused as in use. A progress bar shows on a terminal; Ctrl-C
/// stops the comparison after the piece being read (exit 130, no verdict).
///
/// Examples:
///   ubd compare vm.cow merged.img
///   ubd compare --output json a.img b.img
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Report as text or JSON.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    backing_dir: BackingDir,
    /// The first overlay or raw image.
    a: PathBuf,
    /// The second overlay or raw image.
    b: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    a: String,
    b: String,
    /// `identical`, `mismatch`, `error` or `interrupted`.
    result: &'static str,
    exit_code: u8,
    size_a: Option<u64>,
    size_b: Option<u64>,
    /// The first differing byte.
    mismatch_offset: Option<u64>,
    message: String,
}

/// How a comparison ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Identical,
    /// The first byte that differs.
    Mismatch(u64),
    /// Stopped by Ctrl-C before this offset.
    Interrupted(u64),
}

type Failure = Box<dyn Error>;

/// An image's block status, fetched a window at a time, asked one offset at
/// a time in increasing order.
struct Status<'a> {
    dev: &'a Device,
    /// The window's start and its runs: (end offset, reads as zeros).
    start: u64,
    runs: Vec<(u64, bool)>,
}

impl<'a> Status<'a> {
    fn new(dev: &'a Device) -> Status<'a> {
        Status {
            dev,
            start: 0,
            runs: Vec::new(),
        }
    }

    /// Whether `at` is in a run known to read as zeros, and where that run
    /// (or the run of data) ends.
    fn at(&mut self, at: u64) -> Result<(u64, bool), Failure> {
        let within = at >= self.start && self.runs.last().is_some_and(|&(end, _)| at < end);
        if !within {
            let len = (self.dev.capacity() - at).min(STATUS_WINDOW);
            self.start = at;
            self.runs.clear();
            let mut end = at;
            for e in self.dev.block_status(at, len)? {
                if e.len == 0 {
                    continue;
                }
                end = (end + e.len).min(at + len);
                let zero = e.zero || e.depth == 0;
                match self.runs.last_mut() {
                    Some(last) if last.1 == zero => last.0 = end,
                    _ => self.runs.push((end, zero)),
                }
                if end == at + len {
                    break;
                }
            }
            if end == at {
                return Err(format!("block status at offset {at} reported nothing").into());
            }
        }
        let i = self.runs.partition_point(|&(end, _)| end <= at);
        Ok(self.runs[i])
    }
}

/// The index of the first non-zero byte of `buf`.
fn first_nonzero(buf: &[u8]) -> Option<usize> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut done = 0;
    for block in buf.chunks(ZEROS.len()) {
        if block != &ZEROS[..block.len()] {
            return block.iter().position(|&b| b != 0).map(|i| done + i);
        }
        done += block.len();
    }
    None
}

/// The index of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let mut done = 0;
    for (x, y) in a.chunks(4096).zip(b.chunks(4096)) {
        if x != y {
            return x.iter().zip(y).position(|(p, q)| p != q).map(|i| done + i);
        }
        done += x.len();
    }
    None
}

fn read(dev: &Device, path: &Path, at: u64, buf: &mut [u8]) -> Result<(), Failure> {
    dev.read_at(at, buf)
        .map_err(|e| format!("{}: {}", path.display(), ubd::error_chain(&e)).into())
}

/// Compares `a` and `b` over `0..min(capacities)`, then checks that the
/// longer one's tail reads as zeros.
fn compare(
    (a, a_path): (&Device, &Path),
    (b, b_path): (&Device, &Path),
    progress: &Progress,
) -> Result<Verdict, Failure> {
    let common = a.capacity().min(b.capacity());
    let (mut sa, mut sb) = (Status::new(a), Status::new(b));
    let mut buf_a = vec![0u8; PIECE as usize];
    let mut buf_b = vec![0u8; PIECE as usize];
    let mut at = 0u64;
    while at < common {
        if interrupted() {
            return Ok(Verdict::Interrupted(at));
        }
        let (end_a, zero_a) = sa.at(at)?;
        let (end_b, zero_b) = sb.at(at)?;
        let end = end_a.min(end_b).min(common);
        if zero_a && zero_b {
            progress.inc(end - at);
            at = end;
            continue;
        }
        let n = (end - at).min(PIECE) as usize;
        let (pa, pb) = (&mut buf_a[..n], &mut buf_b[..n]);
        let found = if zero_a {
            read(b, b_path, at, pb)?;
            first_nonzero(pb)
        } else if zero_b {
            read(a, a_path, at, pa)?;
            first_nonzero(pa)
        } else {
            // Read both images at once: they are usually on different files.
            let (ra, rb) = std::thread::scope(|s| {
                let ra = s.spawn(|| read(a, a_path, at, pa).map_err(|e| e.to_string()));
                let rb = read(b, b_path, at, pb).map_err(|e| e.to_string());
                (
                    ra.join().unwrap_or_else(|_| Err("reader failed".into())),
                    rb,
                )
            });
            ra?;
            rb?;
            first_difference(pa, pb)
        };
        if let Some(i) = found {
            return Ok(Verdict::Mismatch(at + i as u64));
        }
        progress.inc(n as u64);
        at += n as u64;
    }
    // The longer image's tail must read as zeros.
    let (long, long_path) = if a.capacity() > b.capacity() {
        (a, a_path)
    } else {
        (b, b_path)
    };
    let mut status = Status::new(long);
    while at < long.capacity() {
        if interrupted() {
            return Ok(Verdict::Interrupted(at));
        }
        let (end, zero) = status.at(at)?;
        if zero {
            progress.inc(end - at);
            at = end;
            continue;
        }
        let n = (end - at).min(PIECE) as usize;
        let buf = &mut buf_a[..n];
        read(long, long_path, at, buf)?;
        if let Some(i) = first_nonzero(buf) {
            return Ok(Verdict::Mismatch(at + i as u64));
        }
        progress.inc(n as u64);
        at += n as u64;
    }
    Ok(Verdict::Identical)
}

fn open(path: &Path, backing_dir: &BackingDir) -> Result<Device, Failure> {
    let opts = DeviceOptions {
        read_only: true,
        backing_dir: backing_dir.dir.clone(),
        // Enough for one PIECE-sized read in one request.
        pool_size: 16 << 20,
        cache: ubd::image::Cache::Writeback,
        ..Default::default()
    };
    Ok(Device::open(path, &opts)?)
}

/// Opens both images and compares them: the verdict and the two sizes.
fn examine(args: &Args) -> (Result<Verdict, Failure>, Option<u64>, Option<u64>) {
    let a = match open(&args.a, &args.backing_dir) {
        Ok(dev) => dev,
        Err(e) => return (Err(e), None, None),
    };
    let b = match open(&args.b, &args.backing_dir) {
        Ok(dev) => dev,
        Err(e) => return (Err(e), Some(a.capacity()), None),
    };
    let (size_a, size_b) = (a.capacity(), b.capacity());
    let progress = Progress::new(size_a.max(size_b), "Comparing");
    let verdict = compare((&a, &args.a), (&b, &args.b), &progress);
    progress.finish();
    // Read-only: closing flushes nothing, but report what it says.
    let closed = a.close().and(b.close());
    let verdict = match (verdict, closed) {
        (Ok(Verdict::Identical), Err(e)) => Err(e.into()),
        (v, _) => v,
    };
    (verdict, Some(size_a), Some(size_b))
}

pub fn run(args: Args) -> Outcome {
    catch_interrupts();
    let (verdict, size_a, size_b) = examine(&args);
    let mut lines = Vec::new();
    if let (Some(sa), Some(sb)) = (size_a, size_b)
        && sa != sb
        && !matches!(verdict, Err(_) | Ok(Verdict::Interrupted(_)))
    {
        lines.push(format!(
            "Warning: Image size mismatch! {} is {} ({sa} bytes), {} is {} ({sb} bytes); \
             the longer one's extra part must read as zeros",
            args.a.display(),
            format_size(sa),
            args.b.display(),
            format_size(sb),
        ));
    }
    let (result, code, offset) = match &verdict {
        Ok(Verdict::Identical) => {
            lines.push("Images are identical.".to_string());
            ("identical", IDENTICAL, None)
        }
        Ok(Verdict::Mismatch(at)) => {
            lines.push(format!("Content mismatch at offset {at}!"));
            ("mismatch", MISMATCH, Some(*at))
        }
        Ok(Verdict::Interrupted(at)) => {
            lines.push(format!(
                "Interrupted at offset {at}: no difference before it; the rest was not compared."
            ));
            ("interrupted", INTERRUPTED, None)
        }
        Err(e) => {
            lines.push(ubd::error_chain(e.as_ref()));
            ("error", ERROR, None)
        }
    };
    match args.output {
        Output::Json => {
            let report = Report {
                a: args.a.to_string_lossy().into_owned(),
                b: args.b.to_string_lossy().into_owned(),
                result,
                exit_code: code,
                size_a,
                size_b,
                mismatch_offset: offset,
                message: lines.join("\n"),
            };
            let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string());
            match json {
                Ok(json) => println!("{json}"),
                Err(e) => {
                    eprintln!("ubd: {e}");
                    return Ok(ERROR);
                }
            }
            if code == ERROR || code == INTERRUPTED {
                eprintln!("ubd: {}", lines.join("\n"));
            }
        }
        Output::Human => {
            for line in &lines {
                if code == ERROR || code == INTERRUPTED {
                    eprintln!("ubd: {line}");
                } else {
                    println!("{line}");
                }
            }
        }
    }
    Ok(code)
}
