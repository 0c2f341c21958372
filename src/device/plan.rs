//! Planning: turns a request into ring ops, and merges partial sectors.
//!
//! READ plans one op per run of present or absent sectors (split at
//! chunk boundaries) and zero-fills what lies past the backing file. WRITE
//! takes a range lock over its sectors (invariant 2), reads the old contents
//! of a partial first or last sector into a scratch buffer and merges them,
//! writes, and only when every write has completed sets the RAM bitmap's bits
//! and lets the lock go (`data_done`, in `request.rs`). TRIM punches holes in
//! present sectors; WRITE_ZEROES punches (or, with NO_HOLE, zero-allocates)
//! whole sectors and merges zeros into partial ones, then sets the bits. CACHE
//! asks the host to prefetch the range from whichever file holds it.

use std::ops::{Range, RangeInclusive};

use super::Command;
use super::request::Stage;
use super::worker::{
    Cow, FILE_BACKING, FILE_MAIN, FILL_MAX_WRITE, P_COPY, P_DATA, P_FILL, P_MERGE, P_PREALLOC,
    PREALLOC, SECTOR, Worker, tag,
};
use crate::engine::bufset::DevBuf;
use crate::engine::ring::{BufRef, Completion, Op, OpKind};

/// Whether the backing file has data (not only holes) in `len` bytes at
/// `start`; a file system without SEEK_DATA reports data everywhere.
fn backing_has_data(cow: &Cow, start: u64, len: u64) -> bool {
    let end = start.saturating_add(len).min(cow.backing_len);
    start < end && crate::image::next_data(&cow.backing, start, end) < end
}

/// Sectors per `PREALLOC` piece of the overlay's data area.
const PIECE_SECTORS: u64 = PREALLOC / SECTOR;

/// The pieces `sectors` touch (none when `sectors` is empty).
fn pieces(sectors: &Range<u64>) -> RangeInclusive<u64> {
    if sectors.is_empty() {
        return RangeInclusive::new(1, 0);
    }
    sectors.start / PIECE_SECTORS..=(sectors.end - 1) / PIECE_SECTORS
}

/// Sets (or clears) the bits of `pieces` in a bitset of one bit per piece.
fn mark(words: &mut [u64], pieces: RangeInclusive<u64>, on: bool) {
    for piece in pieces {
        if let Some(w) = words.get_mut((piece / 64) as usize) {
            let bit = 1u64 << (piece % 64);
            *w = if on { *w | bit } else { *w & !bit };
        }
    }
}

impl Worker {
    /// Plans reads of `sectors` into buffer slot `buf` starting at byte `pos`.
    /// Sectors past the backing file (or a raw image's end) are zero-filled
    /// first, while no op owns the buffer; then the reads are emitted, split
    /// at segment boundaries of the buffer.
    pub(super) fn plan_read(
        &mut self,
        owner: u32,
        sectors: Range<u64>,
        buf: u32,
        pos: u64,
        purpose: u64,
    ) {
        self.read_pass(owner, sectors.clone(), buf, pos, purpose, false);
        self.read_pass(owner, sectors, buf, pos, purpose, true);
    }

    /// One pass of `plan_read`: zero-fill (`emit` false) or emit reads.
    fn read_pass(
        &mut self,
        owner: u32,
        sectors: Range<u64>,
        buf: u32,
        pos: u64,
        purpose: u64,
        emit: bool,
    ) {
        let seg = if buf == owner { self.chunk } else { 2 * SECTOR };
        let byte_pos = |s: u64| pos + (s - sectors.start) * SECTOR;
        // Reads sectors `from..to` from `file` at `file_off`: one op, which
        // spans the buffer's segments where it must (vectored I/O).
        let run = |w: &mut Worker, file: usize, file_off: u64, from: u64, to: u64| {
            let p = byte_pos(from);
            w.emit(
                owner,
                Op {
                    kind: OpKind::Read,
                    file,
                    offset: file_off,
                    len: (to - from) * SECTOR,
                    buf: Some(BufRef {
                        slot: buf,
                        segment: (p / seg) as u32,
                        offset: (p % seg) as usize,
                    }),
                    tag: tag(purpose, owner),
                },
            );
        };
        let (file, base, file_len) = match &self.cow {
            None => (FILE_MAIN, 0, self.main_len),
            Some(cow) => (FILE_BACKING, 0, cow.backing_len),
        };
        let file_sectors = file_len.div_ceil(SECTOR);
        let ragged = (file_len % SECTOR != 0).then_some(file_len / SECTOR);
        let mut at = sectors.start;
        while at < sectors.end {
            let (present, end) = match &self.cow {
                None => (false, sectors.end),
                Some(cow) => {
                    let p = cow.ram.get(at);
                    (p, cow.ram.next_change(at + 1, sectors.end, p))
                }
            };
            if present {
                if emit {
                    let data_offset = self.cow.as_ref().map_or(0, |c| c.data_offset);
                    run(self, FILE_MAIN, data_offset + at * SECTOR, at, end);
                } else if let Some(s) = ragged
                    && (at..end).contains(&s)
                {
                    // The overlay's file may end where the backing file's
                    // data does, inside this sector.
                    self.zero_fill(buf, byte_pos(s), byte_pos(s + 1));
                }
                at = end;
                continue;
            }
            // From the backing file (or the raw image), then zeros past it.
            let read_end = end.min(file_sectors).max(at);
            if emit {
                if at < read_end {
                    run(self, file, base + at * SECTOR, at, read_end);
                }
            } else {
                if let Some(s) = ragged
                    && (at..read_end).contains(&s)
                {
                    self.zero_fill(buf, byte_pos(s), byte_pos(s + 1));
                }
                self.zero_fill(buf, byte_pos(read_end), byte_pos(end));
            }
            at = end;
        }
    }

    fn zero_fill(&mut self, buf: u32, from: u64, to: u64) {
        if from >= to {
            return;
        }
        let b = self.ring.buf_mut(buf);
        debug_assert!(b.is_some(), "zero-fill of a buffer that ops own");
        if let Some(b) = b {
            b.zero(from as usize, (to - from) as usize);
        }
    }

    pub(super) fn plan_cache(&mut self, slot: u32) {
        let Some(r) = self.reqs[slot as usize].as_ref() else {
            return;
        };
        let sectors = r.sectors();
        let advice = libc::POSIX_FADV_WILLNEED;
        let mut at = sectors.start;
        while at < sectors.end {
            let (file, offset, end) = match &self.cow {
                None => (FILE_MAIN, at * SECTOR, sectors.end),
                Some(cow) => {
                    let present = cow.ram.get(at);
                    let end = cow.ram.next_change(at + 1, sectors.end, present);
                    if present {
                        (FILE_MAIN, cow.data_offset + at * SECTOR, end)
                    } else {
                        (FILE_BACKING, at * SECTOR, end)
                    }
                }
            };
            let op = Op {
                kind: OpKind::Fadvise { advice },
                file,
                offset,
                len: (end - at) * SECTOR,
                buf: None,
                tag: tag(P_DATA, slot),
            };
            self.emit(slot, op);
            at = end;
        }
    }

    /// Offset in the main file of sector `s`.
    fn main_offset(&self, s: u64) -> u64 {
        match &self.cow {
            Some(cow) => cow.data_offset + s * SECTOR,
            None => s * SECTOR,
        }
    }

    /// A change request now holds its range lock.
    pub(super) fn locked(&mut self, slot: u32) {
        let Some(r) = self.req(slot) else { return };
        r.locked = true;
        r.stage = Stage::Data;
        let partial = r.head() != 0 || r.tail_gap() != 0;
        let command = r.command;
        match command {
            Command::Trim => self.plan_trim(slot),
            _ if partial => self.get_scratch(slot),
            Command::Write => self.plan_write(slot),
            _ => self.plan_zeroes(slot),
        }
        self.maybe_finish(slot);
    }

    fn get_scratch(&mut self, slot: u32) {
        let Some(scratch) = self.scratch_free.pop() else {
            if let Some(r) = self.req(slot) {
                r.stage = Stage::Scratch;
            }
            self.scratch_wait.push_back(slot);
            return;
        };
        let Some(r) = self.req(slot) else { return };
        r.scratch = Some(scratch);
        r.stage = Stage::Merging;
        let sectors = r.sectors();
        let (head, tail_gap) = (r.head() != 0, r.tail_gap() != 0);
        let first = sectors.start;
        let last = sectors.end - 1;
        // Zero-fill both halves before either read owns the buffer.
        for emit in [false, true] {
            if head {
                self.read_pass(slot, first..first + 1, scratch, 0, P_MERGE, emit);
            }
            if tail_gap && (last != first || !head) {
                self.read_pass(slot, last..last + 1, scratch, SECTOR, P_MERGE, emit);
            }
        }
    }

    /// The merge reads are done: put the old bytes around the new ones.
    pub(super) fn merge(&mut self, slot: u32) {
        let Some(r) = self.reqs[slot as usize].as_ref() else {
            return;
        };
        let (command, head, tail_gap, sectors) = (r.command, r.head(), r.tail_gap(), r.sectors());
        let Some(scratch) = r.scratch else { return };
        let mut old = [0u8; 1024];
        if let Some(own) = self.ring.buf(scratch).and_then(DevBuf::own) {
            old.copy_from_slice(&own.as_slice()[..1024]);
        }
        // When the request sits inside one sector, that sector's old bytes
        // were read into the first half.
        let single = sectors.end - sectors.start == 1;
        let tail_old = if single && head != 0 { 0 } else { 512 };
        match command {
            Command::Write => {
                let span = (sectors.end - sectors.start) * SECTOR;
                if let Some(chunks) = self.ring.buf_mut(slot).and_then(DevBuf::chunks_mut) {
                    if head != 0 {
                        chunks.copy_from_at(0, &old[..head as usize]);
                    }
                    if tail_gap != 0 {
                        let from = (span - tail_gap) as usize;
                        let src = tail_old + 512 - tail_gap as usize;
                        chunks.copy_from_at(from, &old[src..tail_old + 512]);
                    }
                }
                self.release_scratch(slot);
                self.plan_write(slot);
            }
            _ => {
                // WRITE_ZEROES: zero the request's bytes in the old sectors and
                // write those sectors from the scratch buffer.
                let Some(own) = self.ring.buf_mut(scratch).and_then(DevBuf::own_mut) else {
                    return;
                };
                let s = own.as_mut_slice();
                let end_in_last = (512 - tail_gap) as usize;
                if single {
                    // The old bytes are where they were read: the second
                    // half when the request starts at the sector's start.
                    s[tail_old + head as usize..tail_old + end_in_last].fill(0);
                } else {
                    if head != 0 {
                        s[head as usize..512].fill(0);
                    }
                    if tail_gap != 0 {
                        s[512..512 + end_in_last].fill(0);
                    }
                }
                let first = sectors.start;
                let last = sectors.end - 1;
                if single {
                    self.write_sector(slot, scratch, first, tail_old);
                } else if head != 0 {
                    self.write_sector(slot, scratch, first, 0);
                }
                if tail_gap != 0 && !single {
                    self.write_sector(slot, scratch, last, 512);
                }
                self.plan_zeroes(slot);
            }
        }
    }

    fn write_sector(&mut self, owner: u32, buf: u32, sector: u64, pos: usize) {
        let at = BufRef {
            slot: buf,
            segment: 0,
            offset: pos,
        };
        self.emit_write(owner, at, sector..sector + 1);
    }

    /// Emits one write of `sectors` from `buf` (vectored across its chunks
    /// where it must). A raw image ends where its file does, maybe inside a
    /// sector: the write stops there.
    fn emit_write(&mut self, owner: u32, buf: BufRef, sectors: Range<u64>) {
        self.preallocate(sectors.clone());
        let held = self.touches_filling(&sectors);
        let offset = self.main_offset(sectors.start);
        let limit = if self.cow.is_none() {
            self.main_len
        } else {
            u64::MAX
        };
        let op = Op {
            kind: OpKind::Write,
            file: FILE_MAIN,
            offset,
            len: ((sectors.end - sectors.start) * SECTOR).min(limit.saturating_sub(offset)),
            buf: Some(buf),
            tag: tag(P_DATA, owner),
        };
        self.emit_or_park(owner, held, sectors, op);
    }

    /// Emits `op` of request `owner` over the overlay's `sectors`, or holds
    /// it while a piece it touches is being filled.
    fn emit_or_park(&mut self, owner: u32, held: bool, sectors: Range<u64>, op: Op) {
        if held {
            // Counted now, pushed when the fill is done (`release_piece`).
            if let Some(r) = self.req(owner) {
                r.ops += 1;
            }
            self.parked.push((sectors, op));
        } else {
            self.emit(owner, op);
        }
    }

    pub(super) fn release_scratch(&mut self, slot: u32) {
        let Some(scratch) = self.req(slot).and_then(|r| r.scratch.take()) else {
            return;
        };
        self.scratch_free.push(scratch);
        if let Some(next) = self.scratch_wait.pop_front() {
            self.get_scratch(next);
            self.maybe_finish(next);
        }
    }

    fn plan_write(&mut self, slot: u32) {
        let Some(r) = self.req(slot) else { return };
        r.stage = Stage::Data;
        let sectors = r.sectors();
        let at = BufRef {
            slot,
            segment: 0,
            offset: 0,
        };
        self.emit_write(slot, at, sectors);
    }

    /// Whole sectors of a WRITE_ZEROES: punch (or zero-allocate) them.
    fn plan_zeroes(&mut self, slot: u32) {
        let Some(r) = self.req(slot) else { return };
        r.stage = Stage::Data;
        let (start, end) = (r.offset.div_ceil(SECTOR), (r.offset + r.len) / SECTOR);
        let no_hole = r.no_hole;
        if start >= end {
            return;
        }
        let mode = if no_hole {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        // An overlay whose file ends before its data area does (it opens:
        // no bit is set past the end) must reach the range's end, or the
        // bits set here would point past it and reads of them would fail as
        // if the overlay had been cut short. Zeroing the last sector without
        // KEEP_SIZE makes the file reach it; what lies before reads as
        // zeros. (A WRITE there makes the file reach its end the same way.)
        // The file only grows while served: only a range past its length at
        // open needs a look at its length now.
        let reach = self
            .cow
            .as_ref()
            .map_or(0, |c| c.data_offset + end * SECTOR);
        let short = reach > self.main_len
            && match self.main.metadata() {
                Ok(m) => m.len() < reach,
                Err(e) => {
                    // Ops of a partial-sector merge may be in flight: the
                    // request ends with the error once they are back.
                    if let Some(r) = self.req(slot) {
                        r.error.get_or_insert(e.raw_os_error().unwrap_or(libc::EIO));
                    }
                    return;
                }
            };
        self.emit_fallocate(slot, mode, start..end);
        if short {
            self.emit_fallocate(slot, libc::FALLOC_FL_ZERO_RANGE, end - 1..end);
        }
    }

    /// Direct I/O into a hole of the overlay allocates blocks, which the
    /// host file system does under an exclusive inode lock and not without
    /// waiting (io_uring hands such writes to a worker thread), one write at
    /// a time. Blocks allocated ahead (unwritten: they read as zeros) take
    /// writes side by side, as overwrites. So the first write into each
    /// `PREALLOC` piece of the overlay's data area allocates the whole piece,
    /// once per session; the data never depends on it (no op waits for it),
    /// and nothing reads the overlay where no bit is set.
    ///
    /// Unwritten blocks still cost the host a conversion when each write
    /// into them completes. So when the first write into a piece this
    /// session is small and the piece holds no data (no bit set in it), the
    /// piece is written whole instead, and the writes and zeroings into it
    /// wait for that (`parked`) and then land on written blocks. Nothing
    /// else can be in flight there: `touched` is set by every write and
    /// zeroing of the overlay and never cleared, not even by a punch.
    ///
    /// Once the session has seen a FLUSH or a FUA write, the piece is
    /// written with the backing's data when a copy buffer is free, and its
    /// bits are set once that write completes: it then holds what the device
    /// reads there, so later writes into the piece set no new bits and a
    /// FLUSH after them costs one sync, not two (a client that never
    /// flushes gains nothing from the copy). A piece where the backing file
    /// has only holes (or ends) is not copied: its zeros would become the
    /// overlay's data, which `ubd map` would show and `ubd commit` would
    /// write into the backing's holes. Otherwise the piece is written with
    /// zeros, which are harmless: no bit points at them.
    ///
    /// Through the page cache the host allocates blocks when it writes them
    /// back, so nothing is allocated or zero-filled ahead; only the copy is
    /// made, for the same reason as above: the bitmap write and the second
    /// sync a FLUSH costs after a first write into a piece.
    fn preallocate(&mut self, sectors: Range<u64>) {
        if sectors.is_empty() || self.cow.is_none() {
            return;
        }
        let small = (sectors.end - sectors.start) * SECTOR <= FILL_MAX_WRITE;
        for piece in pieces(&sectors) {
            let Some(cow) = self.cow.as_mut() else { return };
            let (word, bit) = ((piece / 64) as usize, 1u64 << (piece % 64));
            let Some(w) = cow.prealloc.get_mut(word) else {
                return;
            };
            let first_touch = cow.touched.get(word).is_some_and(|t| *t & bit == 0);
            if *w & bit != 0 {
                continue;
            }
            *w |= bit;
            let start = piece * PREALLOC;
            let len = PREALLOC.min((cow.mapped * SECTOR).saturating_sub(start));
            let offset = cow.data_offset + start;
            if let Some(t) = cow.touched.get_mut(word) {
                *t |= bit;
            }
            let span = self.piece_sectors(piece);
            let Some(cow) = self.cow.as_ref() else { return };
            let at = |slot| {
                Some(BufRef {
                    slot,
                    segment: 0,
                    offset: 0,
                })
            };
            let fill = small && first_touch && cow.ram.count(span) == 0;
            let copy = if fill && self.flushed && backing_has_data(cow, start, len) {
                self.copy_free.pop()
            } else {
                None
            };
            let op = match (copy, self.zero_slot) {
                // The tail past the backing's end reads short; it is zeroed
                // then (`copied`).
                (Some(copy), _) => {
                    self.filling.push(piece);
                    Op {
                        kind: OpKind::Read,
                        file: FILE_BACKING,
                        offset: start,
                        len,
                        buf: at(copy),
                        tag: tag(P_COPY, copy),
                    }
                }
                (None, Some(zeros)) if fill => {
                    self.filling.push(piece);
                    Op {
                        kind: OpKind::Write,
                        file: FILE_MAIN,
                        offset,
                        len,
                        buf: at(zeros),
                        tag: tag(P_FILL, zeros),
                    }
                }
                _ if self.main_direct => Op {
                    kind: OpKind::Fallocate {
                        mode: libc::FALLOC_FL_KEEP_SIZE,
                    },
                    file: FILE_MAIN,
                    offset,
                    len,
                    buf: None,
                    tag: tag(P_PREALLOC, 0),
                },
                _ => continue,
            };
            self.push(op);
        }
    }

    /// The overlay's sectors in `piece` (the last piece may be short).
    fn piece_sectors(&self, piece: u64) -> Range<u64> {
        let mapped = self.cow.as_ref().map_or(0, |c| c.mapped);
        let start = piece * PIECE_SECTORS;
        start..(start + PIECE_SECTORS).min(mapped)
    }

    /// Whether a piece `sectors` touch is being filled.
    fn touches_filling(&self, sectors: &Range<u64>) -> bool {
        let touched = pieces(sectors);
        self.filling.iter().any(|p| touched.contains(p))
    }

    /// The backing's data for a piece is in copy buffer `slot` (or the read
    /// failed, and the piece is left as it is): write it over the piece.
    pub(super) fn copied(&mut self, slot: u32, c: &Completion) {
        let Some(cow) = self.cow.as_ref() else { return };
        let (start, len) = (c.op.offset, c.op.len);
        let offset = cow.data_offset + start;
        let Ok(done) = c.result else {
            self.copy_free.push(slot);
            self.release_piece(start / PREALLOC);
            return;
        };
        // Past the backing's end the device reads zeros.
        if let Some(tail) = self
            .ring
            .buf_mut(slot)
            .and_then(DevBuf::own_mut)
            .and_then(|b| b.as_mut_slice().get_mut(done as usize..len as usize))
        {
            tail.fill(0);
        }
        self.push(Op {
            kind: OpKind::Write,
            file: FILE_MAIN,
            offset,
            len,
            buf: Some(BufRef {
                slot,
                segment: 0,
                offset: 0,
            }),
            tag: tag(P_FILL, slot),
        });
    }

    /// A piece's fill from buffer `slot` is done (or failed, which leaves
    /// holes). A copy of the backing's data sets the piece's bits: the
    /// overlay now holds what the device reads there.
    pub(super) fn filled(&mut self, slot: u32, c: &Completion) {
        let Some(cow) = self.cow.as_ref() else { return };
        let piece = c.op.offset.saturating_sub(cow.data_offset) / PREALLOC;
        // Any buffer but the zeros is a copy buffer.
        if self.zero_slot != Some(slot) {
            if c.result.is_ok() {
                self.set_bits(self.piece_sectors(piece));
            }
            self.copy_free.push(slot);
        }
        self.release_piece(piece);
    }

    /// The fill of `piece` is over: the writes it held go on, once no other
    /// fill holds them.
    fn release_piece(&mut self, piece: u64) {
        self.filling.retain(|p| *p != piece);
        let mut i = 0;
        while i < self.parked.len() {
            if self.touches_filling(&self.parked[i].0) {
                i += 1;
            } else {
                let (_, op) = self.parked.swap_remove(i);
                self.push(op);
            }
        }
    }

    /// Forgets the preallocation of the pieces `sectors` touch (a hole was
    /// punched there).
    fn forget_preallocation(&mut self, sectors: Range<u64>) {
        if let Some(cow) = self.cow.as_mut() {
            mark(&mut cow.prealloc, pieces(&sectors), false);
        }
    }

    /// Emits `fallocate(mode)` over the overlay's (or raw image's) `sectors`.
    fn emit_fallocate(&mut self, owner: u32, mode: i32, sectors: Range<u64>) {
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            self.forget_preallocation(sectors.clone());
        }
        // No fill may start under it; one in flight must land first.
        self.touch(sectors.clone());
        let held = self.touches_filling(&sectors);
        let op = Op {
            kind: OpKind::Fallocate { mode },
            file: FILE_MAIN,
            offset: self.main_offset(sectors.start),
            len: (sectors.end - sectors.start) * SECTOR,
            buf: None,
            tag: tag(P_DATA, owner),
        };
        self.emit_or_park(owner, held, sectors, op);
    }

    /// Marks the pieces `sectors` touch as changed this session.
    fn touch(&mut self, sectors: Range<u64>) {
        if let Some(cow) = self.cow.as_mut() {
            mark(&mut cow.touched, pieces(&sectors), true);
        }
    }

    /// TRIM: punch holes where whole present sectors (or a raw image's whole
    /// sectors) lie; absent sectors keep reading from the backing file.
    fn plan_trim(&mut self, slot: u32) {
        let Some(r) = self.req(slot) else { return };
        let (start, end) = (r.offset.div_ceil(SECTOR), (r.offset + r.len) / SECTOR);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let mut at = start;
        while at < end {
            let (present, next) = match &self.cow {
                None => (true, end),
                Some(cow) => {
                    let p = cow.ram.get(at);
                    (p, cow.ram.next_change(at + 1, end, p))
                }
            };
            if present {
                self.emit_fallocate(slot, mode, at..next);
            }
            at = next;
        }
    }
}
