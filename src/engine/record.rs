//! Test engines beneath the device: a recorder of every write and sync the
//! ring issues (in the spirit of dm-log-writes and CrashMonkey), from which a
//! test builds the states a power cut could leave; and a fault injector that
//! makes chosen ops fail with a chosen errno (EIO from a disk, say), or the
//! ring itself fail as a failed `io_uring_enter` would.
//!
//! Both see ops by the *role* of their file, which the ring's owner sets
//! ([`Role`]): the device's overlay is opened twice (data, and bitmap), and a
//! crash state or a fault cares about the file, not the handle.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::PoisonError;

/// What a file of the ring is to its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The file the device writes: the overlay, or a raw image.
    Main,
    /// The backing file (read only).
    Backing,
    /// Anything else (a client's socket).
    Other,
}

/// One thing that happened, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A write was submitted: once done (or torn by a power cut) the file
    /// holds `data` at `offset`.
    Write {
        op: u64,
        role: Role,
        offset: u64,
        data: Vec<u8>,
    },
    /// A hole punch or zeroing of `len` bytes at `offset` was submitted.
    Zero {
        op: u64,
        role: Role,
        offset: u64,
        len: u64,
    },
    /// An fsync or fdatasync was submitted.
    Sync { op: u64, role: Role },
    /// Op `op` completed successfully.
    Done { op: u64 },
    /// A mark the test put in the log (a request's start or end, say).
    Mark(u64),
}

/// The log of a ring's writes and syncs.
#[derive(Debug, Default)]
pub struct Recorder {
    state: Mutex<(u64, Vec<Event>)>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Appends a mark.
    pub fn mark(&self, mark: u64) {
        self.lock().1.push(Event::Mark(mark));
    }

    /// Everything logged so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().1.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<Event>)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs an op's submission (the event made from its number); returns
    /// the number.
    pub(super) fn start(&self, event: impl FnOnce(u64) -> Event) -> u64 {
        let mut st = self.lock();
        let op = st.0;
        st.0 += 1;
        st.1.push(event(op));
        op
    }

    pub(super) fn done(&self, op: u64) {
        self.lock().1.push(Event::Done { op });
    }
}

/// Which ops a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    Read,
    Write,
    /// fsync and fdatasync.
    Sync,
    /// Hole punching, zeroing, preallocation.
    Fallocate,
}

/// A fault: ops of `class` on a file of `role` that touch `range` fail with
/// `errno`, at most `times` times (`None`: always).
#[derive(Debug, Clone)]
pub struct Fault {
    pub class: OpClass,
    pub role: Role,
    pub range: Range<u64>,
    pub errno: i32,
    pub times: Option<u32>,
}

/// The faults a ring injects, changeable while it runs.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<Fault>>,
    /// Ops failed so far.
    hits: Mutex<u64>,
    /// The errno the ring's next run fails with, once.
    ring: Mutex<Option<i32>>,
}

impl Faults {
    pub fn new() -> Faults {
        Faults::default()
    }

    pub fn add(&self, fault: Fault) {
        self.rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(fault);
    }

    pub fn clear(&self) {
        self.rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Makes the ring's next run fail with `errno`, as a failed
    /// `io_uring_enter` does: the ring's owner can then make no progress.
    pub fn fail_ring(&self, errno: i32) {
        *self.ring.lock().unwrap_or_else(PoisonError::into_inner) = Some(errno);
    }

    /// The errno the ring fails with now, if [`Faults::fail_ring`] asked
    /// for it since the last call.
    pub(super) fn ring_failure(&self) -> Option<i32> {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Ops failed by a fault so far.
    pub fn hits(&self) -> u64 {
        *self.hits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The errno an op of `class` on `role` over `range` fails with, if a
    /// fault applies (and counts it).
    pub(super) fn check(&self, class: OpClass, role: Role, range: Range<u64>) -> Option<i32> {
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = rules.iter_mut().find(|f| {
            f.class == class
                && f.role == role
                && f.times != Some(0)
                && (class == OpClass::Sync
                    || (range.start < f.range.end && f.range.start < range.end))
        })?;
        if let Some(t) = hit.times.as_mut() {
            *t -= 1;
        }
        let errno = hit.errno;
        drop(rules);
        *self.hits.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Some(errno)
    }
}
