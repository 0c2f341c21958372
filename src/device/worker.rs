//! The device's worker thread: turns requests into ring ops and completions
//! into replies.
//!
//! This file owns the worker's state and its loop: intake from
//! `Device::submit`, the start of each request, the dispatch of completions,
//! and each request's end. Each request works in a request slot, which is also
//! its buffer slot in the ring. Planning a request into ops lives in `plan.rs`,
//! the flush protocol in `flush.rs`, BLOCK_STATUS in `status.rs`.
//!
//! Ops the ring has no room for wait in a backlog that the loop pushes
//! between reaps: it never waits on submission (invariant 6). A request ends
//! only when all its ops are back, and its slot and buffers are freed before
//! its caller hears of it (invariant 1).
//!
//! Closing: once told to close, the worker takes no new requests, finishes
//! the ones it has, runs a last flush round, and drains the ring before any
//! buffer or file goes (invariant 3).

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;
use ubd_cow::Bitmap;

use super::conn::{CONN_SLOTS, Conn, MemLine, NewConn};
use super::flush::{Phase, Round};
use super::locks::RangeLocks;
use super::{Command, Reply, Request, Sink};
use crate::engine::aligned::AlignedBuf;
use crate::engine::bufpool::BufPool;
use crate::engine::bufset::DevBuf;
use crate::engine::ring::{Completion, Op, OpKind, Ring, Waker};
use crate::engine::sequencer::Sequencer;
use crate::image::OpenImage;

pub(super) const SECTOR: u64 = 512;
/// Bitmap bytes per staged block.
pub(super) const BLOCK: u64 = 4096;
pub(super) const FILE_MAIN: usize = 0;
pub(super) const FILE_BACKING: usize = 1;
pub(super) const FILE_META: usize = 2;
/// Scratch buffers for partial-sector merges (two sectors each).
pub(super) const SCRATCH: u32 = 32;

/// What an op is for, in the high half of its tag; the low half is a slot.
pub(super) const P_DATA: u64 = 1;
pub(super) const P_MERGE: u64 = 2;
pub(super) const P_SYNC_DATA: u64 = 3;
pub(super) const P_BITMAP: u64 = 4;
pub(super) const P_SYNC_META: u64 = 5;
/// Socket ops of a connection (the low half of the tag is the connection).
pub(super) const P_RECV: u64 = 6;
pub(super) const P_PAYLOAD: u64 = 7;
pub(super) const P_SEND: u64 = 8;
/// Allocation ahead of first writes (see `preallocate` in plan.rs).
pub(super) const P_PREALLOC: u64 = 9;
/// A whole `PREALLOC` piece of the overlay written ahead of first writes,
/// with zeros or with the backing's data (see `Worker::preallocate`).
pub(super) const P_FILL: u64 = 10;
/// The backing's data for a piece read into a copy buffer, to fill it with.
pub(super) const P_COPY: u64 = 11;
/// Buffers of `PREALLOC` bytes for filling pieces with the backing's data.
pub(super) const COPY_BUFS: u32 = 2;
/// Writes no larger than this fill their piece first; larger ones fill much
/// of it themselves.
pub(super) const FILL_MAX_WRITE: u64 = 64 * 1024;
/// Bytes of the overlay allocated at once, ahead of first writes.
pub(super) const PREALLOC: u64 = 1 << 20;

pub(super) fn tag(purpose: u64, slot: u32) -> u64 {
    (purpose << 32) | u64::from(slot)
}

/// Who hears of a request's end.
pub(super) enum Origin {
    /// A caller of `Device::submit`.
    Sink(Arc<dyn Sink>),
    /// A connection the worker serves.
    Conn(u32),
}

/// Requests handed over by `Device::submit`, in ticket order, and
/// connections handed over by `Device::serve`.
#[derive(Default)]
pub struct Intake {
    queue: Mutex<VecDeque<(Request, Arc<dyn Sink>)>>,
    conns: Mutex<Vec<NewConn>>,
    /// Requests and connections queued and not yet taken (read without the
    /// lock).
    queued: AtomicUsize,
    /// Set when the worker is gone: requests end at once with EIO.
    dead: AtomicBool,
}

impl Intake {
    /// Queues a connection for the worker; gives it back when the worker is
    /// gone.
    pub(super) fn push_conn(&self, nc: NewConn) -> Result<(), NewConn> {
        let mut q = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        if self.dead.load(Ordering::SeqCst) {
            return Err(nc);
        }
        q.push(nc);
        self.queued.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn take_conns(&self) -> Vec<NewConn> {
        std::mem::take(&mut *self.conns.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn push(&self, req: Request, sink: Arc<dyn Sink>) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if self.dead.load(Ordering::SeqCst) {
            drop(q);
            sink.complete(req.token, Err(Errno::EIO));
            return;
        }
        q.push_back((req, sink));
        self.queued.fetch_add(1, Ordering::Release);
    }

    /// Marks the worker gone and ends every queued request with `errno`
    /// (and every queued connection).
    fn shut(&self, errno: Errno) {
        let drained: Vec<_> = {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            self.dead.store(true, Ordering::SeqCst);
            q.drain(..).collect()
        };
        for (req, sink) in drained {
            sink.complete(req.token, Err(errno));
        }
        // A push after this sees `dead` (both hold the connections' lock).
        for nc in self.take_conns() {
            nc.done.set(super::conn::ConnEnd::Broken(format!(
                "the device stopped: {}",
                errno.desc()
            )));
        }
    }

    /// Moves queued requests to `local` (in order) and returns queued
    /// connections.
    fn take_into(&self, local: &mut VecDeque<(Request, Origin)>) -> Vec<NewConn> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        self.queued.store(0, Ordering::Release);
        self.drain_requests(local);
        self.take_conns()
    }

    fn drain_requests(&self, local: &mut VecDeque<(Request, Origin)>) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        local.extend(q.drain(..).map(|(r, s)| (r, Origin::Sink(s))));
    }

    /// Moves queued requests (not connections) to `local`, in order. A
    /// caller holding a ticket finds there every request of an earlier
    /// ticket that has not reached `local` yet.
    pub(super) fn take_requests_into(&self, local: &mut VecDeque<(Request, Origin)>) {
        if self.queued.load(Ordering::Acquire) == 0 {
            return;
        }
        // `queued` stays as it is: `take_into` clears it (and takes the
        // connections) on the loop's next pass.
        self.drain_requests(local);
    }

    fn is_empty(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
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

pub(super) struct Req {
    pub(super) command: Command,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) fua: bool,
    pub(super) no_hole: bool,
    pub(super) token: u64,
    pub(super) origin: Origin,
    pub(super) stage: Stage,
    pub(super) ops: u32,
    pub(super) error: Option<i32>,
    pub(super) scratch: Option<u32>,
    pub(super) locked: bool,
}

impl Req {
    pub(super) fn sectors(&self) -> Range<u64> {
        self.offset / SECTOR..(self.offset + self.len).div_ceil(SECTOR)
    }
    /// Byte of the first sector where the request's data starts.
    pub(super) fn head(&self) -> u64 {
        self.offset % SECTOR
    }
    /// Bytes of the last sector past the request's end (0 if it ends on a sector).
    pub(super) fn tail_gap(&self) -> u64 {
        (SECTOR - (self.offset + self.len) % SECTOR) % SECTOR
    }
}

/// The overlay's state the worker keeps.
pub(super) struct Cow {
    pub(super) data_offset: u64,
    pub(super) bitmap_offset: u64,
    pub(super) bitmap_len: u64,
    /// Sectors with a bitmap bit (v1/v2 bitmaps are a byte short).
    pub(super) mapped: u64,
    pub(super) backing_len: u64,
    pub(super) ram: Bitmap<Vec<u8>>,
    pub(super) dirty: Vec<bool>,
    pub(super) dirty_list: Vec<u32>,
    pub(super) backing: Arc<File>,
    /// Pieces of `PREALLOC` bytes of the data area that `preallocate` has
    /// seen this session: allocated, filled or copied, or, through the page
    /// cache, left to the host.
    pub(super) prealloc: Vec<u64>,
    /// Pieces written, zeroed or preallocated this session; never cleared.
    pub(super) touched: Vec<u64>,
}

impl Cow {
    /// Where the overlay's file may end: its data area may stop with the
    /// backing file's data, inside the last sector (read as zeros past it).
    pub(super) fn data_end(&self) -> u64 {
        self.data_offset + self.backing_len
    }
}

pub struct Worker {
    pub(super) ring: Ring<DevBuf>,
    pub(super) main: Arc<File>,
    pub(super) main_len: u64,
    /// The files' paths, by file index, for error messages.
    paths: Vec<std::path::PathBuf>,
    /// Failed ops, and reads a truncated overlay cannot answer, are each
    /// logged at most once a second (a client can repeat a failing request
    /// as fast as it likes).
    pub(super) fail_log: LogEvery,
    pub(super) truncated_log: LogEvery,
    /// The main file takes direct I/O.
    pub(super) main_direct: bool,
    pub(super) cow: Option<Cow>,
    pub(super) capacity: u64,
    pub(super) read_only: bool,
    pub(super) max_io: u64,
    pub(super) pool: BufPool,
    pub(super) seq: Arc<Sequencer>,
    pub(super) intake: Arc<Intake>,
    pub(super) local: VecDeque<(Request, Origin)>,
    /// Connections served here, by index; their buffer slots start at
    /// `conn_base`.
    pub(super) conns: Vec<Option<Conn>>,
    pub(super) conn_base: u32,
    /// Connections with something to do, and the list being worked off.
    pub(super) ready: Vec<u32>,
    pub(super) ready_work: Vec<u32>,
    /// Connections waiting for memory, in order.
    pub(super) line: MemLine,
    pub(super) closing: Arc<AtomicBool>,
    /// Set by [`super::Device::stop_connections`].
    pub(super) stop_conns: Arc<AtomicBool>,
    /// The connections heard `stop_conns` (those adopted since too).
    pub(super) conns_stopped: bool,
    /// When `cut_stalled_senders` last looked.
    pub(super) stall_checked: Option<std::time::Instant>,
    pub(super) reqs: Vec<Option<Req>>,
    pub(super) free: Vec<u32>,
    /// Sinks that heard `complete_batched` since the worker last slept.
    batched: Vec<Arc<dyn Sink>>,
    pub(super) locks: RangeLocks,
    pub(super) scratch_free: Vec<u32>,
    pub(super) scratch_wait: VecDeque<u32>,
    pub(super) backlog: VecDeque<Op>,
    pub(super) round: Round,
    pub(super) chunk: u64,
    pub(super) max_requests: u32,
    spin: std::time::Duration,
    /// Requests in flight, recently: the most at any pass, decaying by an
    /// eighth a pass, so a client at queue depth 32 keeps it high between
    /// its bursts, when for a moment none of its requests is here. It decays
    /// by passes, not by time: a client that drops to depth 1 after a burst
    /// gets polling back some 14 passes later, a sleep counting as one.
    recent_depth: usize,
    /// The slot of `PREALLOC` bytes of zeros, when pieces are filled.
    pub(super) zero_slot: Option<u32>,
    /// The slots of the copy buffers not in use.
    pub(super) copy_free: Vec<u32>,
    /// A FLUSH or a FUA write came this session: copying pieces pays.
    pub(super) flushed: bool,
    /// Pieces whose fill is in flight.
    pub(super) filling: Vec<u64>,
    /// Writes and zeroings into pieces being filled, with their sectors:
    /// pushed when no piece they touch is filling any more.
    pub(super) parked: Vec<(Range<u64>, Op)>,
    /// Holds the image's lock. Declared after `ring`, so it is released
    /// only once the ring has drained.
    _lock: Arc<File>,
}

/// What the worker is given besides the image.
pub(super) struct Setup {
    pub(super) pool: BufPool,
    pub(super) seq: Arc<Sequencer>,
    pub(super) intake: Arc<Intake>,
    pub(super) closing: Arc<AtomicBool>,
    pub(super) stop_conns: Arc<AtomicBool>,
    pub(super) depth: u32,
    pub(super) max_requests: usize,
    pub(super) max_conns: usize,
    pub(super) max_io: u64,
    pub(super) poll: std::time::Duration,
    pub(super) copy_up: bool,
    pub(super) recorder: Option<Arc<crate::engine::record::Recorder>>,
    pub(super) faults: Option<Arc<crate::engine::record::Faults>>,
}

impl Worker {
    pub(super) fn new(img: OpenImage, setup: Setup) -> std::io::Result<Worker> {
        let Setup {
            pool,
            seq,
            intake,
            closing,
            stop_conns,
            depth,
            max_requests,
            max_conns,
            max_io,
            poll,
            copy_up,
            recorder,
            faults,
        } = setup;
        let mut files = vec![img.main.file.clone()];
        let mut paths = vec![img.main.path.clone()];
        if let Some(o) = &img.overlay {
            files.push(o.backing.file.clone());
            files.push(o.meta.clone());
            paths.push(o.backing.path.clone());
            paths.push(img.main.path.clone());
        }
        let (arena_ptr, arena_len) = pool.arena();
        let keep: Arc<dyn Send + Sync> = Arc::new(pool.clone());
        let mr = max_requests as u32;
        // Then the staging buffer (mr + SCRATCH), the zeros (+ 1) and the
        // copy buffers.
        let copy_base = mr + SCRATCH + 2;
        let conn_base = copy_base + COPY_BUFS;
        let slots = conn_base as usize + max_conns * CONN_SLOTS as usize;
        // Each connection has at most three socket ops in flight.
        let depth = depth + 3 * max_conns as u32;
        let mut ring = Ring::new(
            depth,
            slots,
            files,
            max_conns,
            Some((arena_ptr, arena_len, keep)),
        )?;
        {
            use crate::engine::record::Role;
            let roles = if img.overlay.is_some() {
                vec![Role::Main, Role::Backing, Role::Main]
            } else {
                vec![Role::Main]
            };
            ring.set_roles(roles);
            ring.set_recorder(recorder);
            ring.set_faults(faults);
        }
        let no_mem = || std::io::Error::from(std::io::ErrorKind::OutOfMemory);
        for i in 0..SCRATCH {
            let buf = AlignedBuf::new(2 * SECTOR as usize, 4096).ok_or_else(no_mem)?;
            let _ = ring.attach(mr + i, DevBuf::Own(buf));
        }
        let mut zero_slot = None;
        let mut copy_free = Vec::new();
        let cow = match img.overlay {
            None => None,
            Some(o) => {
                let g = o.geometry;
                // Bitmap blocks are staged for the flush round; a read-only
                // device sets no bits and needs no staging. The buffer is
                // zeroed lazily by the kernel: only blocks a round copies
                // become resident.
                if !img.read_only {
                    let staged = g.bitmap_len.next_multiple_of(BLOCK).max(BLOCK) as usize;
                    let staging = AlignedBuf::new(staged, 4096).ok_or_else(no_mem)?;
                    let _ = ring.attach(mr + SCRATCH, DevBuf::Own(staging));
                }
                // Zeros for filling pieces of the overlay (plan.rs, `preallocate`);
                // never written, so never resident.
                if !img.read_only && img.main.direct {
                    let zeros = AlignedBuf::new(PREALLOC as usize, 4096).ok_or_else(no_mem)?;
                    if ring.attach(mr + SCRATCH + 1, DevBuf::Own(zeros)).is_ok() {
                        zero_slot = Some(mr + SCRATCH + 1);
                    }
                }
                // Buffers to copy the backing's data with; resident once
                // used, at most COPY_BUFS MiB.
                if !img.read_only && copy_up {
                    for slot in (copy_base..conn_base).rev() {
                        let buf = AlignedBuf::new(PREALLOC as usize, 4096).ok_or_else(no_mem)?;
                        if ring.attach(slot, DevBuf::Own(buf)).is_ok() {
                            copy_free.push(slot);
                        }
                    }
                }
                let blocks = g.bitmap_len.div_ceil(BLOCK) as usize;
                // One bit per `PREALLOC` piece of the data area.
                let pieces_words =
                    g.mapped_sectors().div_ceil(PREALLOC / SECTOR).div_ceil(64) as usize;
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
                    prealloc: vec![0; pieces_words],
                    touched: vec![0; pieces_words],
                })
            }
        };
        Ok(Worker {
            ring,
            main: img.main.file,
            main_len: img.main.len,
            paths,
            fail_log: LogEvery::default(),
            truncated_log: LogEvery::default(),
            main_direct: img.main.direct,
            cow,
            capacity: img.capacity,
            read_only: img.read_only,
            max_io,
            pool: pool.clone(),
            seq,
            intake,
            local: VecDeque::with_capacity(max_requests),
            conns: (0..max_conns).map(|_| None).collect(),
            conn_base,
            ready: Vec::with_capacity(max_conns),
            ready_work: Vec::with_capacity(max_conns),
            line: MemLine::default(),
            closing,
            stop_conns,
            conns_stopped: false,
            stall_checked: None,
            reqs: (0..max_requests).map(|_| None).collect(),
            free: (0..mr).rev().collect(),
            batched: Vec::with_capacity(mr as usize),
            locks: RangeLocks::new(max_requests),
            scratch_free: (mr..mr + SCRATCH).rev().collect(),
            zero_slot,
            copy_free,
            flushed: false,
            filling: Vec::with_capacity(max_requests),
            parked: Vec::with_capacity(4 * max_requests),
            scratch_wait: VecDeque::with_capacity(max_requests),
            backlog: VecDeque::with_capacity(1024),
            round: Round {
                phase: Phase::Idle,
                waiting: Vec::with_capacity(max_requests),
                members: Vec::with_capacity(max_requests),
                blocks: Vec::new(),
                pending: 0,
                error: None,
                lost: None,
            },
            chunk: pool.chunk_size() as u64,
            max_requests: mr,
            spin: poll,
            recent_depth: 0,
            _lock: img.lock,
        })
    }

    pub fn waker(&self) -> Waker {
        self.ring.waker()
    }

    fn busy(&self) -> bool {
        self.free.len() < self.max_requests as usize
            || self.round.phase != Phase::Idle
            || self.has_conns()
    }

    /// The worker's loop; returns when closed, with the final flush's result.
    pub fn run(mut self) -> Result<(), Errno> {
        let mut done: Vec<Completion> = Vec::with_capacity(self.ring.room() + 1);
        let mut final_round = false;
        let pool_waker = self.ring.waker();
        self.pool
            .set_on_free(Some(Box::new(move || pool_waker.wake())));
        loop {
            self.take_intake();
            self.run_conns();
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
            // Nothing to start: new requests wait for a free slot, if any.
            let idle = |w: &Worker| {
                w.intake.is_empty()
                    && (w.local.is_empty() || w.free.is_empty())
                    && w.ready.is_empty()
            };
            self.flush_sinks();
            self.ring.announce_sleep();
            // A stop that came since `run_conns` looked found nobody asleep
            // either.
            let idle =
                done.is_empty() && idle(&self) && !self.line_may_move() && !self.stop_pending();
            // When closing with nothing in hand, loop back to the final round.
            // `closing` is read again after `announce_sleep`: a `close` that
            // came since the first read found nobody asleep and wrote no
            // wake-up, so the worker must see its flag here.
            let closing = self.closing.load(Ordering::SeqCst);
            let wait = idle && (self.busy() || !closing);
            // Poll before sleeping only while clients wait on one request
            // at a time: there it saves a wake-up per request. Under load
            // there is work anyway, and a client that has its replies and is
            // sending its next requests needs the CPU: polling then, with
            // nothing in flight for a moment, cost 8% at 4K QD32 with fio on
            // the worker's CPU (medians of 5 runs: 47.1k against 50.8k), and
            // gained nothing with fio on the other CPU. Nor while a large
            // batch of replies is on the wire: its completion waits for the
            // client to read it, which polling only delays (1 MiB reads at
            // QD8: 2.8-2.9k a second polling, 3.0-3.2k not; over TLS
            // 1.4k against 2.0-2.2k). Nor while a flush round runs: its
            // fdatasync commits the host's journal after first-touch writes
            // (some 125 us here), which a spin of 50 us never sees end (4K
            // writes with a FLUSH after each, 5 interleaved runs: 4.3-5.0k
            // a second against 4.4-4.9k polling, 118-137 us of CPU each
            // against 177-195).
            let in_flight = self.max_requests as usize - self.free.len();
            self.recent_depth = recent_depth(self.recent_depth, in_flight);
            let idle_round = self.round.phase == Phase::Idle;
            let spin = poll_for(self.spin, self.recent_depth, idle_round, || {
                self.conns_want_polling()
            });
            self.ring.set_spin(spin);
            // Memory is short: wake now and then to find clients that hold
            // it and read nothing.
            let short = self.line.head().is_some();
            // Lines left out of the log: their count goes out when their
            // second is over, even if nothing else happens by then.
            let left_out = self.fail_log.left_out() || self.truncated_log.left_out();
            self.ring
                .set_wait_limit((short || left_out).then_some(super::conn::STALL_CHECK));
            let woken = self.ring.run(wait, &mut |c| done.push(c));
            if let Err(e) = woken {
                // The ring itself failed: nothing can make progress. Fail
                // every request, keep buffers owned (the ring leaks them).
                let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
                self.fail_everything(errno);
                self.pool.set_on_free(None);
                return Err(errno);
            }
            for c in done.drain(..) {
                self.on_complete(c);
                // What this completion started goes to the host now, not
                // after the whole batch: the disk would sit idle while the
                // worker works through the rest (here, a batch of 32 reads
                // at 4K took the disk from 150k to 110k IOPS).
                self.take_intake();
                self.push_backlog();
                // A failure here shows again at the next `run`, which
                // handles it.
                let _ = self.ring.submit_queued();
            }
            if short {
                self.cut_stalled_senders();
            }
            self.log_left_out(false);
        }
        self.log_left_out(true);
        self.pool.set_on_free(None);
        match self.round.error {
            Some(e) => Err(Errno::from_raw(e)),
            None => Ok(()),
        }
    }

    /// Logs how many failure lines were left out, once their second is
    /// over (or at once, when `stopping`).
    fn log_left_out(&self, stopping: bool) {
        let now = (!stopping).then(std::time::Instant::now);
        let logs = [
            (&self.fail_log, "failed I/O operations"),
            (&self.truncated_log, "reads of a truncated file"),
        ];
        for (log, what) in logs {
            if let Some(n) = log.overdue_at(now) {
                tracing::warn!(
                    "{}: {n} more {what} were not logged",
                    self.main_path().display()
                );
            }
        }
    }

    /// Ends the batch of every sink that heard `complete_batched`.
    fn flush_sinks(&mut self) {
        for sink in self.batched.drain(..) {
            sink.flush();
        }
    }

    /// Ends every request the worker knows of with `errno`. Their buffers
    /// stay in the ring, which drains (or leaks) them when it goes.
    fn fail_everything(&mut self, errno: Errno) {
        self.flush_sinks();
        self.intake.shut(errno);
        let local: Vec<_> = self.local.drain(..).collect();
        for (req, origin) in local {
            self.tell(origin, req.token, Err(errno));
        }
        for slot in 0..self.reqs.len() as u32 {
            if let Some(r) = self.reqs[slot as usize].take() {
                self.tell(r.origin, r.token, Err(errno));
            }
        }
        self.fail_conns(&format!("the device failed: {}", errno.desc()));
    }

    /// Tells a request's origin of its end.
    fn tell(&mut self, origin: Origin, token: u64, result: Result<Reply, Errno>) {
        match origin {
            Origin::Sink(sink) => {
                sink.complete_batched(token, result);
                if !self.batched.last().is_some_and(|s| Arc::ptr_eq(s, &sink)) {
                    self.batched.push(sink);
                }
            }
            Origin::Conn(c) => self.conn_complete(c, token, result),
        }
    }

    fn take_intake(&mut self) {
        if !self.closing.load(Ordering::SeqCst) || !self.intake.is_empty() {
            for nc in self.intake.take_into(&mut self.local) {
                self.adopt(nc);
            }
        }
        while !self.free.is_empty() {
            let Some((req, origin)) = self.local.pop_front() else {
                break;
            };
            self.start(req, origin);
        }
    }

    pub(super) fn push(&mut self, op: Op) {
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

    pub(super) fn start(&mut self, req: Request, origin: Origin) {
        let Some(slot) = self.free.pop() else {
            self.local.push_front((req, origin));
            return;
        };
        let r = Req {
            command: req.command,
            offset: req.offset,
            len: req.len,
            fua: req.flags.fua,
            no_hole: req.flags.no_hole,
            token: req.token,
            origin,
            stage: Stage::Data,
            ops: 0,
            error: None,
            scratch: None,
            locked: false,
        };
        if let Some(data) = req.data
            && self.ring.attach(slot, DevBuf::Pool(data)).is_err()
        {
            self.free.push(slot);
            self.tell(r.origin, r.token, Err(Errno::EIO));
            return;
        }
        let command = r.command;
        let sectors = r.sectors();
        self.flushed |= command == Command::Flush || r.fua;
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

    pub(super) fn req(&mut self, slot: u32) -> Option<&mut Req> {
        self.reqs.get_mut(slot as usize)?.as_mut()
    }

    /// Emits an op for request `slot` and counts it.
    pub(super) fn emit(&mut self, owner: u32, op: Op) {
        if let Some(r) = self.req(owner) {
            r.ops += 1;
        }
        self.push(op);
    }

    fn on_complete(&mut self, c: Completion) {
        let purpose = c.tag >> 32;
        let slot = (c.tag & 0xFFFF_FFFF) as u32;
        match purpose {
            P_SYNC_DATA | P_BITMAP | P_SYNC_META => self.on_round(purpose, c.result),
            P_RECV | P_PAYLOAD | P_SEND => self.on_conn_op(purpose, slot, &c),
            // Only ever a help: a failure just leaves holes.
            P_PREALLOC => {}
            P_COPY => self.copied(slot, &c),
            P_FILL => self.filled(slot, &c),
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

    /// The overlay's (or raw image's) path.
    pub(super) fn main_path(&self) -> &std::path::Path {
        &self.paths[FILE_MAIN]
    }

    /// A completion's result, with short transfers judged: a read may stop at
    /// the end of the backing file's data (in the backing file, the raw
    /// image or the overlay), nowhere else. An overlay's sector that the
    /// bitmap marks present but the file does not reach (a truncated
    /// overlay) is an I/O error, not stale data. Failures are logged with
    /// the file and offset.
    fn check(&self, c: &Completion) -> Result<(), i32> {
        let op = &c.op;
        let path = || {
            self.paths
                .get(op.file)
                .map_or_else(String::new, |p| p.display().to_string())
        };
        let done = match c.result {
            Ok(done) => done,
            Err(e) => {
                if let Some(quiet) = self.fail_log.allow() {
                    tracing::warn!(
                        "{}: {:?} of {} bytes at offset {} failed: {}{}",
                        path(),
                        op.kind,
                        op.len,
                        op.offset,
                        Errno::from_raw(e),
                        LogEvery::more(quiet)
                    );
                }
                return Err(e);
            }
        };
        if !matches!(op.kind, OpKind::Read) || done >= op.len {
            return Ok(());
        }
        // Where the file may end (the buffer past it was zero-filled first).
        let file_len = match &self.cow {
            Some(cow) if op.file == FILE_BACKING => cow.backing_len,
            Some(cow) => cow.data_end(),
            None => self.main_len,
        };
        if op.offset + done >= file_len {
            return Ok(());
        }
        if let Some(quiet) = self.truncated_log.allow() {
            tracing::error!(
                "{}: read of {} bytes at offset {} ended after {} bytes: the file is \
                 shorter than the data it should hold (truncated?){}",
                path(),
                op.len,
                op.offset,
                done,
                LogEvery::more(quiet)
            );
        }
        Err(libc::EIO)
    }

    /// Moves a request on once its ops are done.
    pub(super) fn maybe_finish(&mut self, slot: u32) {
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
    pub(super) fn end(&mut self, slot: u32, result: Result<Reply, Errno>) {
        drop(self.ring.detach(slot));
        let Some(r) = self.reqs[slot as usize].take() else {
            return;
        };
        self.free.push(slot);
        self.tell(r.origin, r.token, result);
    }
}

impl Drop for Worker {
    /// Runs on every exit, a panic included: nobody waits forever for a
    /// request the worker will not finish. The ring (a field) drains after.
    fn drop(&mut self) {
        self.fail_everything(Errno::EIO);
    }
}

/// A log line at most once a second, counting the ones left out.
#[derive(Default)]
pub(super) struct LogEvery {
    last: std::cell::Cell<Option<std::time::Instant>>,
    quiet: std::cell::Cell<u64>,
}

impl LogEvery {
    /// `Some(lines left out since the last)` if a line may go out now.
    pub(super) fn allow(&self) -> Option<u64> {
        self.allow_at(std::time::Instant::now())
    }

    fn allow_at(&self, now: std::time::Instant) -> Option<u64> {
        if self.within_a_second(now) {
            self.quiet.set(self.quiet.get() + 1);
            return None;
        }
        self.last.set(Some(now));
        Some(self.quiet.replace(0))
    }

    /// Whether the last line went out less than a second before `now`.
    fn within_a_second(&self, now: std::time::Instant) -> bool {
        self.last
            .get()
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1))
    }

    /// Whether lines were left out and not counted in a line yet.
    pub(super) fn left_out(&self) -> bool {
        self.quiet.get() > 0
    }

    /// `Some(lines left out)` once lines were left out and a second has
    /// passed since the last line: a burst followed by quiet still gets its
    /// count out. `now == None` (the worker stopping): at once.
    fn overdue_at(&self, now: Option<std::time::Instant>) -> Option<u64> {
        if !self.left_out() {
            return None;
        }
        if let Some(now) = now {
            if self.within_a_second(now) {
                return None;
            }
            self.last.set(Some(now));
        }
        Some(self.quiet.replace(0))
    }

    /// The note a line carries for the ones left out before it.
    pub(super) fn more(quiet: u64) -> String {
        if quiet == 0 {
            String::new()
        } else {
            format!(" ({quiet} more failures not logged)")
        }
    }
}

/// How long the worker polls before it sleeps (see the rule in
/// [`Worker::run`]): `spin` while clients have had at most two requests in
/// flight lately, no flush round runs, and the connections want it (asked
/// last, as it looks at each of them).
fn poll_for(
    spin: std::time::Duration,
    recent_depth: usize,
    idle_round: bool,
    conns_want: impl FnOnce() -> bool,
) -> std::time::Duration {
    if !spin.is_zero() && recent_depth <= 2 && idle_round && conns_want() {
        spin
    } else {
        std::time::Duration::ZERO
    }
}

/// The recent depth after a pass with `in_flight` requests held: the most
/// seen, less an eighth a pass (down to zero).
fn recent_depth(before: usize, in_flight: usize) -> usize {
    in_flight.max(before * 7 / 8)
}

#[cfg(test)]
mod tests {
    use super::{LogEvery, poll_for, recent_depth};

    #[test]
    fn the_worker_polls_only_for_shallow_clients_outside_flush_rounds() {
        let us50 = std::time::Duration::from_micros(50);
        let zero = std::time::Duration::ZERO;
        assert_eq!(poll_for(us50, 1, true, || true), us50);
        assert_eq!(poll_for(us50, 2, true, || true), us50);
        // Deeper clients, a flush round, connections streaming replies
        // (or none), or polling off: no polling.
        assert_eq!(poll_for(us50, 3, true, || true), zero);
        assert_eq!(poll_for(us50, 1, false, || true), zero);
        assert_eq!(poll_for(us50, 1, true, || false), zero);
        assert_eq!(poll_for(zero, 1, true, || true), zero);
        // The connections are not looked at when the rest says no.
        assert_eq!(poll_for(us50, 8, true, || unreachable!()), zero);
    }

    #[test]
    fn log_every_lets_one_line_a_second_through_and_counts_the_rest() {
        let log = LogEvery::default();
        let t = std::time::Instant::now();
        let at = |ms| t + std::time::Duration::from_millis(ms);
        assert_eq!(log.allow_at(at(0)), Some(0));
        assert_eq!(log.allow_at(at(10)), None);
        assert_eq!(log.allow_at(at(999)), None);
        // The next line says how many were left out.
        assert_eq!(log.allow_at(at(1000)), Some(2));
        assert_eq!(LogEvery::more(2), " (2 more failures not logged)");
        assert_eq!(log.allow_at(at(5000)), Some(0));
        assert_eq!(LogEvery::more(0), "");
    }

    #[test]
    fn log_every_reports_a_burst_followed_by_quiet() {
        let log = LogEvery::default();
        let t = std::time::Instant::now();
        let at = |ms| Some(t + std::time::Duration::from_millis(ms));
        // Nothing left out: nothing to report.
        assert_eq!(log.overdue_at(at(0)), None);
        assert_eq!(log.allow_at(at(0).unwrap()), Some(0));
        assert_eq!(log.allow_at(at(10).unwrap()), None);
        assert_eq!(log.allow_at(at(20).unwrap()), None);
        // Within the second the count waits; after it, it goes out once.
        assert_eq!(log.overdue_at(at(500)), None);
        assert_eq!(log.overdue_at(at(1000)), Some(2));
        assert_eq!(log.overdue_at(at(3000)), None);
        // That report counts as a line: the next failure within its
        // second is left out, and a stopping worker reports it at once.
        assert_eq!(log.allow_at(at(1500).unwrap()), None);
        assert_eq!(log.overdue_at(None), Some(1));
        assert_eq!(log.overdue_at(None), None);
    }

    #[test]
    fn recent_depth_follows_the_peak_and_decays_to_polling() {
        // A client at queue depth 1 or 2: polling stays on.
        assert_eq!(recent_depth(1, 0), 0);
        assert_eq!(recent_depth(0, 1), 1);
        assert_eq!(recent_depth(2, 1), 1);
        assert_eq!(recent_depth(1, 2), 2);
        // A burst of 32 keeps it off for the passes between bursts...
        let mut d = recent_depth(0, 32);
        for _ in 0..10 {
            d = recent_depth(d, 0);
        }
        assert!(d > 2, "{d}");
        // ...and once the client slows to one at a time, it comes back.
        for _ in 0..10 {
            d = recent_depth(d, 1);
        }
        assert!(d <= 2, "{d}");
        // It reaches zero from any depth.
        let mut d = 256;
        for _ in 0..64 {
            d = recent_depth(d, 0);
        }
        assert_eq!(d, 0);
    }
}
