//! BLOCK_STATUS: where a request's range reads from, from the RAM bitmap and
//! the files' holes (SEEK_DATA / SEEK_HOLE).
//!
//! It answers at once on the worker thread and only reads: no op, no lock,
//! nothing changed. It reads the same RAM bitmap that routes READs (a bit
//! there only after its sector's data write completed: invariant 7), so it
//! reports where a READ of the range would go.
//!
//! An answer holds at most [`MAX_EXTENTS`] extents, from the range's start:
//! a fragmented range (a bitmap of alternate sectors, a file full of holes)
//! would otherwise cost memory and worker time in proportion to its length,
//! which a client chooses, while every other request waits. The caller asks
//! again from where the answer ends.

use std::fs::File;
use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use super::worker::{FILE_MAIN, SECTOR, Worker, log_slot};
use super::{Extent, Reply};

/// The most extents one answer holds (some 1 MiB of them, and at most two
/// `lseek` calls each).
pub(super) const MAX_EXTENTS: usize = 1 << 16;

impl Worker {
    /// Where the request's range reads from, from the bitmap and the files'
    /// holes (SEEK_DATA / SEEK_HOLE).
    pub(super) fn block_status(&self, slot: u32) -> Result<Reply, Errno> {
        let Some(r) = self.reqs[slot as usize].as_ref() else {
            return Err(Errno::EINVAL);
        };
        let (start, end) = (r.offset, (r.offset + r.len).min(self.capacity));
        let mut out: Vec<Extent> = Vec::new();
        // Adds an extent; false once the answer is full (it was not added).
        let mut add = |len: u64, depth: u8, zero: bool| {
            if len == 0 {
                return true;
            }
            let full = out.len() == MAX_EXTENTS;
            match out.last_mut() {
                Some(e) if e.depth == depth && e.zero == zero => e.len += len,
                _ if full => return false,
                _ => out.push(Extent { len, depth, zero }),
            }
            true
        };
        let Some(cow) = &self.cow else {
            holes(&self.main, start, end, self.main_len, |len, data| {
                add(len, 1, !data)
            })?;
            return Ok(Reply::Extents(out));
        };
        // The overlay's length now (a write may have extended it), read
        // once a request: a present sector past it is damage, not a hole.
        let mut overlay_len = None;
        let mut at = start;
        while at < end {
            let s = at / SECTOR;
            let present = cow.ram.get(s);
            let next_sector = cow.ram.next_change(s + 1, end.div_ceil(SECTOR), present);
            let run_end = (next_sector * SECTOR).min(end);
            if present {
                let base = cow.data_offset;
                let len = match overlay_len {
                    Some(len) => len,
                    None => *overlay_len.insert(nix::sys::stat::fstat(&*self.main)?.st_size as u64),
                };
                if (base + run_end).min(cow.data_end()) > len {
                    if let Some(quiet) = self.truncated_log[log_slot(FILE_MAIN)].allow() {
                        tracing::error!(
                            "{}: bytes {}..{} are marked written but the file ends at {} \
                             (truncated?){}",
                            self.main_path().display(),
                            base + at,
                            base + run_end,
                            len,
                            super::log_every::LogEvery::more(quiet)
                        );
                    }
                    return Err(Errno::EIO);
                }
                if !holes(
                    &self.main,
                    base + at,
                    base + run_end,
                    u64::MAX,
                    |len, data| add(len, 1, !data),
                )? {
                    break;
                }
            } else {
                let in_backing = run_end.min(cow.backing_len.max(at));
                if !holes(
                    &cow.backing,
                    at,
                    in_backing,
                    cow.backing_len,
                    |len, data| add(len, 2, !data),
                )? || !add(run_end - in_backing, 0, true)
                {
                    break;
                }
            }
            at = run_end;
        }
        Ok(Reply::Extents(out))
    }
}

/// Calls `each(len, is_data)` for the data and hole runs of `file` over
/// `start..end`, in order; bytes at or past `file_len` count as a hole.
/// Stops, returning false, when `each` does.
fn holes(
    file: &File,
    start: u64,
    end: u64,
    file_len: u64,
    mut each: impl FnMut(u64, bool) -> bool,
) -> Result<bool, Errno> {
    let mut at = start;
    let limit = end.min(file_len);
    while at < limit {
        let pos = i64::try_from(at).map_err(|_| Errno::EINVAL)?;
        let data = match lseek(file.as_fd(), pos, Whence::SeekData) {
            Ok(d) => (d as u64).min(limit),
            Err(Errno::ENXIO) => limit,
            Err(e) => return Err(e),
        };
        if data > at {
            if !each(data - at, false) {
                return Ok(false);
            }
            at = data;
            continue;
        }
        let hole = match lseek(file.as_fd(), pos, Whence::SeekHole) {
            Ok(h) => (h as u64).min(limit),
            Err(Errno::ENXIO) => limit,
            Err(e) => return Err(e),
        };
        let hole = hole.max(at + 1).min(limit);
        if !each(hole - at, true) {
            return Ok(false);
        }
        at = hole;
    }
    Ok(end <= at || each(end - at, false))
}
