//! The hand-over to the worker from other threads: requests from
//! `Device::submit`, queued in ticket order (invariant 5), and connections
//! from `Device::serve`. The worker takes them on each pass of its loop, and
//! before it starts a connection's request it drains the queue
//! (`take_requests_into`), so no request with an earlier ticket is overtaken.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;

use super::conn::{ConnEnd, NewConn};
use super::worker::Origin;
use super::{Request, Sink};

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
    pub(super) fn shut(&self, errno: Errno) {
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
            nc.done.set(ConnEnd::Broken(format!(
                "the device stopped: {}",
                errno.desc()
            )));
        }
    }

    /// Moves queued requests to `local` (in order) and returns queued
    /// connections.
    pub(super) fn take_into(&self, local: &mut VecDeque<(Request, Origin)>) -> Vec<NewConn> {
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

    pub(super) fn is_empty(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }
}
