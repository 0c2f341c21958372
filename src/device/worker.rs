//! The device's worker thread: turns requests into ring ops and completions
//! into replies.
//!
//! Each request works in a request slot, which is also its buffer slot in the
//! ring. READ plans one op per run of present or absent sectors (split at
//! chunk boundaries) and zero-fills what lies past the backing file. WRITE
//! takes a range lock over its sectors (invariant 2), reads the old contents
//! of a partial first or last sector into a scratch buffer and merges them,
//! writes, and only when every write has completed sets the RAM bitmap's bits
//! and lets the lock go. TRIM punches holes in present sectors; WRITE_ZEROES
//! punches (or, with NO_HOLE, zero-allocates) whole sectors and merges zeros
//! into partial ones, then sets the bits.
//!
//! The flush protocol (invariant 7), one round at a time: snapshot the bitmap
//! blocks that changed into a staging buffer (every bit in them belongs to a
//! completed data write), fdatasync the overlay, write the staged blocks,
//! fdatasync again, then answer every FLUSH and FUA request of the round. A
//! FUA request joins a round after its own data has completed.
//!
//! Closing: once told to close, the worker takes no new requests, finishes
//! the ones it has, runs a last flush round, and drains the ring before any
//! buffer or file goes (invariant 3).

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use ubd_cow::Bitmap;

use super::locks::RangeLocks;
use super::{Command, Extent, Reply, Request, Sink};
use crate::engine::aligned::AlignedBuf;
use crate::engine::bufpool::BufPool;
use crate::engine::bufset::DevBuf;
use crate::engine::ring::{BufRef, Completion, Op, OpKind, Ring, Waker};
use crate::image::OpenImage;

const SECTOR: u64 = 512;
/// Bitmap bytes per staged block.
const BLOCK: u64 = 4096;
const FILE_MAIN: usize = 0;
const FILE_BACKING: usize = 1;
const FILE_META: usize = 2;
/// Scratch buffers for partial-sector merges (two sectors each).
const SCRATCH: u32 = 32;

/// What an op is for, in the high half of its tag; the low half is a slot.
const P_DATA: u64 = 1;
const P_MERGE: u64 = 2;
const P_SYNC_DATA: u64 = 3;
const P_BITMAP: u64 = 4;
const P_SYNC_META: u64 = 5;

fn tag(purpose: u64, slot: u32) -> u64 {
    (purpose << 32) | u64::from(slot)
}

/// Requests handed over by `Device::submit`, in ticket order.
#[derive(Default)]
pub struct Intake {
    queue: Mutex<VecDeque<(Request, Arc<dyn Sink>)>>,
    /// Set when the worker is gone: requests end at once with EIO.
    dead: AtomicBool,
}

impl Intake {
    pub(super) fn push(&self, req: Request, sink: Arc<dyn Sink>) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if self.dead.load(Ordering::SeqCst) {
            drop(q);
            sink.complete(req.token, Err(Errno::EIO));
            return;
        }
        q.push_back((req, sink));
    }

    /// Marks the worker gone and ends every queued request with `errno`.
    fn shut(&self, errno: Errno) {
        let drained: Vec<_> = {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            self.dead.store(true, Ordering::SeqCst);
            q.drain(..).collect()
        };
        for (req, sink) in drained {
            sink.complete(req.token, Err(errno));
        }
    }

    fn take_into(&self, local: &mut VecDeque<(Request, Arc<dyn Sink>)>) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if local.is_empty() {
            std::mem::swap(&mut *q, local);
        } else {
            local.extend(q.drain(..));
        }
    }

    fn is_empty(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting in the range lock's line.
    Locking,
    /// Waiting for a scratch buffer.
    Scratch,
    /// Reading old sectors for a merge.
    Merging,
    /// Data ops in flight.
    Data,
    /// Waiting for a flush round.
    Flushing,
}

struct Req {
    command: Command,
    offset: u64,
    len: u64,
    fua: bool,
    no_hole: bool,
    token: u64,
    sink: Arc<dyn Sink>,
    stage: Stage,
    ops: u32,
    error: Option<i32>,
    scratch: Option<u32>,
    locked: bool,
}

impl Req {
    fn sectors(&self) -> Range<u64> {
        self.offset / SECTOR..(self.offset + self.len).div_ceil(SECTOR)
    }
    /// Byte of the first sector where the request's data starts.
    fn head(&self) -> u64 {
        self.offset % SECTOR
    }
    /// Bytes of the last sector past the request's end (0 if it ends on a sector).
    fn tail_gap(&self) -> u64 {
        (SECTOR - (self.offset + self.len) % SECTOR) % SECTOR
    }
}

/// The overlay's state the worker keeps.
struct Cow {
    data_offset: u64,
    bitmap_offset: u64,
    bitmap_len: u64,
    /// Sectors with a bitmap bit (v1/v2 bitmaps are a byte short).
    mapped: u64,
    backing_len: u64,
    ram: Bitmap<Vec<u8>>,
    dirty: Vec<bool>,
    dirty_list: Vec<u32>,
    backing: Arc<File>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    SyncData,
    Bitmap,
    SyncMeta,
}

struct Round {
    phase: Phase,
    waiting: Vec<u32>,
    members: Vec<u32>,
    blocks: Vec<u32>,
    pending: u32,
    error: Option<i32>,
}

pub struct Worker {
    ring: Ring<DevBuf>,
    main: Arc<File>,
    main_len: u64,
    cow: Option<Cow>,
    capacity: u64,
    intake: Arc<Intake>,
    local: VecDeque<(Request, Arc<dyn Sink>)>,
    closing: Arc<AtomicBool>,
    reqs: Vec<Option<Req>>,
    free: Vec<u32>,
    locks: RangeLocks,
    scratch_free: Vec<u32>,
    scratch_wait: VecDeque<u32>,
    backlog: VecDeque<Op>,
    round: Round,
    chunk: u64,
    max_requests: u32,
}

impl Worker {
    pub fn new(
        img: OpenImage,
        pool: BufPool,
        intake: Arc<Intake>,
        closing: Arc<AtomicBool>,
        depth: u32,
        max_requests: usize,
    ) -> std::io::Result<Worker> {
        let mut files = vec![img.main.file.clone()];
        if let Some(o) = &img.overlay {
            files.push(o.backing.file.clone());
            files.push(o.meta.clone());
        }
        let (arena_ptr, arena_len) = pool.arena();
        let keep: Arc<dyn Send + Sync> = Arc::new(pool.clone());
        let mr = max_requests as u32;
        let slots = max_requests + SCRATCH as usize + 1;
        let mut ring = Ring::new(depth, slots, files, Some((arena_ptr, arena_len, keep)))?;
        let no_mem = || std::io::Error::from(std::io::ErrorKind::OutOfMemory);
        for i in 0..SCRATCH {
            let buf = AlignedBuf::new(2 * SECTOR as usize, 4096).ok_or_else(no_mem)?;
            let _ = ring.attach(mr + i, DevBuf::Own(buf));
        }
        let cow = match img.overlay {
            None => None,
            Some(o) => {
                let g = o.geometry;
                let staged = g.bitmap_len.next_multiple_of(BLOCK).max(BLOCK) as usize;
                let staging = AlignedBuf::new(staged, 4096).ok_or_else(no_mem)?;
                let _ = ring.attach(mr + SCRATCH, DevBuf::Own(staging));
                let blocks = g.bitmap_len.div_ceil(BLOCK) as usize;
                Some(Cow {
                    data_offset: g.data_offset,
                    bitmap_offset: g.bitmap_offset,
                    bitmap_len: g.bitmap_len,
                    mapped: g.mapped_sectors(),
                    backing_len: o.backing.len,
                    ram: Bitmap::new(o.bitmap, g.mapped_sectors()),
                    dirty: vec![false; blocks],
                    dirty_list: Vec::with_capacity(blocks),
                    backing: o.backing.file,
                })
            }
        };
        Ok(Worker {
            ring,
            main: img.main.file,
            main_len: img.main.len,
            cow,
            capacity: img.capacity,
            intake,
            local: VecDeque::with_capacity(max_requests),
            closing,
            reqs: (0..max_requests).map(|_| None).collect(),
            free: (0..mr).rev().collect(),
            locks: RangeLocks::new(max_requests),
            scratch_free: (mr..mr + SCRATCH).rev().collect(),
            scratch_wait: VecDeque::with_capacity(max_requests),
            backlog: VecDeque::with_capacity(1024),
            round: Round {
                phase: Phase::Idle,
                waiting: Vec::with_capacity(max_requests),
                members: Vec::with_capacity(max_requests),
                blocks: Vec::new(),
                pending: 0,
                error: None,
            },
            chunk: pool.chunk_size() as u64,
            max_requests: mr,
        })
    }

    pub fn waker(&self) -> Waker {
        self.ring.waker()
    }

    fn busy(&self) -> bool {
        self.free.len() < self.max_requests as usize || self.round.phase != Phase::Idle
    }

    /// The worker's loop; returns when closed, with the final flush's result.
    pub fn run(mut self) -> Result<(), Errno> {
        let mut done: Vec<Completion> = Vec::with_capacity(self.ring.room() + 1);
        let mut final_round = false;
        loop {
            self.take_intake();
            self.push_backlog();
            let closing = self.closing.load(Ordering::SeqCst);
            if closing && self.local.is_empty() && !self.busy() {
                if final_round {
                    break;
                }
                // A last round makes everything acknowledged durable.
                final_round = true;
                self.round.phase = Phase::Idle;
                self.start_round(true);
                continue;
            }
            self.ring.announce_sleep();
            // Nothing to start: new requests wait for a free slot, if any.
            let idle = self.intake.is_empty() && (self.local.is_empty() || self.free.is_empty());
            // When closing with nothing in hand, loop back to the final round.
            let wait = idle && (self.busy() || !closing);
            let woken = self.ring.run(wait, &mut |c| done.push(c));
            if let Err(e) = woken {
                // The ring itself failed: nothing can make progress. Fail
                // every request, keep buffers owned (the ring leaks them).
                let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
                self.fail_everything(errno);
                return Err(errno);
            }
            for c in done.drain(..) {
                self.on_complete(c);
            }
        }
        match self.round.error {
            Some(e) => Err(Errno::from_raw(e)),
            None => Ok(()),
        }
    }

    /// Ends every request the worker knows of with `errno`. Their buffers
    /// stay in the ring, which drains (or leaks) them when it goes.
    fn fail_everything(&mut self, errno: Errno) {
        self.intake.shut(errno);
        for (req, sink) in self.local.drain(..) {
            sink.complete(req.token, Err(errno));
        }
        for slot in 0..self.reqs.len() as u32 {
            if let Some(r) = self.reqs[slot as usize].take() {
                r.sink.complete(r.token, Err(errno));
            }
        }
    }

    fn take_intake(&mut self) {
        if !self.closing.load(Ordering::SeqCst) || !self.intake.is_empty() {
            self.intake.take_into(&mut self.local);
        }
        while !self.free.is_empty() {
            let Some((req, sink)) = self.local.pop_front() else {
                break;
            };
            self.start(req, sink);
        }
    }

    fn push(&mut self, op: Op) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(op);
            return;
        }
        if let Err(op) = self.ring.push(op) {
            self.backlog.push_back(op);
        }
    }

    fn push_backlog(&mut self) {
        while let Some(&op) = self.backlog.front() {
            if self.ring.push(op).is_err() {
                break;
            }
            self.backlog.pop_front();
        }
    }

    fn start(&mut self, req: Request, sink: Arc<dyn Sink>) {
        let Some(slot) = self.free.pop() else {
            return;
        };
        let r = Req {
            command: req.command,
            offset: req.offset,
            len: req.len,
            fua: req.flags.fua,
            no_hole: req.flags.no_hole,
            token: req.token,
            sink,
            stage: Stage::Data,
            ops: 0,
            error: None,
            scratch: None,
            locked: false,
        };
        if let Some(data) = req.data
            && self.ring.attach(slot, DevBuf::Pool(data)).is_err()
        {
            r.sink.complete(r.token, Err(Errno::EIO));
            self.free.push(slot);
            return;
        }
        let command = r.command;
        let sectors = r.sectors();
        self.reqs[slot as usize] = Some(r);
        match command {
            Command::Read => {
                self.plan_read(slot, sectors, slot, 0, P_DATA);
                self.maybe_finish(slot);
            }
            Command::Write | Command::WriteZeroes | Command::Trim => {
                if let Some(cow) = &self.cow
                    && sectors.end > cow.mapped
                    && command != Command::Trim
                {
                    // v1/v2 bitmaps have no bit for the last few sectors.
                    self.fail(slot, libc::EIO);
                    return;
                }
                if self.locks.acquire(slot, sectors) {
                    self.locked(slot);
                } else if let Some(r) = self.req(slot) {
                    r.stage = Stage::Locking;
                }
            }
            Command::Flush => {
                if let Some(r) = self.req(slot) {
                    r.stage = Stage::Flushing;
                }
                self.round.waiting.push(slot);
                self.start_round(false);
            }
            Command::Cache => {
                self.plan_cache(slot);
                self.maybe_finish(slot);
            }
            Command::BlockStatus => {
                let result = self.block_status(slot);
                self.end(slot, result);
            }
        }
    }

    fn req(&mut self, slot: u32) -> Option<&mut Req> {
        self.reqs.get_mut(slot as usize)?.as_mut()
    }

    /// Emits an op for request `slot` and counts it.
    fn emit(&mut self, owner: u32, op: Op) {
        if let Some(r) = self.req(owner) {
            r.ops += 1;
        }
        self.push(op);
    }

    /// Plans reads of `sectors` into buffer slot `buf` starting at byte `pos`.
    /// Sectors past the backing file (or a raw image's end) are zero-filled
    /// first, while no op owns the buffer; then the reads are emitted, split
    /// at segment boundaries of the buffer.
    fn plan_read(&mut self, owner: u32, sectors: Range<u64>, buf: u32, pos: u64, purpose: u64) {
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
        // Reads sectors `from..to` from `file` at `file_off`.
        let run = |w: &mut Worker, file: usize, file_off: u64, from: u64, to: u64| {
            let mut at = from;
            while at < to {
                let p = byte_pos(at);
                let (segment, off) = (p / seg, p % seg);
                let n = ((seg - off) / SECTOR).min(to - at);
                w.emit(
                    owner,
                    Op {
                        kind: OpKind::Read,
                        file,
                        offset: file_off + (at - from) * SECTOR,
                        len: n * SECTOR,
                        buf: Some(BufRef {
                            slot: buf,
                            segment: segment as u32,
                            offset: off as usize,
                        }),
                        tag: tag(purpose, owner),
                    },
                );
                at += n;
            }
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

    fn plan_cache(&mut self, slot: u32) {
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
    fn locked(&mut self, slot: u32) {
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
    fn merge(&mut self, slot: u32) {
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
                    s[head as usize..end_in_last].fill(0);
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
                if head != 0 || single {
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
        let offset = self.main_offset(sector);
        let limit = if self.cow.is_none() {
            self.main_len
        } else {
            u64::MAX
        };
        let op = Op {
            kind: OpKind::Write,
            file: FILE_MAIN,
            offset,
            len: SECTOR.min(limit.saturating_sub(offset)),
            buf: Some(BufRef {
                slot: buf,
                segment: 0,
                offset: pos,
            }),
            tag: tag(P_DATA, owner),
        };
        self.emit(owner, op);
    }

    fn release_scratch(&mut self, slot: u32) {
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
        let base = self.main_offset(sectors.start);
        let chunk_sectors = self.chunk / SECTOR;
        let mut at = 0;
        let total = sectors.end - sectors.start;
        // A raw image ends where its file does, maybe inside a sector.
        let limit = if self.cow.is_none() {
            self.main_len
        } else {
            u64::MAX
        };
        while at < total {
            let n = (chunk_sectors - at % chunk_sectors).min(total - at);
            let offset = base + at * SECTOR;
            let op = Op {
                kind: OpKind::Write,
                file: FILE_MAIN,
                offset,
                len: (n * SECTOR).min(limit.saturating_sub(offset)),
                buf: Some(BufRef {
                    slot,
                    segment: (at / chunk_sectors) as u32,
                    offset: ((at % chunk_sectors) * SECTOR) as usize,
                }),
                tag: tag(P_DATA, slot),
            };
            self.emit(slot, op);
            at += n;
        }
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
        let op = Op {
            kind: OpKind::Fallocate { mode },
            file: FILE_MAIN,
            offset: self.main_offset(start),
            len: (end - start) * SECTOR,
            buf: None,
            tag: tag(P_DATA, slot),
        };
        self.emit(slot, op);
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
                let op = Op {
                    kind: OpKind::Fallocate { mode },
                    file: FILE_MAIN,
                    offset: self.main_offset(at),
                    len: (next - at) * SECTOR,
                    buf: None,
                    tag: tag(P_DATA, slot),
                };
                self.emit(slot, op);
            }
            at = next;
        }
    }

    fn on_complete(&mut self, c: Completion) {
        let purpose = c.tag >> 32;
        let slot = (c.tag & 0xFFFF_FFFF) as u32;
        match purpose {
            P_SYNC_DATA | P_BITMAP | P_SYNC_META => self.on_round(purpose, c.result),
            _ => {
                let ok = self.check(&c);
                let Some(r) = self.req(slot) else { return };
                r.ops = r.ops.saturating_sub(1);
                if let Err(e) = ok {
                    r.error.get_or_insert(e);
                }
                self.maybe_finish(slot);
            }
        }
    }

    /// A completion's result, with short transfers judged: a read may stop at
    /// the end of the backing file (or a raw image), nowhere else.
    fn check(&self, c: &Completion) -> Result<(), i32> {
        let done = c.result?;
        let op = &c.op;
        if !matches!(op.kind, OpKind::Read) || done >= op.len {
            return Ok(());
        }
        let file_len = match op.file {
            FILE_BACKING => self.cow.as_ref().map_or(0, |c| c.backing_len),
            _ if self.cow.is_none() => self.main_len,
            _ => 0,
        };
        if op.offset + done >= file_len {
            Ok(())
        } else {
            Err(libc::EIO)
        }
    }

    /// Moves a request on once its ops are done.
    fn maybe_finish(&mut self, slot: u32) {
        let Some(r) = self.reqs[slot as usize].as_ref() else {
            return;
        };
        if r.ops > 0 {
            return;
        }
        match (r.stage, r.error) {
            (Stage::Locking | Stage::Scratch | Stage::Flushing, _) => {}
            (Stage::Merging, None) => {
                self.merge(slot);
                // The merge may have planned no ops (nothing else to write).
                if self.reqs[slot as usize]
                    .as_ref()
                    .is_some_and(|r| r.ops == 0)
                {
                    self.data_done(slot);
                }
            }
            (Stage::Merging, Some(e)) => {
                self.release_scratch(slot);
                self.fail(slot, e);
            }
            (Stage::Data, Some(e)) => self.fail(slot, e),
            (Stage::Data, None) => self.data_done(slot),
        }
    }

    /// Every data op of `slot` completed without error.
    fn data_done(&mut self, slot: u32) {
        let Some(r) = self.reqs[slot as usize].as_ref() else {
            return;
        };
        let (command, sectors, fua) = (r.command, r.sectors(), r.fua);
        match command {
            Command::Write | Command::WriteZeroes => {
                self.release_scratch(slot);
                // Invariant 7: the RAM bit only after the data write completed.
                self.set_bits(sectors);
                self.unlock(slot);
            }
            Command::Trim => self.unlock(slot),
            _ => {}
        }
        let changes = matches!(
            command,
            Command::Write | Command::WriteZeroes | Command::Trim
        );
        if changes && fua {
            if let Some(r) = self.req(slot) {
                r.stage = Stage::Flushing;
            }
            // The pool buffers are not needed while the round runs.
            drop(self.ring.detach(slot));
            self.round.waiting.push(slot);
            self.start_round(false);
            return;
        }
        let reply = match command {
            Command::Read => match self.ring.detach(slot) {
                Some(DevBuf::Pool(chunks)) => Ok(Reply::Data(chunks)),
                _ => Err(Errno::EIO),
            },
            _ => Ok(Reply::Done),
        };
        self.end(slot, reply);
    }

    fn set_bits(&mut self, sectors: Range<u64>) {
        let Some(cow) = self.cow.as_mut() else { return };
        if sectors.is_empty() {
            return;
        }
        cow.ram.set_range(sectors.clone(), true);
        let first = sectors.start / 8 / BLOCK;
        let last = (sectors.end - 1) / 8 / BLOCK;
        for b in first..=last {
            if let Some(d) = cow.dirty.get_mut(b as usize)
                && !*d
            {
                *d = true;
                cow.dirty_list.push(b as u32);
            }
        }
    }

    fn unlock(&mut self, slot: u32) {
        let Some(r) = self.req(slot) else { return };
        if !std::mem::replace(&mut r.locked, false) {
            return;
        }
        let mut granted: [u32; 64] = [0; 64];
        let mut n = 0;
        let mut overflow = Vec::new();
        self.locks.release(slot, |s| {
            if n < granted.len() {
                granted[n] = s;
                n += 1;
            } else {
                overflow.push(s);
            }
        });
        for s in granted[..n].iter().copied().chain(overflow) {
            self.locked(s);
        }
    }

    fn fail(&mut self, slot: u32, errno: i32) {
        self.release_scratch(slot);
        self.unlock(slot);
        self.end(slot, Err(Errno::from_raw(errno)));
    }

    /// Ends request `slot`: frees its slot and buffers first, then tells the
    /// caller (invariant 1: nothing of the request is touched after that).
    fn end(&mut self, slot: u32, result: Result<Reply, Errno>) {
        drop(self.ring.detach(slot));
        let Some(r) = self.reqs[slot as usize].take() else {
            return;
        };
        self.free.push(slot);
        r.sink.complete(r.token, result);
    }

    /// Starts a flush round if none runs and someone waits (or `always`).
    fn start_round(&mut self, always: bool) {
        if self.round.phase != Phase::Idle || (self.round.waiting.is_empty() && !always) {
            return;
        }
        std::mem::swap(&mut self.round.members, &mut self.round.waiting);
        self.round.error = None;
        self.round.blocks.clear();
        let staging = self.max_requests + SCRATCH;
        if let Some(cow) = self.cow.as_mut() {
            // Snapshot: every bit here belongs to a completed data write.
            std::mem::swap(&mut self.round.blocks, &mut cow.dirty_list);
            if let Some(own) = self.ring.buf_mut(staging).and_then(DevBuf::own_mut) {
                let dst = own.as_mut_slice();
                let src = cow.ram.as_bytes();
                for &b in &self.round.blocks {
                    cow.dirty[b as usize] = false;
                    let from = (u64::from(b) * BLOCK) as usize;
                    let to = (from + BLOCK as usize).min(src.len());
                    dst[from..to].copy_from_slice(&src[from..to]);
                }
            }
        }
        self.round.phase = Phase::SyncData;
        self.round.pending = 1;
        self.push(Op {
            kind: OpKind::Fdatasync,
            file: FILE_MAIN,
            offset: 0,
            len: 0,
            buf: None,
            tag: tag(P_SYNC_DATA, 0),
        });
    }

    fn on_round(&mut self, purpose: u64, result: Result<u64, i32>) {
        if let Err(e) = result {
            self.round.error.get_or_insert(e);
        }
        self.round.pending = self.round.pending.saturating_sub(1);
        if self.round.pending > 0 {
            return;
        }
        let next = match (purpose, &self.cow, self.round.error) {
            (P_SYNC_DATA, Some(_), None) if !self.round.blocks.is_empty() => Phase::Bitmap,
            (P_BITMAP, _, None) => Phase::SyncMeta,
            _ => Phase::Idle,
        };
        match next {
            Phase::Bitmap => {
                let (offset, len) = match &self.cow {
                    Some(c) => (c.bitmap_offset, c.bitmap_len),
                    None => return,
                };
                let staging = self.max_requests + SCRATCH;
                self.round.phase = Phase::Bitmap;
                self.round.pending = self.round.blocks.len() as u32;
                for i in 0..self.round.blocks.len() {
                    let b = u64::from(self.round.blocks[i]);
                    self.push(Op {
                        kind: OpKind::Write,
                        file: FILE_META,
                        offset: offset + b * BLOCK,
                        len: BLOCK.min(len - b * BLOCK),
                        buf: Some(BufRef {
                            slot: staging,
                            segment: 0,
                            offset: (b * BLOCK) as usize,
                        }),
                        tag: tag(P_BITMAP, 0),
                    });
                }
            }
            Phase::SyncMeta => {
                self.round.phase = Phase::SyncMeta;
                self.round.pending = 1;
                self.push(Op {
                    kind: OpKind::Fdatasync,
                    file: FILE_META,
                    offset: 0,
                    len: 0,
                    buf: None,
                    tag: tag(P_SYNC_META, 0),
                });
            }
            _ => self.finish_round(),
        }
    }

    fn finish_round(&mut self) {
        let error = self.round.error;
        if error.is_some()
            && let Some(cow) = self.cow.as_mut()
        {
            // The blocks were not made durable: they stay dirty.
            for &b in &self.round.blocks {
                if !cow.dirty[b as usize] {
                    cow.dirty[b as usize] = true;
                    cow.dirty_list.push(b);
                }
            }
        }
        self.round.phase = Phase::Idle;
        let mut members = std::mem::take(&mut self.round.members);
        for &slot in &members {
            let result = match error {
                Some(e) => Err(Errno::from_raw(e)),
                None => Ok(Reply::Done),
            };
            self.end(slot, result);
        }
        members.clear();
        self.round.members = members;
        self.start_round(false);
    }

    /// Where the request's range reads from, from the bitmap and the files'
    /// holes (SEEK_DATA / SEEK_HOLE).
    fn block_status(&self, slot: u32) -> Result<Reply, Errno> {
        let Some(r) = self.reqs[slot as usize].as_ref() else {
            return Err(Errno::EINVAL);
        };
        let (start, end) = (r.offset, (r.offset + r.len).min(self.capacity));
        let mut out: Vec<Extent> = Vec::new();
        let mut add = |len: u64, depth: u8, zero: bool| {
            if len == 0 {
                return;
            }
            match out.last_mut() {
                Some(e) if e.depth == depth && e.zero == zero => e.len += len,
                _ => out.push(Extent { len, depth, zero }),
            }
        };
        let Some(cow) = &self.cow else {
            holes(&self.main, start, end, self.main_len, |len, data| {
                add(len, 1, !data)
            })?;
            return Ok(Reply::Extents(out));
        };
        let mut at = start;
        while at < end {
            let s = at / SECTOR;
            let present = cow.ram.get(s);
            let next_sector = cow.ram.next_change(s + 1, end.div_ceil(SECTOR), present);
            let run_end = (next_sector * SECTOR).min(end);
            if present {
                let base = cow.data_offset;
                holes(
                    &self.main,
                    base + at,
                    base + run_end,
                    u64::MAX,
                    |len, data| add(len, 1, !data),
                )?;
            } else {
                let in_backing = run_end.min(cow.backing_len.max(at));
                holes(
                    &cow.backing,
                    at,
                    in_backing,
                    cow.backing_len,
                    |len, data| add(len, 2, !data),
                )?;
                add(run_end - in_backing, 0, true);
            }
            at = run_end;
        }
        Ok(Reply::Extents(out))
    }
}

impl Drop for Worker {
    /// Runs on every exit, a panic included: nobody waits forever for a
    /// request the worker will not finish. The ring (a field) drains after.
    fn drop(&mut self) {
        self.fail_everything(Errno::EIO);
    }
}

/// Calls `each(len, is_data)` for the data and hole runs of `file` over
/// `start..end`; bytes at or past `file_len` count as a hole.
fn holes(
    file: &File,
    start: u64,
    end: u64,
    file_len: u64,
    mut each: impl FnMut(u64, bool),
) -> Result<(), Errno> {
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
            each(data - at, false);
            at = data;
            continue;
        }
        let hole = match lseek(file.as_fd(), pos, Whence::SeekHole) {
            Ok(h) => (h as u64).min(limit),
            Err(Errno::ENXIO) => limit,
            Err(e) => return Err(e),
        };
        let hole = hole.max(at + 1).min(limit);
        each(hole - at, true);
        at = hole;
    }
    if end > at {
        each(end - at, false);
    }
    Ok(())
}
