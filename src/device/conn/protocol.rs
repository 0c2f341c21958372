//! What a protocol sees of a connection: the [`Protocol`] it implements,
//! the [`Step`]s it answers with, the [`ConnCx`] it allocates buffers and
//! writes replies through while it reads, and how a connection ends
//! ([`ConnEnd`], [`ConnDone`]).

use std::sync::{Condvar, Mutex, PoisonError};

use nix::errno::Errno;

use super::memline::MemLine;
use crate::device::{Reply, Request, chunks_for};
use crate::engine::bufpool::{BufPool, Chunks};
use crate::engine::sendbuf::SendBuf;

/// What a protocol asks of the device after reading some input.
// `Request` holds its `Chunks` inline so that no request allocates; boxing
// it would bring that allocation back.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Step {
    /// `n` bytes of input were used up; nothing for the device.
    Consumed(usize),
    /// `consumed` bytes were used, and `req` goes to the device. A WRITE's
    /// `payload` bytes follow in the input: the device receives them into
    /// `req.data` at byte `req.offset % 512` first.
    Submit {
        consumed: usize,
        req: Request,
        payload: u64,
    },
    /// `consumed` bytes were used, and the `skip` bytes after them are to be
    /// read and thrown away (a refused WRITE's payload);
    /// [`Protocol::skipped`] is called when they have been.
    Skip { consumed: usize, skip: u64 },
    /// More input is needed.
    NeedInput,
    /// [`ConnCx::alloc`] found no memory; asked again when memory returns.
    NoMemory,
    /// Too much is owed to the client; asked again after a reply goes out
    /// or a request ends.
    Wait,
    /// Stop reading and close once everything started is answered; `why`
    /// is `None` for a clean end (the client said goodbye).
    Close {
        consumed: usize,
        why: Option<String>,
    },
}

/// A client protocol spoken over a socket the device serves.
pub trait Protocol: Send {
    /// Reads requests from `input` (received, not yet used) and acts
    /// through `cx`; called again while it returns `Consumed` or `Submit`.
    fn input(&mut self, input: &[u8], cx: &mut ConnCx<'_>) -> Step;

    /// A request this connection submitted ended; its reply goes into `out`.
    /// `Some(why)` when the connection cannot go on (a reply began and
    /// cannot be finished).
    fn complete(
        &mut self,
        token: u64,
        result: Result<Reply, Errno>,
        out: &mut SendBuf,
    ) -> Option<String>;

    /// Input ended (the peer closed, or the connection is closing): a
    /// request partly submitted gets its remaining parts failed, so that
    /// everything owed is answered.
    fn input_ended(&mut self, out: &mut SendBuf);

    /// The bytes a [`Step::Skip`] asked to skip have been read.
    fn skipped(&mut self, out: &mut SendBuf);

    /// The server is shutting down: requests read from now on are refused
    /// (a request partly submitted goes on).
    fn stop(&mut self);

    /// The connection may close after `stop`: nothing is owed to the
    /// client, no request is partly submitted, and the client is not about
    /// to end it itself (NBD: it got no ESHUTDOWN, which asks it for DISC).
    fn drained(&self) -> bool;
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEnd {
    /// The protocol closed it cleanly (the client said goodbye).
    Done,
    /// The peer closed the connection between requests.
    Closed,
    /// The server shut it down after answering everything it read.
    Stopped,
    /// It could not go on.
    Broken(String),
}

/// A connection's end, for the thread that handed it over.
#[derive(Default)]
pub struct ConnDone {
    end: Mutex<Option<ConnEnd>>,
    cv: Condvar,
}

impl ConnDone {
    pub(in crate::device) fn set(&self, end: ConnEnd) {
        let mut slot = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(end);
        }
        self.cv.notify_all();
    }

    /// Blocks until the connection has ended and its socket is closed (by
    /// the device; the caller may hold other handles on it).
    pub fn wait(&self) -> ConnEnd {
        let mut slot = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(end) = slot.as_ref() {
                return end.clone();
            }
            slot = self.cv.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// What a protocol may use while it reads input.
pub struct ConnCx<'a> {
    pub(super) pool: &'a BufPool,
    pub(super) line: &'a mut MemLine,
    pub(super) conn: u32,
    pub(super) max_io: u64,
    pub(super) unsent: usize,
    pub(super) unsent_heads: usize,
    pub(super) out: &'a mut SendBuf,
}

impl ConnCx<'_> {
    /// Buffers for a READ or WRITE of `len` bytes at `offset`, never
    /// waiting: `None` when memory is short (then return [`Step::NoMemory`]),
    /// or when `len` is more than one request takes.
    pub fn alloc(&mut self, offset: u64, len: u64) -> Option<Chunks> {
        let n = chunks_for(offset, len, self.max_io, self.pool.chunk_size()).ok()?;
        let ahead = self.line.head().is_some_and(|h| h != self.conn);
        if !ahead
            && let Some(c) = self
                .pool
                .try_alloc(n)
                .or_else(|| self.pool.try_alloc_head(n))
        {
            self.line.leave(self.conn);
            return Some(c);
        }
        self.line.join(self.conn, n);
        self.pool.notify_free();
        None
    }

    /// Replies that need no device request go here.
    pub fn out(&mut self) -> &mut SendBuf {
        self.out
    }

    /// Bytes of the buffer pool free now.
    pub fn pool_free(&self) -> u64 {
        (self.pool.free_chunks() * self.pool.chunk_size()) as u64
    }

    /// Reply bytes queued or being sent, not yet taken by the socket.
    pub fn unsent(&self) -> usize {
        self.unsent + self.out.bytes()
    }

    /// Of those, the bytes of reply headers and small replies, which are
    /// held in the connection's own memory (READ data is in pool chunks).
    pub fn unsent_heads(&self) -> usize {
        self.unsent_heads + self.out.head_bytes()
    }
}
