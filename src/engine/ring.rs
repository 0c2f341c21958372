//! One io_uring ring and the table of the ops it has in flight.
//!
//! A `Ring` belongs to the thread that made it (make it on the thread that
//! uses it). Each op gets a slot in a preallocated op table; its `user_data` is
//! the slot index plus a generation. Buffers live in the ring's buffer table:
//! the owner attaches a request's buffer set to a buffer slot, ops name a
//! segment and offset in it, and the set can be looked at or detached only
//! while no op on it is in flight. So a buffer is owned by the ring from the
//! first op's submission to the last op's terminal completion (invariants 1
//! and 3: the kernel never writes into memory someone else owns or has freed).
//! Short reads and writes are resubmitted for the rest inside the ring; only a
//! terminal result reaches the caller. Nothing here allocates per op.
//!
//! Invariant 6: in-flight ops are bounded by the completion queue's size, so
//! the CQ cannot overflow; a full submission queue or EBUSY/EAGAIN from
//! `io_uring_enter` means reap first, then retry; an `enter` that failed is
//! treated as "maybe submitted" (the SQEs stay in the ring and their slots stay
//! owned). Dropping the ring drains every op first; if the drain cannot finish,
//! the op table and the buffers in it are leaked rather than freed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::record::{Event, Faults, OpClass, Recorder, Role};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// A set of buffers (one or more segments) that ops read into or write from.
///
/// # Safety
/// An implementation promises that each `segment(i)` for `i < segments()`
/// is valid for reads and writes of its length for as long as the value lives,
/// that the addresses do not change when the value is moved, that segments do
/// not overlap, and that nothing else reads or writes that memory while the
/// value is attached to a [`Ring`] with ops in flight.
pub unsafe trait BufSet: Send {
    fn segments(&self) -> usize;
    /// Address and length of segment `i`.
    fn segment(&self, i: usize) -> (*mut u8, usize);
}

/// Where an op's data is: from byte `offset` of segment `segment` of the set
/// attached at buffer slot `slot`, running on into the following segments
/// when the op is longer than what is left of that one (vectored I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufRef {
    pub slot: u32,
    pub segment: u32,
    pub offset: usize,
}

/// What an op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read `len` bytes at `offset` into the buffer at `buf_offset`. Stops short
    /// only at end of file.
    Read,
    /// Write `len` bytes from the buffer at `buf_offset` to `offset`.
    Write,
    /// `fsync` (data and metadata).
    Fsync,
    /// `fdatasync`.
    Fdatasync,
    /// `fallocate(mode)` over `offset..offset + len`.
    Fallocate { mode: i32 },
    /// `posix_fadvise(advice)` over `offset..offset + len`.
    Fadvise { advice: i32 },
    /// Does nothing; completes at once.
    Nop,
    /// Socket: receive up to `len` bytes into the buffer; completes with
    /// whatever arrived (0: the peer closed its side).
    Recv,
    /// Socket: receive exactly `len` bytes, resubmitting after short
    /// receives; completes short only when the peer closed its side.
    RecvAll,
    /// Socket: send all `len` bytes, resubmitting after short sends.
    Send,
}

impl OpKind {
    /// Ops that move bytes through a buffer.
    fn transfers(self) -> bool {
        matches!(
            self,
            OpKind::Read | OpKind::Write | OpKind::Recv | OpKind::RecvAll | OpKind::Send
        )
    }

    /// Socket ops: no file offset (sockets refuse one).
    fn is_stream(self) -> bool {
        matches!(self, OpKind::Recv | OpKind::RecvAll | OpKind::Send)
    }

    /// Ops that fill the buffer (the others read from it).
    fn fills(self) -> bool {
        matches!(self, OpKind::Read | OpKind::Recv | OpKind::RecvAll)
    }
}

/// One op to hand to the kernel.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub kind: OpKind,
    /// Index of the file in the ring's file table.
    pub file: usize,
    pub offset: u64,
    pub len: u64,
    /// The data, for reads and writes.
    pub buf: Option<BufRef>,
    /// The caller's token, given back in the completion.
    pub tag: u64,
}

/// The terminal result of an op.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub tag: u64,
    /// Bytes transferred (reads: fewer than asked only at end of file), or the
    /// errno.
    pub result: Result<u64, i32>,
    /// The op as it was pushed.
    pub op: Op,
}

struct Slot {
    op: Op,
    /// Bytes already transferred by earlier submissions of this op.
    done: u64,
    retries: u8,
    /// Set when the op could not be built (or a fault was injected); it
    /// then completes through a NOP.
    error: Option<i32>,
    /// Its number in the recorder's log.
    recorded: Option<u64>,
}

/// The most segments one vectored op spans.
pub const MAX_IOV: usize = 65;

/// `user_data` of the ring's own eventfd read.
const WAKE_TAG: u64 = u64::MAX;
/// `user_data` of the ring's own timer, which bounds a wait on kernels
/// without a timed `io_uring_enter` (before 5.11). An op's `user_data` never
/// has these low 32 bits: its slot index is below the ring's capacity.
const TIMER_TAG: u64 = u64::MAX - 1;
/// An op that got -EAGAIN or -EINTR is tried again this many times.
const MAX_RETRIES: u8 = 4;

/// Wakes a ring's owner from [`Ring::run`] when it waits for completions.
#[derive(Clone)]
pub struct Waker {
    fd: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
}

impl Waker {
    /// Wakes the ring if its owner is waiting (one `write(2)` then, none otherwise).
    pub fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let _ = self.fd.write(1);
        }
    }
}

/// `io_uring_enter` refused more work until completions are reaped (EBUSY,
/// EAGAIN): not a failure of the ring (invariant 6).
fn backpressure(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN))
}

/// A failed `io_uring_setup`, with what a user can do about the usual
/// causes: io_uring turned off (`kernel.io_uring_disabled`, or a seccomp
/// filter such as a container runtime's default profile) or absent.
fn explain_setup_error(e: io::Error) -> io::Error {
    let why = match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            "io_uring is turned off for this process: by the sysctl \
             kernel.io_uring_disabled, or by a seccomp filter (a container's \
             default profile blocks it); ubd does its I/O through io_uring"
        }
        Some(libc::ENOSYS) => "this kernel has no io_uring (Linux 5.6 or later has it)",
        _ => return e,
    };
    io::Error::new(e.kind(), format!("{e}: {why}"))
}

/// The ring, its op and buffer tables, and the files and buffer arena
/// registered with it.
pub struct Ring<B: BufSet> {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    /// The iovecs of each op slot's vectored transfer; the kernel reads them
    /// at submission, and they stay put until the slot's op completes.
    iovs: Vec<[libc::iovec; MAX_IOV]>,
    bufs: Vec<Option<B>>,
    /// Ops in flight on each buffer slot.
    busy: Vec<u32>,
    generations: Vec<u32>,
    free: Vec<u32>,
    in_flight: usize,
    /// The files ops name by index; a free index is `None`.
    files: Vec<Option<Arc<File>>>,
    /// Whether each file is in the ring's registered (fixed) file table.
    registered: Vec<bool>,
    /// Ops in flight on each file.
    file_busy: Vec<u32>,
    /// The registered file table has `files.len()` entries (sparse).
    fixed_files: bool,
    /// The registered arena, as (start, len), if registration worked.
    arena: Option<(usize, usize)>,
    /// The kernel has READV_FIXED and WRITEV_FIXED (6.15+).
    vectored_fixed: bool,
    wake_fd: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
    /// The eventfd read's target; boxed so its address is stable.
    wake_buf: Box<u64>,
    wake_armed: bool,
    /// How long `run` polls for completions before it sleeps.
    spin: Duration,
    /// The longest `run` sleeps (none: until something completes).
    wait_limit: Option<Duration>,
    /// The kernel times a wait itself (`IORING_ENTER_EXT_ARG`, 5.11+);
    /// otherwise a timer op bounds it.
    timed_enter: bool,
    /// The timer op's duration; the kernel reads it when the op is submitted.
    timer_ts: Box<types::Timespec>,
    timer_armed: bool,
    roles: Vec<Role>,
    recorder: Option<Arc<Recorder>>,
    faults: Option<Arc<Faults>>,
    /// Keeps the registered arena mapped; declared after `ring`, so it is
    /// dropped after the ring (and after the drain in `Drop`).
    _arena_owner: Option<Arc<dyn Send + Sync>>,
}

impl<B: BufSet> Ring<B> {
    /// A ring for up to `depth` ops in flight over `files` (and up to
    /// `spare_files` more added later with [`Ring::add_file`]), with
    /// `buf_slots` buffer slots. `arena` is memory
    /// that buffers usually live in (the pool), registered as fixed buffer 0;
    /// `keep_arena` keeps it mapped for as long as the ring lives. Registration
    /// that fails (RLIMIT_MEMLOCK, old kernel) falls back to plain ops.
    pub fn new(
        depth: u32,
        buf_slots: usize,
        files: Vec<Arc<File>>,
        spare_files: usize,
        arena: Option<(*mut u8, usize, Arc<dyn Send + Sync>)>,
    ) -> io::Result<Ring<B>> {
        // At least 4: two entries are kept for the eventfd read and the timer.
        let depth = depth.clamp(4, 4096);
        // COOP_TASKRUN: completions are run when the owner enters the ring,
        // not pushed by an interrupt to a thread that is busy anyway; only
        // the owner submits (SINGLE_ISSUER). Older kernels get a plain ring.
        let ring = IoUring::builder()
            .setup_cqsize(depth * 2)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .build(depth)
            .or_else(|_| IoUring::builder().setup_cqsize(depth * 2).build(depth))
            .map_err(explain_setup_error)?;
        let sq = ring.params().sq_entries() as usize;
        let cq = ring.params().cq_entries() as usize;
        // Each slot has at most one SQE queued and one CQE pending, and one
        // entry of each is kept for the eventfd read and one for the timer:
        // so neither queue can overflow (invariant 6).
        let capacity = sq.min(cq) - 2;
        let timed_enter = ring.params().is_feature_ext_arg();
        let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        let table = files.len() + spare_files;
        // A sparse table (5.19+) takes files added later; otherwise only the
        // first files are registered and later ones are used by descriptor.
        let fixed_files = table > 0
            && u32::try_from(table).is_ok_and(|n| {
                ring.submitter().register_files_sparse(n).is_ok()
                    && ring.submitter().register_files_update(0, &fds).is_ok()
            });
        let registered = if fixed_files {
            vec![true; fds.len()]
        } else {
            let ok = !fds.is_empty() && ring.submitter().register_files(&fds).is_ok();
            vec![ok; fds.len()]
        };
        let mut files: Vec<Option<Arc<File>>> = files.into_iter().map(Some).collect();
        let mut registered = registered;
        if fixed_files {
            // The table's free entries, for `add_file`.
            files.resize_with(table, || None);
            registered.resize(table, false);
        }
        let mut arena_owner = None;
        let arena = arena.and_then(|(ptr, len, keep)| {
            let iov = libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            };
            // SAFETY: the arena is valid for `len` bytes and stays mapped while
            // `keep` lives; the ring holds `keep` in `_arena_owner`, which is
            // dropped only after the drain and after the ring itself.
            let registered = unsafe { ring.submitter().register_buffers(&[iov]) };
            registered.ok().map(|()| {
                arena_owner = Some(keep);
                (ptr as usize, len)
            })
        });
        let mut probe = io_uring::Probe::new();
        let vectored_fixed = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::ReadvFixed::CODE)
            && probe.is_supported(opcode::WritevFixed::CODE);
        let wake_fd = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?);
        let generations = vec![0; capacity];
        let mut slots = Vec::with_capacity(capacity);
        slots.resize_with(capacity, || None);
        let mut bufs = Vec::with_capacity(buf_slots);
        bufs.resize_with(buf_slots, || None);
        let no_iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Ok(Ring {
            ring,
            slots,
            iovs: vec![[no_iov; MAX_IOV]; capacity],
            bufs,
            busy: vec![0; buf_slots],
            generations,
            free: (0..capacity as u32).rev().collect(),
            in_flight: 0,
            file_busy: vec![0; files.len()],
            files,
            registered,
            fixed_files,
            arena,
            vectored_fixed,
            wake_fd,
            sleeping: Arc::new(AtomicBool::new(false)),
            wake_buf: Box::new(0),
            wake_armed: false,
            spin: Duration::ZERO,
            wait_limit: None,
            timed_enter,
            timer_ts: Box::new(types::Timespec::new()),
            timer_armed: false,
            roles: Vec::new(),
            recorder: None,
            faults: None,
            _arena_owner: arena_owner,
        })
    }

    /// A handle other threads use to wake this ring's owner.
    pub fn waker(&self) -> Waker {
        Waker {
            fd: self.wake_fd.clone(),
            sleeping: self.sleeping.clone(),
        }
    }

    /// Ops in flight (pushed and not yet terminally completed).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// How many more ops can be pushed now.
    pub fn room(&self) -> usize {
        self.free.len()
    }

    /// Attaches `buf` at buffer slot `slot`; gives it back if the slot is
    /// taken or out of range.
    pub fn attach(&mut self, slot: u32, buf: B) -> Result<(), B> {
        match self.bufs.get_mut(slot as usize) {
            Some(entry @ None) => {
                *entry = Some(buf);
                Ok(())
            }
            _ => Err(buf),
        }
    }

    /// Takes the set at `slot` back; `None` while ops on it are in flight.
    pub fn detach(&mut self, slot: u32) -> Option<B> {
        if *self.busy.get(slot as usize)? > 0 {
            return None;
        }
        self.bufs[slot as usize].take()
    }

    /// The set at `slot`, while no op on it is in flight.
    pub fn buf(&self, slot: u32) -> Option<&B> {
        (*self.busy.get(slot as usize)? == 0)
            .then(|| self.bufs[slot as usize].as_ref())
            .flatten()
    }

    /// The set at `slot`, mutably, while no op on it is in flight.
    pub fn buf_mut(&mut self, slot: u32) -> Option<&mut B> {
        (*self.busy.get(slot as usize)? == 0)
            .then(|| self.bufs[slot as usize].as_mut())
            .flatten()
    }

    /// Adds `file` (a socket, say) to the file table; returns its index, or
    /// gives the file back when the table is full.
    pub fn add_file(&mut self, file: Arc<File>) -> Result<usize, Arc<File>> {
        let index = match self.files.iter().position(Option::is_none) {
            Some(i) => i,
            None if !self.fixed_files => {
                self.files.push(None);
                self.registered.push(false);
                self.file_busy.push(0);
                self.files.len() - 1
            }
            None => return Err(file),
        };
        let fd = file.as_raw_fd();
        self.registered[index] = self.fixed_files
            && u32::try_from(index).is_ok_and(|at| {
                self.ring
                    .submitter()
                    .register_files_update(at, &[fd])
                    .is_ok()
            });
        self.files[index] = Some(file);
        self.file_busy[index] = 0;
        Ok(index)
    }

    /// Takes file `index` out of the table; `None` while ops on it are in
    /// flight (or if there is no such file).
    pub fn remove_file(&mut self, index: usize) -> Option<Arc<File>> {
        if *self.file_busy.get(index)? > 0 {
            return None;
        }
        let file = self.files[index].take()?;
        if std::mem::replace(&mut self.registered[index], false)
            && let Ok(at) = u32::try_from(index)
        {
            let _ = self.ring.submitter().register_files_update(at, &[-1]);
        }
        Some(file)
    }

    /// Ops in flight on file `index`.
    pub fn file_ops(&self, index: usize) -> u32 {
        self.file_busy.get(index).copied().unwrap_or(0)
    }

    /// Queues `op`. Gives it back when the op table is full: reap, then retry.
    /// An op whose buffer or file is wrong completes with an error (EINVAL,
    /// EFAULT, EBADF).
    pub fn push(&mut self, op: Op) -> Result<(), Op> {
        let Some(index) = self.free.pop() else {
            return Err(op);
        };
        if let Some(r) = op.buf
            && let Some(busy) = self.busy.get_mut(r.slot as usize)
        {
            *busy += 1;
        }
        if let Some(busy) = self.file_busy.get_mut(op.file) {
            *busy += 1;
        }
        self.generations[index as usize] = self.generations[index as usize].wrapping_add(1);
        let error = self.injected(&op);
        let recorded = match (&self.recorder, error) {
            (Some(_), None) => self.record(&op),
            _ => None,
        };
        self.slots[index as usize] = Some(Slot {
            op,
            done: 0,
            retries: 0,
            error,
            recorded,
        });
        self.in_flight += 1;
        self.queue_slot(index);
        Ok(())
    }

    /// Sets what each file is to the owner (for the recorder and faults);
    /// files past the end are [`Role::Other`].
    pub fn set_roles(&mut self, roles: Vec<Role>) {
        self.roles = roles;
    }

    /// Logs every write and sync from now on into `recorder`.
    pub fn set_recorder(&mut self, recorder: Option<Arc<Recorder>>) {
        self.recorder = recorder;
    }

    /// Fails the ops `faults` names from now on.
    pub fn set_faults(&mut self, faults: Option<Arc<Faults>>) {
        self.faults = faults;
    }

    fn role(&self, file: usize) -> Role {
        self.roles.get(file).copied().unwrap_or(Role::Other)
    }

    /// The errno an injected fault gives `op`, if one applies.
    fn injected(&self, op: &Op) -> Option<i32> {
        let faults = self.faults.as_ref()?;
        let class = match op.kind {
            OpKind::Read => OpClass::Read,
            OpKind::Write => OpClass::Write,
            OpKind::Fsync | OpKind::Fdatasync => OpClass::Sync,
            OpKind::Fallocate { .. } => OpClass::Fallocate,
            _ => return None,
        };
        faults.check(class, self.role(op.file), op.offset..op.offset + op.len)
    }

    /// Logs `op`'s submission, if it changes a file or syncs one.
    fn record(&self, op: &Op) -> Option<u64> {
        let rec = self.recorder.as_ref()?;
        let role = self.role(op.file);
        let (offset, len) = (op.offset, op.len);
        match op.kind {
            OpKind::Write => {
                let data = self.gather(op.buf?, len)?;
                Some(rec.start(|op| Event::Write {
                    op,
                    role,
                    offset,
                    data,
                }))
            }
            OpKind::Fallocate { mode }
                if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 =>
            {
                Some(rec.start(|op| Event::Zero {
                    op,
                    role,
                    offset,
                    len,
                }))
            }
            OpKind::Fsync | OpKind::Fdatasync => Some(rec.start(|op| Event::Sync { op, role })),
            _ => None,
        }
    }

    /// A copy of the `len` bytes an op would write from `r`.
    fn gather(&self, r: BufRef, len: u64) -> Option<Vec<u8>> {
        let set = self.bufs.get(r.slot as usize)?.as_ref()?;
        let mut out = Vec::with_capacity(usize::try_from(len).ok()?);
        let (mut seg, mut off) = (r.segment as usize, r.offset);
        while (out.len() as u64) < len && seg < set.segments() {
            let (base, seg_len) = set.segment(seg);
            if off < seg_len {
                let take = (seg_len - off).min(len as usize - out.len());
                // SAFETY: `off + take <= seg_len`, so the range lies in the
                // segment, which the attached set keeps valid (BufSet's
                // contract); the op is not submitted yet and the owner cannot
                // reach an attached set, so nothing writes it meanwhile.
                let bytes = unsafe { std::slice::from_raw_parts(base.add(off), take) };
                out.extend_from_slice(bytes);
            }
            off = off.saturating_sub(seg_len);
            seg += 1;
        }
        (out.len() as u64 == len).then_some(out)
    }

    fn user_data(&self, index: u32) -> u64 {
        (u64::from(self.generations[index as usize]) << 32) | u64::from(index)
    }

    /// Builds and pushes the SQE for slot `index` (its first or a resubmission).
    fn queue_slot(&mut self, index: u32) {
        let user_data = self.user_data(index);
        let failed = self.slots[index as usize]
            .as_ref()
            .is_some_and(|s| s.error.is_some());
        let built = if failed {
            Err(libc::EIO)
        } else {
            self.build(index)
        };
        let entry = match built {
            Ok(entry) => entry.user_data(user_data),
            // Completes at once with the error, through a NOP.
            Err(errno) => {
                if let Some(slot) = self.slots[index as usize].as_mut() {
                    slot.error.get_or_insert(errno);
                }
                opcode::Nop::new().build().user_data(user_data)
            }
        };
        self.push_entry(&entry);
    }

    /// Pushes an SQE. The SQ has room for one SQE per slot plus the eventfd
    /// read, and a slot queues its next SQE only after the previous one
    /// completed, so the SQ is never full here.
    fn push_entry(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every buffer an SQE points at is owned by its op table slot
            // (or is `wake_buf` or `timer_ts`, owned by the ring; a new timer is
            // armed only once the old one completed) until the terminal CQE, and
            // the table is only freed after a full drain or leaked (invariants 1, 3).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            // Not reached while the sizing above holds; if it were, submitting
            // frees SQ space without waiting on completions.
            let _ = self.enter(0);
            std::thread::yield_now();
        }
    }

    fn build(&mut self, index: u32) -> Result<squeue::Entry, i32> {
        let slot = self.slots[index as usize].as_ref().ok_or(libc::EINVAL)?;
        let op = &slot.op;
        let file = self
            .files
            .get(op.file)
            .and_then(Option::as_ref)
            .ok_or(libc::EBADF)?;
        // Sockets take no offset: a resubmission goes on from where the
        // stream is.
        let offset = if op.kind.is_stream() {
            0
        } else {
            op.offset + slot.done
        };
        let fd = if self.registered.get(op.file) == Some(&true) {
            None
        } else {
            Some(file.as_raw_fd())
        };
        let entry = match op.kind {
            kind if kind.transfers() => {
                let r = op.buf.ok_or(libc::EFAULT)?;
                let set = self
                    .bufs
                    .get(r.slot as usize)
                    .and_then(Option::as_ref)
                    .ok_or(libc::EFAULT)?;
                if r.segment as usize >= set.segments() {
                    return Err(libc::EFAULT);
                }
                let remaining = u32::try_from(op.len - slot.done).map_err(|_| libc::EINVAL)?;
                if remaining == 0 {
                    // Nothing to move: no iovec is built, so no address
                    // (another op's, or none) goes to the kernel. It
                    // completes with 0 bytes.
                    return Ok(opcode::Nop::new().build());
                }
                // Find where the transfer resumes, then the segments it spans.
                let (mut seg, mut off) = (r.segment as usize, r.offset + slot.done as usize);
                while seg < set.segments() && off >= set.segment(seg).1 {
                    off -= set.segment(seg).1;
                    seg += 1;
                }
                let iov = &mut self.iovs[index as usize];
                let (mut n, mut left) = (0usize, remaining as usize);
                while left > 0 {
                    if seg >= set.segments() || n == MAX_IOV {
                        return Err(libc::EINVAL);
                    }
                    let (base, seg_len) = set.segment(seg);
                    let take = (seg_len - off).min(left);
                    // SAFETY: off < seg_len, so the pointer stays inside the
                    // segment, which the ring's buffer table owns while this
                    // op is in flight.
                    iov[n].iov_base = unsafe { base.add(off) }.cast();
                    iov[n].iov_len = take;
                    n += 1;
                    left -= take;
                    off = 0;
                    seg += 1;
                }
                let ptr = iov[0].iov_base.cast::<u8>();
                let iov_ptr = iov.as_ptr();
                let vectored = n > 1;
                let in_arena = |v: &libc::iovec| {
                    self.arena.is_some_and(|(base, len)| {
                        let p = v.iov_base as usize;
                        p >= base && p + v.iov_len <= base + len
                    })
                };
                let fixed = iov[..n].iter().all(in_arena) && (!vectored || self.vectored_fixed);
                let fills = op.kind.fills();
                macro_rules! rw {
                    ($fd:expr) => {
                        match (fills, fixed) {
                            (true, _) if vectored => opcode::Readv::new($fd, iov_ptr, n as u32)
                                .offset(offset)
                                .build(),
                            (false, _) if vectored => opcode::Writev::new($fd, iov_ptr, n as u32)
                                .offset(offset)
                                .build(),
                            (true, true) => opcode::ReadFixed::new($fd, ptr, remaining, 0)
                                .offset(offset)
                                .build(),
                            (true, false) => opcode::Read::new($fd, ptr, remaining)
                                .offset(offset)
                                .build(),
                            (false, true) => opcode::WriteFixed::new($fd, ptr, remaining, 0)
                                .offset(offset)
                                .build(),
                            (false, false) => opcode::Write::new($fd, ptr, remaining)
                                .offset(offset)
                                .build(),
                        }
                    };
                }
                match fd {
                    None => rw!(types::Fixed(op.file as u32)),
                    Some(fd) => rw!(types::Fd(fd)),
                }
            }
            kind => {
                macro_rules! other {
                    ($fd:expr) => {
                        match kind {
                            OpKind::Fsync => opcode::Fsync::new($fd).build(),
                            OpKind::Fdatasync => opcode::Fsync::new($fd)
                                .flags(types::FsyncFlags::DATASYNC)
                                .build(),
                            OpKind::Fallocate { mode } => opcode::Fallocate::new($fd, op.len)
                                .offset(op.offset)
                                .mode(mode)
                                .build(),
                            OpKind::Fadvise { advice } => {
                                let len = i64::try_from(op.len).map_err(|_| libc::EINVAL)?;
                                opcode::Fadvise::new($fd, len, advice)
                                    .offset(op.offset)
                                    .build()
                            }
                            _ => opcode::Nop::new().build(),
                        }
                    };
                }
                match fd {
                    None => other!(types::Fixed(op.file as u32)),
                    Some(fd) => other!(types::Fd(fd)),
                }
            }
        };
        Ok(entry)
    }

    /// `io_uring_enter`: submits what is queued and waits for `want` CQEs.
    /// EINTR is retried; EBUSY/EAGAIN come back to the caller, who reaps and
    /// retries. Queued SQEs stay owned either way.
    fn enter(&mut self, want: usize) -> io::Result<()> {
        loop {
            let entered = match self.wait_limit {
                Some(limit) if want > 0 && self.timed_enter => {
                    let ts = types::Timespec::from(limit);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    match self.ring.submitter().submit_with_args(want, &args) {
                        // The limit passed with nothing complete.
                        Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(0),
                        r => r,
                    }
                }
                Some(limit) if want > 0 => {
                    self.arm_timer(limit);
                    self.ring.submit_and_wait(want)
                }
                _ => self.ring.submit_and_wait(want),
            };
            match entered {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues a timer op that completes after `limit`, unless one is
    /// pending: its completion ends the wait as any other would.
    fn arm_timer(&mut self, limit: Duration) {
        if self.timer_armed {
            return;
        }
        *self.timer_ts = types::Timespec::from(limit);
        let entry = opcode::Timeout::new(&*self.timer_ts)
            .build()
            .user_data(TIMER_TAG);
        self.push_entry(&entry);
        self.timer_armed = true;
    }

    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let ptr = (&mut *self.wake_buf as *mut u64).cast::<u8>();
        let entry = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), ptr, 8)
            .build()
            .user_data(WAKE_TAG);
        self.push_entry(&entry);
        self.wake_armed = true;
    }

    /// Tells wakers that the owner is about to wait. The owner then checks
    /// its work queue once more and calls `run(true)` only if it is empty; a
    /// producer that queues work and then calls [`Waker::wake`] in between
    /// finds the flag set and writes the eventfd, so no wake-up is lost.
    pub fn announce_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// Submits what is queued, optionally waits until at least one op
    /// completes (or a [`Waker`] wakes the ring), and hands every terminal
    /// completion to `done`. Returns how many it handed over. A wait returns
    /// at once if a waker fired since [`Ring::announce_sleep`].
    pub fn run(&mut self, wait: bool, done: &mut impl FnMut(Completion)) -> io::Result<usize> {
        if wait {
            // Armed first, so that a waker ends a poll as it ends a sleep.
            self.arm_wake();
        }
        let wait = wait && !self.poll_before_sleep()?;
        let want = if wait {
            self.arm_wake();
            self.sleeping.store(true, Ordering::SeqCst);
            1
        } else {
            0
        };
        let mut delivered = 0;
        // Nothing to submit, no wait and no completion work pending in the
        // kernel: the CQ can be read without a syscall.
        let (queued, taskrun) = {
            let sq = self.ring.submission();
            (sq.len(), sq.taskrun())
        };
        let enter = if want == 0 && queued == 0 && !taskrun {
            Ok(())
        } else {
            self.enter(want)
        };
        match enter {
            Ok(()) => {}
            // Backpressure: reap below, and the caller calls again.
            Err(e) if backpressure(&e) => {}
            Err(e) => {
                self.sleeping.store(false, Ordering::SeqCst);
                return Err(e);
            }
        }
        self.sleeping.store(false, Ordering::SeqCst);
        loop {
            let next = self.ring.completion().next();
            let Some(cqe) = next else { break };
            delivered += self.complete(cqe, done);
        }
        Ok(delivered)
    }

    /// SQEs queued and not yet submitted.
    pub fn queued(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// Submits the SQEs queued so far without waiting for anything, so the
    /// host can start on them while the owner works through the rest of a
    /// batch of completions. Backpressure (EBUSY/EAGAIN) leaves them queued
    /// for the next [`Ring::run`].
    pub fn submit_queued(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.enter(0) {
            Err(e) if backpressure(&e) => Ok(()),
            r => r,
        }
    }

    /// Sets the longest a waiting [`Ring::run`] sleeps with nothing
    /// completing (`None`: no limit).
    pub fn set_wait_limit(&mut self, limit: Option<Duration>) {
        self.wait_limit = limit;
    }

    /// Bytes the op tagged `tag` has moved so far, if it is in flight (a
    /// send or receive goes on in several submissions).
    pub fn progress_of(&self, tag: u64) -> Option<u64> {
        self.slots
            .iter()
            .flatten()
            .find(|s| s.op.tag == tag)
            .map(|s| s.done)
    }

    /// Sets how long [`Ring::run`] polls for a completion before it sleeps
    /// (zero: it sleeps at once). Polling saves the wake-up of a sleeping
    /// thread when completions come quickly one at a time (a client at
    /// queue depth 1), at the price of the CPU it spins.
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Before a wait: submits what is queued and polls for up to `spin` for
    /// a completion (a waker's counts: its eventfd read is armed). True when
    /// the wait is no longer needed.
    fn poll_before_sleep(&mut self) -> io::Result<bool> {
        if self.spin.is_zero() {
            return Ok(false);
        }
        if !self.ring.submission().is_empty() {
            match self.enter(0) {
                Ok(()) => {}
                Err(e) if backpressure(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let start = Instant::now();
        loop {
            if !self.ring.completion().is_empty() {
                return Ok(true);
            }
            if self.ring.submission().taskrun() {
                // Completion work is waiting in the kernel: run it. Under
                // backpressure, stop polling: the caller reaps first.
                match self.enter(0) {
                    Ok(()) => continue,
                    Err(e) if backpressure(&e) => return Ok(true),
                    Err(e) => return Err(e),
                }
            }
            if start.elapsed() >= self.spin {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    fn complete(&mut self, cqe: cqueue::Entry, done: &mut impl FnMut(Completion)) -> usize {
        let user_data = cqe.user_data();
        if user_data == WAKE_TAG {
            self.wake_armed = false;
            return 0;
        }
        if user_data == TIMER_TAG {
            self.timer_armed = false;
            return 0;
        }
        let index = (user_data & 0xFFFF_FFFF) as u32;
        let generation = (user_data >> 32) as u32;
        if self.generations.get(index as usize) != Some(&generation) {
            return 0;
        }
        let Some(slot) = self.slots[index as usize].as_mut() else {
            return 0;
        };
        let res = cqe.result();
        let transfer = slot.op.kind.transfers();
        let outcome = if let Some(errno) = slot.error {
            Err(errno)
        } else if res == -libc::EAGAIN || res == -libc::EINTR {
            slot.retries += 1;
            if slot.retries <= MAX_RETRIES {
                self.queue_slot(index);
                return 0;
            }
            Err(-res)
        } else if res < 0 {
            Err(-res)
        } else if transfer {
            slot.done += res as u64;
            let short = slot.done < slot.op.len;
            match (slot.op.kind, res) {
                // End of file (or of the peer's stream): a read stops short.
                (OpKind::Read | OpKind::RecvAll, 0) => Ok(slot.done),
                // A receive takes whatever arrived.
                (OpKind::Recv, _) => Ok(slot.done),
                (OpKind::Write | OpKind::Send, 0) if short => Err(libc::EIO),
                _ if short => {
                    self.queue_slot(index);
                    return 0;
                }
                _ => Ok(slot.done),
            }
        } else {
            Ok(res as u64)
        };
        // Terminal: move the result out and free the slot before telling the
        // owner (invariant 1: nothing here touches the op after `done`).
        let slot = self.slots[index as usize].take();
        self.free.push(index);
        self.in_flight -= 1;
        let Some(slot) = slot else {
            return 0;
        };
        if let Some(r) = slot.op.buf
            && let Some(busy) = self.busy.get_mut(r.slot as usize)
        {
            *busy -= 1;
        }
        if let Some(busy) = self.file_busy.get_mut(slot.op.file) {
            *busy -= 1;
        }
        if let (Some(rec), Some(op), Ok(_)) = (&self.recorder, slot.recorded, outcome) {
            rec.done(op);
        }
        done(Completion {
            tag: slot.op.tag,
            result: outcome,
            op: slot.op,
        });
        1
    }

    /// Waits for every op in flight and hands over their completions.
    pub fn drain(&mut self, done: &mut impl FnMut(Completion)) -> io::Result<()> {
        while self.in_flight > 0 {
            self.run(true, done)?;
        }
        Ok(())
    }
}

impl<B: BufSet> Drop for Ring<B> {
    fn drop(&mut self) {
        // Invariant 3: nothing is released while the kernel may still use it.
        if self.drain(&mut drop).is_err() || self.in_flight > 0 {
            let bufs = std::mem::take(&mut self.bufs);
            std::mem::forget(bufs);
            return;
        }
        // Drained: unregister now, synchronously. Left to the ring's
        // asynchronous teardown, the registered files would keep the image
        // files (and their OFD locks) open for a while after we are gone,
        // and the next opener (ubd, qemu-img, UML) would find them locked.
        let submitter = self.ring.submitter();
        if self.registered.iter().any(|&r| r) || self.fixed_files {
            let _ = submitter.unregister_files();
        }
        if self.arena.is_some() {
            let _ = submitter.unregister_buffers();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::aligned::AlignedBuf;
    use std::io::Write;

    fn ring_over(data: &[u8]) -> (tempfile::NamedTempFile, Ring<AlignedBuf>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(f.path())
                .unwrap(),
        );
        let ring = Ring::new(8, 4, vec![file], 0, None).unwrap();
        (f, ring)
    }

    fn op(kind: OpKind, offset: u64, len: u64, slot: Option<u32>, tag: u64) -> Op {
        Op {
            kind,
            file: 0,
            offset,
            len,
            buf: slot.map(|slot| BufRef {
                slot,
                segment: 0,
                offset: 0,
            }),
            tag,
        }
    }

    fn collect(ring: &mut Ring<AlignedBuf>) -> Vec<Completion> {
        let mut out = Vec::new();
        ring.drain(&mut |c| out.push(c)).unwrap();
        out
    }

    #[test]
    fn writes_then_reads_back_and_stops_short_at_eof() {
        let (_f, mut ring) = ring_over(&[0u8; 8192]);
        let mut buf = AlignedBuf::new(4096, 4096).unwrap();
        buf.as_mut_slice().fill(0x5A);
        ring.attach(0, buf).unwrap();
        ring.push(op(OpKind::Write, 4096, 4096, Some(0), 1))
            .unwrap();
        // Busy: neither readable nor detachable while the write is in flight.
        assert!(ring.buf(0).is_none() && ring.detach(0).is_none());
        ring.push(op(OpKind::Fdatasync, 0, 0, None, 2)).unwrap();
        let done = collect(&mut ring);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert!(ring.detach(0).is_some());
        ring.attach(1, AlignedBuf::new(8192, 4096).unwrap())
            .unwrap();
        ring.push(op(OpKind::Read, 2048, 8192, Some(1), 3)).unwrap();
        let done = collect(&mut ring);
        assert_eq!(done[0].tag, 3);
        assert_eq!(done[0].result, Ok(6144));
        let data = ring.buf(1).unwrap().as_slice();
        assert!(data[..2048].iter().all(|&b| b == 0));
        assert!(data[2048..6144].iter().all(|&b| b == 0x5A));
    }

    /// Two buffers as one set of two segments.
    #[derive(Debug)]
    struct Pair([AlignedBuf; 2]);

    // SAFETY: two distinct heap allocations owned by the value.
    unsafe impl BufSet for Pair {
        fn segments(&self) -> usize {
            2
        }
        fn segment(&self, i: usize) -> (*mut u8, usize) {
            self.0[i.min(1)].segment(0)
        }
    }

    #[test]
    fn an_op_spans_segments_with_vectored_io() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        let file = Arc::new(std::fs::File::open(f.path()).unwrap());
        let mut ring: Ring<Pair> = Ring::new(8, 1, vec![file], 0, None).unwrap();
        let pair = Pair([
            AlignedBuf::new(4096, 4096).unwrap(),
            AlignedBuf::new(4096, 4096).unwrap(),
        ]);
        ring.attach(0, pair).unwrap();
        // 6144 bytes from offset 1024: 3072 into the first, 3072 into the second.
        let mut read = op(OpKind::Read, 1024, 6144, Some(0), 1);
        read.buf = Some(BufRef {
            slot: 0,
            segment: 0,
            offset: 1024,
        });
        ring.push(read).unwrap();
        let mut done = Vec::new();
        ring.drain(&mut |c| done.push(c)).unwrap();
        assert_eq!(done[0].result, Ok(6144));
        let pair = ring.detach(0).unwrap();
        assert_eq!(&pair.0[0].as_slice()[1024..], &data[1024..4096]);
        assert_eq!(&pair.0[1].as_slice()[..3072], &data[4096..7168]);
        // Past the last segment: EINVAL.
        ring.attach(0, pair).unwrap();
        let mut long = op(OpKind::Read, 0, 8193, Some(0), 2);
        long.buf = Some(BufRef {
            slot: 0,
            segment: 0,
            offset: 0,
        });
        ring.push(long).unwrap();
        let mut done = Vec::new();
        ring.drain(&mut |c| done.push(c)).unwrap();
        assert_eq!(done[0].result, Err(libc::EINVAL));
    }

    #[test]
    fn bad_ops_complete_with_an_error() {
        let (_f, mut ring) = ring_over(&[0u8; 512]);
        ring.attach(0, AlignedBuf::new(512, 512).unwrap()).unwrap();
        ring.push(op(OpKind::Read, 0, 1024, Some(0), 1)).unwrap();
        ring.push(op(OpKind::Read, 0, 512, None, 2)).unwrap();
        let mut bad_file = op(OpKind::Fsync, 0, 0, None, 3);
        bad_file.file = 7;
        ring.push(bad_file).unwrap();
        ring.push(op(OpKind::Read, 0, 512, Some(3), 4)).unwrap();
        let mut done = collect(&mut ring);
        done.sort_by_key(|c| c.tag);
        let errs: Vec<_> = done.iter().map(|c| c.result).collect();
        assert_eq!(
            errs,
            vec![
                Err(libc::EINVAL),
                Err(libc::EFAULT),
                Err(libc::EBADF),
                Err(libc::EFAULT)
            ]
        );
        assert!(ring.attach(0, AlignedBuf::new(1, 1).unwrap()).is_err());
        assert!(ring.attach(9, AlignedBuf::new(1, 1).unwrap()).is_err());
    }

    /// A transfer of no bytes names no memory: it completes with 0, and is
    /// not handed to the kernel with the address of some other op's buffer
    /// (or none, which a fixed-buffer op refuses with EFAULT).
    #[test]
    fn transfers_of_no_bytes_complete_with_zero() {
        let (_f, mut ring) = ring_over(&[0u8; 4096]);
        ring.attach(0, AlignedBuf::new(4096, 4096).unwrap())
            .unwrap();
        ring.push(op(OpKind::Write, 0, 0, Some(0), 1)).unwrap();
        ring.push(op(OpKind::Read, 512, 0, Some(0), 2)).unwrap();
        let mut done = collect(&mut ring);
        done.sort_by_key(|c| c.tag);
        let results: Vec<_> = done.iter().map(|c| c.result).collect();
        assert_eq!(results, vec![Ok(0), Ok(0)]);
    }

    #[test]
    fn the_table_bounds_ops_in_flight() {
        let (_f, mut ring) = ring_over(&[0u8; 512]);
        let room = ring.room();
        assert!(room >= 1);
        for tag in 0..room as u64 {
            ring.push(op(OpKind::Nop, 0, 0, None, tag)).unwrap();
        }
        let refused = ring.push(op(OpKind::Nop, 0, 0, None, 99)).unwrap_err();
        assert_eq!(refused.tag, 99);
        assert_eq!(collect(&mut ring).len(), room);
        assert_eq!(ring.in_flight(), 0);
        ring.push(refused).unwrap();
        assert_eq!(collect(&mut ring).len(), 1);
    }

    #[test]
    fn socket_ops_receive_some_receive_all_and_send_all() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut ring: Ring<AlignedBuf> = Ring::new(8, 3, Vec::new(), 2, None).unwrap();
        let sock = ring
            .add_file(Arc::new(std::fs::File::from(std::os::fd::OwnedFd::from(
                ours,
            ))))
            .unwrap();
        let stream_op = |kind, slot, len, tag| Op {
            kind,
            file: sock,
            offset: 0,
            len,
            buf: Some(BufRef {
                slot,
                segment: 0,
                offset: 0,
            }),
            tag,
        };
        // A receive completes with what has arrived.
        theirs.write_all(b"hello").unwrap();
        ring.attach(0, AlignedBuf::new(4096, 4096).unwrap())
            .unwrap();
        ring.push(stream_op(OpKind::Recv, 0, 4096, 1)).unwrap();
        let done = collect(&mut ring);
        assert_eq!(done[0].result, Ok(5));
        assert_eq!(&ring.buf(0).unwrap().as_slice()[..5], b"hello");
        // A receive-all waits for every byte, across several sends.
        ring.attach(1, AlignedBuf::new(8192, 4096).unwrap())
            .unwrap();
        ring.push(stream_op(OpKind::RecvAll, 1, 6000, 2)).unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..6 {
                theirs.write_all(&[7u8; 1000]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            theirs
        });
        let done = collect(&mut ring);
        let mut theirs = writer.join().unwrap();
        assert_eq!(done[0].result, Ok(6000));
        assert!(
            ring.buf(1).unwrap().as_slice()[..6000]
                .iter()
                .all(|&b| b == 7)
        );
        // A send puts out every byte; the file stays while ops use it.
        let mut out = AlignedBuf::new(1 << 20, 4096).unwrap();
        out.as_mut_slice().fill(9);
        ring.attach(2, out).unwrap();
        ring.push(stream_op(OpKind::Send, 2, 1 << 20, 3)).unwrap();
        assert_eq!(ring.file_ops(sock), 1);
        assert!(ring.remove_file(sock).is_none());
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 1 << 20];
            theirs.read_exact(&mut got).unwrap();
            assert!(got.iter().all(|&b| b == 9));
            theirs
        });
        let done = collect(&mut ring);
        assert_eq!(done[0].result, Ok(1 << 20));
        let theirs = reader.join().unwrap();
        // The peer's close ends a receive-all short, and a receive with 0.
        drop(theirs);
        ring.push(stream_op(OpKind::RecvAll, 1, 100, 4)).unwrap();
        ring.push(stream_op(OpKind::Recv, 0, 100, 5)).unwrap();
        let mut done = collect(&mut ring);
        done.sort_by_key(|c| c.tag);
        assert_eq!((done[0].result, done[1].result), (Ok(0), Ok(0)));
        assert!(ring.remove_file(sock).is_some());
        let again = ring.add_file(Arc::new(tempfile::tempfile().unwrap()));
        assert_eq!(again.ok(), Some(sock), "a freed index is reused");
    }

    #[test]
    fn a_waker_ends_a_wait() {
        let (_f, mut ring) = ring_over(&[0u8; 512]);
        let waker = ring.waker();
        let t = std::thread::spawn(move || {
            for _ in 0..50 {
                std::thread::sleep(std::time::Duration::from_millis(10));
                waker.wake();
            }
        });
        // Returns once woken, with nothing completed.
        let n = ring.run(true, &mut |_| {}).unwrap();
        assert_eq!(n, 0);
        t.join().unwrap();
    }

    #[test]
    fn a_wait_limit_ends_a_wait_with_or_without_the_kernels_timed_wait() {
        for timed in [true, false] {
            let (_f, mut ring) = ring_over(&[0u8; 512]);
            // Without: as on kernels before 5.11, a timer op bounds the wait.
            ring.timed_enter &= timed;
            ring.set_wait_limit(Some(Duration::from_millis(20)));
            // A watchdog wakes the ring if a wait is not bounded (and keeps
            // waking it, so the test ends), and says so.
            let waker = ring.waker();
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let dog = std::thread::spawn(move || {
                let mut hung = false;
                let mut patience = Duration::from_secs(60);
                while rx.recv_timeout(patience).is_err() {
                    hung = true;
                    patience = Duration::from_millis(100);
                    waker.wake();
                }
                hung
            });
            // Three waits in a row: the timer is armed again after it fired.
            for _ in 0..3 {
                ring.announce_sleep();
                assert_eq!(ring.run(true, &mut |_| {}).unwrap(), 0);
            }
            tx.send(()).unwrap();
            assert!(
                !dog.join().unwrap(),
                "a wait was not bounded (timed: {timed})"
            );
            // The limit lifted, the ring still completes ops as before.
            ring.set_wait_limit(None);
            ring.attach(0, AlignedBuf::new(512, 512).unwrap()).unwrap();
            ring.push(op(OpKind::Read, 0, 512, Some(0), 7)).unwrap();
            let done = collect(&mut ring);
            assert_eq!((done.len(), done[0].tag, done[0].result), (1, 7, Ok(512)));
        }
    }
}
