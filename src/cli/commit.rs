//! `ubd commit`: merge an overlay into its backing file in place, like
//! `uml_moo -d`.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
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
/// If the commit is interrupted (Ctrl-C, an error, a crash), run it again:
/// it finishes the same way. A file `COW.commit` marks a commit in progress;
/// after Ctrl-C or an error it records the mtime the backing file was left
/// with, and the commit goes on only if the file still has it.
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

/// A marker's text: the commit's backing file and size, and the mtime it
/// left the backing file with, if it knows it.
fn marker_text(backing: &Path, size: u64, left: Option<i64>) -> String {
    let mut text = format!(
        "ubd commit in progress\nbacking: {}\nsize: {size}\n",
        backing.display()
    );
    if let Some(mtime) = left {
        text.push_str(&format!("left mtime: {mtime}\n"));
    }
    text
}

/// The text of the marker at `marker`, if it is a regular file: opened
/// without blocking, so a FIFO put there cannot hang the commit.
fn marker_contents(marker: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(marker)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Some(text)
}

/// What the marker of a commit into `backing` of `size` bytes says: `None`
/// if there is none for it; `Some(None)` if the commit stopped without
/// saying where (a crash); `Some(Some(mtime))` if it stopped on an interrupt
/// or an error and left the backing file with that mtime.
fn read_marker(marker: &Path, backing: &Path, size: u64) -> Option<Option<i64>> {
    let text = marker_contents(marker)?;
    let rest = text.strip_prefix(&marker_text(backing, size, None))?;
    if rest.is_empty() {
        return Some(None);
    }
    let mtime = rest.strip_prefix("left mtime: ")?.strip_suffix('\n')?;
    Some(Some(mtime.parse().ok()?))
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

/// How a copy ended.
struct Copy {
    /// Sectors present in the overlay (all copied if `stopped` is `None`).
    sectors: u64,
    /// Whether any write reached the backing file.
    wrote: bool,
    /// Why it stopped early: an error, or an interrupt.
    stopped: Option<String>,
}

/// Copies the present runs of `cow` into `backing`.
fn copy_runs(cow: &CowImage, cow_file: Arc<File>, backing: Arc<File>, bitmap: &[u8]) -> Copy {
    let g = &cow.geometry;
    let size = cow.header.size;
    let bits = Bitmap::new(bitmap, g.mapped_sectors());
    let total = bits.count_present();
    let failed = |why: String| Copy {
        sectors: total,
        wrote: false,
        stopped: Some(why),
    };
    let mut ring: Ring<AlignedBuf> =
        match Ring::new(64, IN_FLIGHT, vec![cow_file, backing], 0, None) {
            Ok(ring) => ring,
            Err(e) => {
                return failed(format!(
                    "{}: cannot set up io_uring: {e}",
                    cow.path.display()
                ));
            }
        };
    for slot in 0..IN_FLIGHT as u32 {
        let Some(buf) = AlignedBuf::new(PIECE as usize, 4096) else {
            return failed("out of memory for copy buffers".to_string());
        };
        let _ = ring.attach(slot, buf);
    }
    let progress = Progress::new(total * 512, "commit");
    let piece_sectors = PIECE / 512;
    let mut runs = bits.runs(0..g.sectors).filter(|r| r.present);
    let mut current: Option<(u64, u64)> = None;
    let mut idle: Vec<u32> = (0..IN_FLIGHT as u32).collect();
    let mut first_error: Option<String> = None;
    let mut wrote = false;
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
        if let Err(e) = ring.run(true, &mut |c| done.push(c)) {
            // Nothing more completes: what was written stays written.
            first_error.get_or_insert(format!("io_uring: {e}"));
            break;
        }
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
                // The file may end with the backing file's data, inside
                // the last sector.
                Ok(got) if !is_write && got < c.op.len.min(size - start * 512) => {
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
                    wrote = true;
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
    let stopped = first_error.or_else(|| interrupted().then(|| "interrupted".to_string()));
    Copy {
        sectors: total,
        wrote,
        stopped,
    }
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
    let resuming = read_marker(&marker, &backing, cow.header.size);
    // A commit that stopped part way left the backing file with a new
    // mtime: it is finished by running it again. If the marker knows that
    // mtime, the file must still have it (no other change since).
    let refuse = |state: &BackingState| -> Result<(), Box<dyn std::error::Error>> {
        let resumable = match (state, resuming) {
            (BackingState::MtimeDiffers { on_disk }, Some(left)) => {
                left.is_none_or(|left| left == *on_disk)
            }
            _ => false,
        };
        match state.problem(&cow.header, &backing) {
            Some(problem) if !resumable => {
                let since = if resuming.is_some() {
                    " since the interrupted commit"
                } else {
                    ""
                };
                Err(format!(
                    "{}: {problem}{since}; refusing to commit",
                    args.file.display()
                )
                .into())
            }
            _ => Ok(()),
        }
    };
    // The overlay exclusively (no server or UML may have it), the backing
    // file exclusively (nothing may read it while it changes).
    let cow_file = Arc::new(open_locked(&args.file, LockKind::Exclusive)?);
    refuse(&examined.state)?;
    let Some(resolved) = examined.resolved else {
        return Err(format!(
            "{}: backing file {} cannot be resolved; refusing to commit",
            args.file.display(),
            named.display()
        )
        .into());
    };
    let backing_file = image::open_vetted(&args.file, named, &resolved, dir, true, false)?;
    image::warn_if_container(&backing_file, &resolved, Some(&args.file));
    image::lock(
        &backing_file,
        &resolved,
        LockKind::Exclusive,
        Duration::from_secs(2),
    )?;
    // Checked again under the lock: another commit into the same file may
    // have finished while this one waited for it.
    let meta = backing_file
        .metadata()
        .map_err(|e| format!("{}: cannot stat: {e}", resolved.display()))?;
    refuse(&BackingState::compare(
        &cow.header,
        image::Stamp {
            size: meta.len(),
            mtime: meta.mtime(),
        },
    ))?;
    let backing_file = Arc::new(backing_file);
    let mut bitmap = image::bitmap_buffer(&args.file, cow.geometry.bitmap_len)?;
    let got = image::read_full_at(&cow_file, &mut bitmap, cow.geometry.bitmap_offset)
        .map_err(|e| format!("{}: cannot read the bitmap: {e}", args.file.display()))?;
    if got < bitmap.len() {
        return Err(format!("{}: the bitmap is cut short", args.file.display()).into());
    }
    // A truncated overlay would stop the copy part way, with the backing
    // file half merged for good: it must hold the data of every sector it
    // claims (the last one may end with the backing file).
    let g = &cow.geometry;
    let last = Bitmap::new(&bitmap[..], g.mapped_sectors())
        .runs(0..g.sectors)
        .filter(|r| r.present)
        .last();
    let len = cow_file
        .metadata()
        .map_err(|e| format!("{}: cannot stat: {e}", args.file.display()))?
        .len();
    if let Some(run) = last {
        let needed = g.data_offset + (run.end() * 512).min(cow.header.size);
        if len < needed {
            return Err(format!(
                "{}: the file is {} bytes, but the data of sector {} it holds ends at byte {needed} \
                 (truncated?); refusing to commit: the backing file is unchanged",
                args.file.display(),
                len,
                run.end() - 1
            )
            .into());
        }
    }
    // A marker is the only record of a backing file half merged: one for
    // another commit is not overwritten.
    if resuming.is_none() && fs::symlink_metadata(&marker).is_ok() {
        let text = marker_contents(&marker).unwrap_or_default();
        let other = text
            .lines()
            .find_map(|l| l.strip_prefix("backing: "))
            .unwrap_or("(unreadable)");
        return Err(format!(
            "{}: an interrupted commit into {other} is marked there; finish it \
             (ubd commit --backing {other} ...) or, if that file is gone, remove the marker",
            marker.display()
        )
        .into());
    }
    // Records the mtime the backing file is left with (a re-run finishes
    // the commit only if nothing else changed it since).
    let left_mtime = |backing_file: &File| {
        let _ = backing_file.sync_all();
        if let Ok(meta) = backing_file.metadata() {
            let text = marker_text(&backing, cow.header.size, Some(meta.mtime()));
            let _ = fs::write(&marker, text);
        }
    };
    // The mtime a resumed commit was left with stays recorded until the
    // copy starts writing.
    let text = marker_text(&backing, cow.header.size, resuming.flatten());
    fs::write(&marker, text).map_err(|e| format!("{}: cannot write: {e}", marker.display()))?;
    let copy = copy_runs(&cow, cow_file.clone(), backing_file.clone(), &bitmap);
    if let Some(why) = copy.stopped {
        if !copy.wrote && resuming.is_none() {
            let _ = fs::remove_file(&marker);
            return Err(
                format!("{why}: nothing was written; the backing file is unchanged").into(),
            );
        }
        left_mtime(&backing_file);
        return Err(format!(
            "{why}: the backing file is partly merged; run `ubd commit` again to finish"
        )
        .into());
    }
    let sectors = copy.sectors;
    // Every other overlay over this file must now be refused. UML compares
    // whole seconds: if the commit fell within the recorded second, move the
    // mtime on by one.
    let recorded = std::time::UNIX_EPOCH + Duration::from_secs(u64::from(cow.header.mtime));
    let finish = || -> Result<(), String> {
        if sectors > 0
            && image::stamp(&backing).is_ok_and(|s| s.mtime == i64::from(cow.header.mtime))
        {
            backing_file
                .set_modified(recorded + Duration::from_secs(1))
                .map_err(|e| format!("{}: cannot set its mtime: {e}", backing.display()))?;
        }
        backing_file
            .sync_all()
            .map_err(|e| format!("{}: cannot sync: {e}", backing.display()))
    };
    if let Err(e) = finish() {
        left_mtime(&backing_file);
        return Err(format!("{e}; run `ubd commit` again to finish").into());
    }
    drop((cow_file, backing_file));
    let _ = fs::remove_file(&marker);
    let overlay = if args.discard_overlay {
        fs::remove_file(&args.file)
            .map_err(|e| format!("{}: cannot delete: {e}", args.file.display()))?;
        "deleted"
    } else if args.reset {
        image::create_overlay(&args.file, &backing, true)?;
        "reset"
    } else if sectors > 0 && image::same_file(&cow.header.backing_file, &backing) {
        "stale"
    } else {
        // Nothing to write (the backing file keeps its mtime), or committed
        // into another file (--backing): the overlay's own backing file is
        // untouched, and the pair still works.
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
