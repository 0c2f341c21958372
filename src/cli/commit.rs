//! `ubd commit`: merge an overlay into its backing file in place, like
//! `uml_moo -d`.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use ubd::engine::aligned::AlignedBuf;
use ubd::engine::ring::{BufRef, Op, OpKind, Ring};
use ubd::image::{self, BackingState, CowImage, Image, LockKind};
use ubd_cow::Bitmap;

use super::progress::{Progress, catch_interrupts, interrupted};
use super::units::format_size;
use super::{BackingDir, Outcome, Output};

/// Bytes per copy op, and copies in flight.
const PIECE: u64 = 4 << 20;
const IN_FLIGHT: usize = 8;

/// Merge an overlay into its backing file, in place.
///
/// Writes every sector the overlay holds into the backing file (only those
/// sectors, in large runs), syncs it, and only then reports success. This
/// changes the backing file: every other overlay made over it becomes
/// invalid (UML and ubd refuse them, since the file's mtime changes). The
/// overlay itself is then stale too: --discard-overlay deletes it, --reset
/// turns it into an empty overlay over the new backing file.
///
/// If the commit is interrupted (Ctrl-C, a crash), run it again: it finishes
/// the same way. A file `COW.commit` marks a commit in progress.
///
/// Examples:
///   ubd commit vm.cow
///   ubd commit --reset vm.cow
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Merge into this file instead of the backing file the header names.
    #[arg(short, long, value_name = "PATH")]
    backing: Option<PathBuf>,
    #[command(flatten)]
    backing_dir: BackingDir,
    /// Delete the overlay after the commit.
    #[arg(long, conflicts_with = "reset")]
    discard_overlay: bool,
    /// Make the overlay an empty overlay over the new backing file.
    #[arg(long)]
    reset: bool,
    /// Report as text or JSON.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// The overlay to merge.
    file: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    filename: String,
    backing_file: String,
    sectors_committed: u64,
    bytes_committed: u64,
    overlay: &'static str,
}

fn marker_path(cow: &Path) -> PathBuf {
    let mut name = cow.as_os_str().to_owned();
    name.push(".commit");
    PathBuf::from(name)
}

fn marker_text(backing: &Path, size: u64) -> String {
    format!(
        "ubd commit in progress\nbacking: {}\nsize: {size}\n",
        backing.display()
    )
}

fn open_locked(path: &Path, kind: LockKind) -> Result<File, Box<dyn std::error::Error>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
    image::lock(&file, path, kind, Duration::from_secs(2))?;
    Ok(file)
}

/// Copies the present runs of `cow` into `backing`; returns sectors copied.
fn copy_runs(
    cow: &CowImage,
    cow_file: Arc<File>,
    backing: Arc<File>,
    bitmap: &[u8],
) -> Result<u64, Box<dyn std::error::Error>> {
    let g = &cow.geometry;
    let size = cow.header.size;
    let bits = Bitmap::new(bitmap, g.mapped_sectors());
    let total = bits.count_present();
    let progress = Progress::new(total * 512, "commit");
    let mut ring: Ring<AlignedBuf> = Ring::new(64, IN_FLIGHT, vec![cow_file, backing], 0, None)?;
    for slot in 0..IN_FLIGHT as u32 {
        let buf = AlignedBuf::new(PIECE as usize, 4096).ok_or("out of memory")?;
        let _ = ring.attach(slot, buf);
    }
    let piece_sectors = PIECE / 512;
    let mut runs = bits.runs(0..g.sectors).filter(|r| r.present);
    let mut current: Option<(u64, u64)> = None;
    let mut idle: Vec<u32> = (0..IN_FLIGHT as u32).collect();
    let mut first_error: Option<String> = None;
    loop {
        // Start reads while buffers are free and runs remain.
        while first_error.is_none() && !interrupted() {
            let Some(&slot) = idle.last() else { break };
            let (start, end) = match current.take() {
                Some(r) => r,
                None => match runs.next() {
                    Some(r) => (r.start, r.end()),
                    None => break,
                },
            };
            let n = (end - start).min(piece_sectors);
            if start + n < end {
                current = Some((start + n, end));
            }
            idle.pop();
            let _ = ring.push(Op {
                kind: OpKind::Read,
                file: 0,
                offset: g.data_offset + start * 512,
                len: n * 512,
                buf: Some(BufRef {
                    slot,
                    segment: 0,
                    offset: 0,
                }),
                tag: start << 1,
            });
        }
        if ring.in_flight() == 0 {
            break;
        }
        let mut done = Vec::new();
        ring.run(true, &mut |c| done.push(c))?;
        for c in done {
            let slot = c.op.buf.map_or(0, |b| b.slot);
            let start = c.tag >> 1;
            let is_write = c.tag & 1 == 1;
            match c.result {
                Err(errno) => {
                    let what = if is_write { "write to" } else { "read from" };
                    first_error.get_or_insert(format!(
                        "{what} {} at sector {start}: {}",
                        if is_write {
                            "the backing file"
                        } else {
                            "the overlay"
                        },
                        nix::errno::Errno::from_raw(errno)
                    ));
                    idle.push(slot);
                }
                Ok(got) if !is_write && got < c.op.len => {
                    first_error.get_or_insert(format!(
                        "{}: the overlay ends inside the data of sector {start}",
                        cow.path.display()
                    ));
                    idle.push(slot);
                }
                Ok(_) if !is_write => {
                    // Never past the backing file's end: its last sector may
                    // be partial.
                    let len = c.op.len.min(size - start * 512);
                    let _ = ring.push(Op {
                        kind: OpKind::Write,
                        file: 1,
                        offset: start * 512,
                        len,
                        buf: c.op.buf,
                        tag: (start << 1) | 1,
                    });
                }
                Ok(_) => {
                    progress.inc(c.op.len.next_multiple_of(512));
                    idle.push(slot);
                }
            }
        }
    }
    progress.finish();
    if let Some(e) = first_error {
        return Err(e.into());
    }
    if interrupted() {
        return Err(
            "interrupted: the backing file is partly merged; run `ubd commit` again to finish"
                .into(),
        );
    }
    Ok(total)
}

pub fn run(args: Args) -> Outcome {
    catch_interrupts();
    let cow = match Image::probe(&args.file)? {
        Image::Cow(c) => c,
        Image::Raw(_) => {
            return Err(format!(
                "{}: not a UML COW overlay: nothing to commit",
                args.file.display()
            )
            .into());
        }
    };
    cow.check_len()?;
    let named = cow.backing_path(args.backing.as_deref());
    let backing = image::resolve(named)?;
    let dir = args.backing_dir.get();
    let examined = cow.backing(args.backing.as_deref(), dir)?;
    let marker = marker_path(&args.file);
    let resuming = fs::read_to_string(&marker)
        .is_ok_and(|text| text == marker_text(&backing, cow.header.size));
    // The overlay exclusively (no server or UML may have it), the backing
    // file exclusively (nothing may read it while it changes).
    let cow_file = Arc::new(open_locked(&args.file, LockKind::Exclusive)?);
    let state = examined.state;
    let resumable = matches!(state, BackingState::MtimeDiffers { .. }) && resuming;
    if let Some(problem) = state.problem(&cow.header, &backing)
        && !resumable
    {
        return Err(format!("{}: {problem}; refusing to commit", args.file.display()).into());
    }
    let Some(resolved) = examined.resolved else {
        return Err(format!(
            "{}: backing file {} cannot be resolved; refusing to commit",
            args.file.display(),
            named.display()
        )
        .into());
    };
    let backing_file = image::open_vetted(&args.file, named, &resolved, dir, true, false)?;
    image::lock(
        &backing_file,
        &resolved,
        LockKind::Exclusive,
        Duration::from_secs(2),
    )?;
    let backing_file = Arc::new(backing_file);
    let mut bitmap = image::bitmap_buffer(&args.file, cow.geometry.bitmap_len)?;
    let got = image::read_full_at(&cow_file, &mut bitmap, cow.geometry.bitmap_offset)
        .map_err(|e| format!("{}: cannot read the bitmap: {e}", args.file.display()))?;
    if got < bitmap.len() {
        return Err(format!("{}: the bitmap is cut short", args.file.display()).into());
    }
    fs::write(&marker, marker_text(&backing, cow.header.size))
        .map_err(|e| format!("{}: cannot write: {e}", marker.display()))?;
    let sectors = copy_runs(&cow, cow_file.clone(), backing_file.clone(), &bitmap)?;
    // Every other overlay over this file must now be refused. UML compares
    // whole seconds: if the commit fell within the recorded second, move the
    // mtime on by one.
    let recorded = std::time::UNIX_EPOCH + Duration::from_secs(u64::from(cow.header.mtime));
    if sectors > 0 && image::stamp(&backing).is_ok_and(|s| s.mtime == i64::from(cow.header.mtime)) {
        backing_file
            .set_modified(recorded + Duration::from_secs(1))
            .map_err(|e| format!("{}: cannot set its mtime: {e}", backing.display()))?;
    }
    backing_file
        .sync_all()
        .map_err(|e| format!("{}: cannot sync: {e}", backing.display()))?;
    drop((cow_file, backing_file));
    let _ = fs::remove_file(&marker);
    let overlay = if args.discard_overlay {
        fs::remove_file(&args.file)
            .map_err(|e| format!("{}: cannot delete: {e}", args.file.display()))?;
        "deleted"
    } else if args.reset {
        image::create_overlay(&args.file, &backing, true)?;
        "reset"
    } else if image::resolve(&cow.header.backing_file).is_ok_and(|b| b == backing) {
        "stale"
    } else {
        // Committed into another file (--backing): the overlay's own backing
        // file is untouched, and the pair still works.
        "unchanged"
    };
    let report = Report {
        filename: args.file.to_string_lossy().into_owned(),
        backing_file: backing.to_string_lossy().into_owned(),
        sectors_committed: sectors,
        bytes_committed: sectors * 512,
        overlay,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => {
            println!(
                "Committed {} ({} sectors) of {} into {}",
                format_size(report.bytes_committed),
                sectors,
                report.filename,
                report.backing_file
            );
            match overlay {
                "deleted" => println!("Deleted {}", report.filename),
                "reset" => println!(
                    "{} is now an empty overlay over the new backing file",
                    report.filename
                ),
                "unchanged" => println!(
                    "{} and the backing file it names are unchanged",
                    report.filename
                ),
                _ => println!(
                    "{} is now stale: the backing file's mtime changed, so UML and ubd refuse the pair. \
                     Its contents equal the backing file's; delete it, or make a fresh overlay \
                     with `ubd create --force --backing {} {}`",
                    report.filename, report.backing_file, report.filename
                ),
            }
        }
    }
    Ok(0)
}
