//! The device's worker thread: turns requests into ring ops and completions
//! into replies.
//!
//! This file owns the worker's state, its setup and its loop. Each request
//! works in a request slot, which is also its buffer slot in the ring. What
//! other threads hand over waits in `intake.rs`; a request's start,
//! completions and end are in `request.rs`, planning it into ops in
//! `plan.rs`, the flush protocol in `flush.rs`, BLOCK_STATUS in `status.rs`,
//! connections in `conn.rs`.
//!
//! Ops the ring has no room for wait in a backlog that the loop pushes
//! between reaps: it never waits on submission (invariant 6). A request ends
//! only when all its ops are back, and its slot and buffers are freed before
//! its caller hears of it (invariant 1).
//!
//! Closing: once told to close, the worker takes no new requests (but for
//! those whose callers looked before the flag was set), finishes the ones it
//! has, runs a last flush round (another if a request started during it),
//! and drains the ring before any buffer or file goes (invariant 3).

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use ubd_cow::Bitmap;

use super::conn::{CONN_SLOTS, Conn, MemLine};
use super::flush::{Phase, Round};
use super::intake::Intake;
use super::locks::RangeLocks;
use super::log_every::LogEvery;
use super::request::Req;
use super::{Request, Sink};
use crate::engine::aligned::AlignedBuf;
use crate::engine::bufpool::BufPool;
use crate::engine::bufset::DevBuf;
use crate::engine::ring::{Completion, Op, Ring, Waker};
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

/// Which of a per-file log pair (`fail_log`, `truncated_log`) an op on
/// `file` counts in: 1 for the backing file, 0 for the main file (its data
/// or its metadata).
pub(super) fn log_slot(file: usize) -> usize {
    usize::from(file == FILE_BACKING)
}

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
    pub(super) paths: Vec<std::path::PathBuf>,
    /// Failed ops, and reads a truncated file cannot answer, are each
    /// logged at most once a second (a client can repeat a failing request
    /// as fast as it likes), counted apart for the main file and the
    /// backing file ([`log_slot`]), so each count names its file.
    pub(super) fail_log: [LogEvery; 2],
    pub(super) truncated_log: [LogEvery; 2],
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
    /// Requests started so far (given a slot).
    pub(super) started: u64,
    /// Sinks that heard `complete_batched` since the worker last slept.
    pub(super) batched: Vec<Arc<dyn Sink>>,
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
            fail_log: Default::default(),
            truncated_log: Default::default(),
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
            started: 0,
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
        // `started` when the last round began, once closing.
        let mut final_round: Option<u64> = None;
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
                // A read-only device wrote nothing: it has nothing to sync.
                // A request that reached the intake after `closing` (its
                // caller looked before it was set) and was started after
                // the last round began needs another one.
                if final_round == Some(self.started) || self.read_only {
                    break;
                }
                // A last round makes everything acknowledged durable.
                final_round = Some(self.started);
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
            let left_out = self
                .fail_log
                .iter()
                .chain(&self.truncated_log)
                .any(LogEvery::left_out);
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
        for (per_file, what) in logs {
            for (file, log) in [FILE_MAIN, FILE_BACKING].into_iter().zip(per_file) {
                if let Some(n) = log.overdue_at(now) {
                    let path = self.paths.get(file).unwrap_or(&self.paths[FILE_MAIN]);
                    tracing::warn!("{}: {n} more {what} were not logged", path.display());
                }
            }
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
}

impl Drop for Worker {
    /// Runs on every exit, a panic included: nobody waits forever for a
    /// request the worker will not finish. The ring (a field) drains after.
    fn drop(&mut self) {
        self.fail_everything(Errno::EIO);
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
    use super::{poll_for, recent_depth};

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
