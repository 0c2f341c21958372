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
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::record::{Faults, Recorder, Role};
use nix::sys::eventfd::{EfdFlags, EventFd};

mod build;
mod hooks;
mod op;
mod wait;

pub use op::{BufRef, BufSet, Completion, Op, OpKind};

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

    /// Bytes the op tagged `tag` has moved so far, if it is in flight (a
    /// send or receive goes on in several submissions).
    pub fn progress_of(&self, tag: u64) -> Option<u64> {
        self.slots
            .iter()
            .flatten()
            .find(|s| s.op.tag == tag)
            .map(|s| s.done)
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
mod tests;
