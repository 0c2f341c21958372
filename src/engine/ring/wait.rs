//! Entering the kernel: submitting, waiting for completions with an
//! optional limit (the kernel's timed wait, or a timer op), polling before
//! a sleep, and the eventfd read a [`Waker`](super::Waker) ends a wait with.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::{BufSet, Completion, Ring, TIMER_TAG, WAKE_TAG, backpressure};

impl<B: BufSet> Ring<B> {
    /// `io_uring_enter`: submits what is queued and waits for `want` CQEs.
    /// EINTR is retried; EBUSY/EAGAIN come back to the caller, who reaps and
    /// retries. Queued SQEs stay owned either way.
    pub(super) fn enter(&mut self, want: usize) -> io::Result<()> {
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
        if let Some(errno) = self.faults.as_ref().and_then(|f| f.ring_failure()) {
            return Err(io::Error::from_raw_os_error(errno));
        }
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
}
