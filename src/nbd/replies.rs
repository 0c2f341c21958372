//! A connection's reply side: the queue the request reader and the device
//! feed, and the writer thread that turns it into replies on the socket.
//!
//! The reader announces each request ([`Out::Begin`]) before any of its parts
//! reaches the device, so the writer always knows a request before its first
//! completion ([`Out::Piece`]). Replies go out as requests complete, in any
//! order; many replies are gathered into one `writev`, and READ data goes to
//! the socket straight from the pool buffers the device filled. A READ larger
//! than the device takes in one request arrives in pieces: with structured
//! replies each piece is its own data chunk; with simple replies (or `DF`)
//! the pieces go out in order as one run.
//!
//! Invariant 3: the connection counts requests in flight (announced, reply not
//! yet written); the reader waits for zero before it lets the connection go,
//! and a request's pool buffers are dropped (returned) only after the device
//! reported its end.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use nix::errno::Errno;

use crate::device::{Extent, Reply, Sink};
use crate::engine::bufpool::Chunks;

use super::codec::reply::{self as wire, ChunkHead, ChunkStyle};
use super::codec::{self, cmd, errno};
use super::export::{BASE_ALLOCATION_ID, Contexts};
use super::handshake::Style;
use super::stream::Stream;

/// `base:allocation` flags.
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// A request the device will answer, as the writer needs to know it.
#[derive(Debug)]
pub struct Pending {
    pub cookie: u64,
    pub command: u16,
    pub offset: u64,
    pub len: u64,
    /// Device requests it was cut into (at least one), each `piece_size`
    /// bytes but the last.
    pub pieces: u32,
    pub piece_size: u64,
    /// READ: the data must go out as one run, in order (simple replies or DF).
    pub contiguous: bool,
    /// BLOCK_STATUS: the contexts to answer, and REQ_ONE.
    pub contexts: Contexts,
    pub req_one: bool,
}

/// Per-request progress the writer keeps.
struct Progress {
    req: Pending,
    done: u32,
    /// The first failure: errno and the offset of the failing piece.
    error: Option<(Errno, u64)>,
    /// Contiguous READ: the next piece to send, whether the header went, and
    /// pieces that came before their turn.
    next: u32,
    header_sent: bool,
    held: Vec<Option<Chunks>>,
}

/// One message to the writer.
// `Chunks` keeps its indices inline so that no request allocates.
#[allow(clippy::large_enum_variant)]
pub enum Out {
    /// A reply the reader decided without the device.
    Now {
        cookie: u64,
        command: u16,
        /// NBD errno (0: success, no data).
        error: u32,
        message: &'static str,
    },
    /// A request whose pieces the device will complete, with its id.
    Begin { id: u64, req: Pending },
    /// The end of one piece: token `id << 16 | piece`.
    Piece {
        token: u64,
        result: Result<Reply, Errno>,
    },
}

/// Replies a writer batch finished, and the READ bytes they owed.
#[derive(Debug, Default, Clone, Copy)]
struct Finished {
    replies: usize,
    read_bytes: u64,
}

/// Token of piece `piece` of request `id`.
pub fn token(id: u64, piece: u32) -> u64 {
    id << 16 | u64::from(piece)
}

#[derive(Default)]
struct State {
    queue: VecDeque<Out>,
    writer_waiting: bool,
    reader_waiting: bool,
    /// Replies owed (announced with `Now` or `Begin`, not yet finished).
    in_flight: usize,
    /// READ bytes owed: pool buffers the connection holds or will.
    read_bytes: u64,
    /// The reader is done: the writer ends once nothing is owed.
    closing: bool,
}

/// The state the reader, the writer and the device share.
#[derive(Default)]
pub struct Shared {
    state: Mutex<State>,
    writer_cv: Condvar,
    reader_cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push_locked(&self, st: &mut State, out: Out) {
        st.queue.push_back(out);
        if st.writer_waiting {
            st.writer_waiting = false;
            self.writer_cv.notify_one();
        }
    }

    /// Announces a reply (a `Now` or a `Begin`), first waiting while `limit`
    /// replies are already owed, or while the READ bytes owed plus
    /// `read_bytes` would pass `budget` (one READ alone always goes).
    /// `before_wait` runs (unlocked) once before any wait.
    pub fn announce(
        &self,
        out: Out,
        limit: usize,
        read_bytes: u64,
        budget: u64,
        before_wait: impl FnOnce(),
    ) {
        let over = |st: &State| {
            st.in_flight >= limit || st.read_bytes > 0 && st.read_bytes + read_bytes > budget
        };
        let mut st = self.lock();
        if over(&st) {
            drop(st);
            before_wait();
            st = self.lock();
        }
        while over(&st) {
            st.reader_waiting = true;
            st = self
                .reader_cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.in_flight += 1;
        st.read_bytes += read_bytes;
        self.push_locked(&mut st, out);
    }

    /// Reports a piece's end (from the reader, when it never reached the device).
    pub fn piece(&self, token: u64, result: Result<Reply, Errno>) {
        let mut st = self.lock();
        self.push_locked(&mut st, Out::Piece { token, result });
    }

    /// Waits until every owed reply is written (or dropped), then tells the
    /// writer to end.
    pub fn drain_and_close(&self) {
        let mut st = self.lock();
        while st.in_flight > 0 {
            st.reader_waiting = true;
            st = self
                .reader_cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.closing = true;
        st.writer_waiting = false;
        self.writer_cv.notify_one();
    }

    /// Takes everything queued into `work`; `None` when the writer should end.
    fn take(&self, work: &mut VecDeque<Out>, finished: Finished) -> Option<()> {
        let mut st = self.lock();
        st.in_flight -= finished.replies;
        st.read_bytes -= finished.read_bytes;
        let finished = finished.replies;
        if finished > 0 && st.reader_waiting {
            st.reader_waiting = false;
            self.reader_cv.notify_all();
        }
        loop {
            if !st.queue.is_empty() {
                std::mem::swap(&mut st.queue, work);
                return Some(());
            }
            if st.closing && st.in_flight == 0 {
                return None;
            }
            st.writer_waiting = true;
            st = self
                .writer_cv
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Sink for Shared {
    fn complete(&self, token: u64, result: Result<Reply, Errno>) {
        self.piece(token, result);
    }

    fn complete_batched(&self, token: u64, result: Result<Reply, Errno>) {
        let mut st = self.lock();
        st.queue.push_back(Out::Piece { token, result });
    }

    /// One wake-up for the writer per batch of device completions.
    fn flush(&self) {
        let mut st = self.lock();
        if st.writer_waiting && !st.queue.is_empty() {
            st.writer_waiting = false;
            self.writer_cv.notify_one();
        }
    }
}

/// What one `writev` batch sends: header bytes, and data from pool buffers.
// Boxing `Chunks` would allocate per reply.
#[allow(clippy::large_enum_variant)]
enum Seg {
    Head(Range<usize>),
    Data {
        chunks: Chunks,
        start: usize,
        len: usize,
    },
}

/// The writer thread's state.
pub struct Writer {
    stream: Stream,
    style: Style,
    pending: HashMap<u64, Progress>,
    heads: Vec<u8>,
    segs: Vec<Seg>,
    /// Scratch for block status descriptors.
    extents: Vec<wire::Extent>,
    /// Writes failed (or framing was lost): replies are dropped from now on.
    broken: bool,
}

impl Writer {
    pub fn new(stream: Stream, style: Style) -> Writer {
        Writer {
            stream,
            style,
            pending: HashMap::with_capacity(1024),
            heads: Vec::with_capacity(64 * 1024),
            segs: Vec::with_capacity(1024),
            extents: Vec::new(),
            broken: false,
        }
    }

    /// Runs until the reader closes and nothing is owed.
    pub fn run(mut self, shared: &Shared) {
        let mut work = VecDeque::with_capacity(1024);
        let mut finished = Finished::default();
        while shared.take(&mut work, finished).is_some() {
            finished = Finished::default();
            while let Some(out) = work.pop_front() {
                let done = self.handle(out);
                finished.replies += done.replies;
                finished.read_bytes += done.read_bytes;
                if self.segs.len() >= 900 {
                    self.write_batch();
                }
            }
            self.write_batch();
        }
    }

    fn chunk_style(&self) -> ChunkStyle {
        match self.style {
            Style::Extended => ChunkStyle::Extended,
            _ => ChunkStyle::Structured,
        }
    }

    fn head_mark(&self) -> usize {
        self.heads.len()
    }

    fn push_head(&mut self, from: usize) {
        let to = self.heads.len();
        if to > from {
            // Extend the previous header segment when they are adjacent.
            if let Some(Seg::Head(r)) = self.segs.last_mut()
                && r.end == from
            {
                r.end = to;
                return;
            }
            self.segs.push(Seg::Head(from..to));
        }
    }

    /// Handles one message; returns what it finished.
    fn handle(&mut self, out: Out) -> Finished {
        match out {
            Out::Now {
                cookie,
                command,
                error,
                message,
            } => {
                self.reply_status(cookie, command, 0, error, message);
                Finished {
                    replies: 1,
                    read_bytes: 0,
                }
            }
            Out::Begin { id, req } => {
                let held = if req.contiguous && req.pieces > 1 {
                    (0..req.pieces).map(|_| None).collect()
                } else {
                    Vec::new()
                };
                self.pending.insert(
                    id,
                    Progress {
                        req,
                        done: 0,
                        error: None,
                        next: 0,
                        header_sent: false,
                        held,
                    },
                );
                Finished::default()
            }
            Out::Piece { token, result } => self.piece(token, result),
        }
    }

    /// A reply with no data: success, or an error.
    fn reply_status(&mut self, cookie: u64, command: u16, offset: u64, error: u32, msg: &str) {
        let mark = self.head_mark();
        let read_like = command == cmd::READ || command == cmd::BLOCK_STATUS;
        let simple = match self.style {
            Style::Simple => true,
            Style::Structured => !read_like,
            Style::Extended => false,
        };
        if simple {
            wire::put_simple_reply(&mut self.heads, cookie, error);
        } else if error == 0 {
            let head = ChunkHead::new(self.chunk_style(), cookie, offset);
            wire::put_done(&mut self.heads, head);
        } else {
            let head = ChunkHead::new(self.chunk_style(), cookie, offset).done();
            wire::put_error(&mut self.heads, head, error, msg);
        }
        self.push_head(mark);
    }

    fn piece(&mut self, token: u64, result: Result<Reply, Errno>) -> Finished {
        let id = token >> 16;
        let piece = (token & 0xffff) as u32;
        let Some(mut p) = self.pending.remove(&id) else {
            tracing::error!(token, "completion for an unknown request");
            return Finished::default();
        };
        p.done += 1;
        let last = p.done == p.req.pieces;
        let (piece_off, piece_len) = piece_range(&p.req, piece);
        match (p.req.command, result) {
            (cmd::READ, Ok(Reply::Data(chunks))) => {
                self.read_data(&mut p, piece, chunks, piece_off, piece_len, last);
            }
            (cmd::READ, result) => {
                let errno = result.err().unwrap_or(Errno::EIO);
                self.read_error(&mut p, errno, piece_off, piece_len, last);
            }
            (cmd::BLOCK_STATUS, Ok(Reply::Extents(extents))) => {
                self.block_status(&p.req, &extents);
            }
            (c, Ok(Reply::Done)) if c != cmd::BLOCK_STATUS => {}
            (_, result) => {
                if p.error.is_none() {
                    p.error = Some((result.err().unwrap_or(Errno::EIO), piece_off));
                }
            }
        }
        if !last {
            self.pending.insert(id, p);
            return Finished::default();
        }
        if p.req.command != cmd::READ {
            let (error, at) = p.error.map_or((0, p.req.offset), |(e, at)| {
                (errno::from_host(e as i32), at)
            });
            let is_bs = p.req.command == cmd::BLOCK_STATUS;
            if error != 0 || !is_bs {
                let msg = if error != 0 {
                    format!(
                        "{} of {} bytes at offset {} failed: {}",
                        codec::cmd::name(p.req.command).unwrap_or("request"),
                        p.req.len,
                        at,
                        p.error.map_or(Errno::EIO, |(e, _)| e).desc()
                    )
                } else {
                    String::new()
                };
                self.reply_status(p.req.cookie, p.req.command, p.req.offset, error, &msg);
            }
        }
        Finished {
            replies: 1,
            read_bytes: if p.req.command == cmd::READ {
                p.req.len
            } else {
                0
            },
        }
    }

    fn read_data(
        &mut self,
        p: &mut Progress,
        piece: u32,
        chunks: Chunks,
        off: u64,
        len: u64,
        last: bool,
    ) {
        let start = (off % 512) as usize;
        let len = len as usize;
        if !p.req.contiguous {
            let mark = self.head_mark();
            let mut head = ChunkHead::new(self.chunk_style(), p.req.cookie, off);
            if last {
                head = head.done();
            }
            // A piece is at most MAX_PAYLOAD bytes: it fits any chunk header.
            let _ = wire::put_offset_data(&mut self.heads, head, off, len);
            self.push_head(mark);
            self.segs.push(Seg::Data { chunks, start, len });
            return;
        }
        if p.error.is_some() {
            // The error reply went out already; this data has nowhere to go.
            return;
        }
        if p.held.is_empty() {
            // One piece: header and data together.
            self.contiguous_header(p);
            self.segs.push(Seg::Data { chunks, start, len });
            return;
        }
        if let Some(slot) = p.held.get_mut(piece as usize) {
            *slot = Some(chunks);
        }
        while let Some(chunks) = p.held.get_mut(p.next as usize).and_then(Option::take) {
            if !p.header_sent {
                self.contiguous_header(p);
            }
            let (off, len) = piece_range(&p.req, p.next);
            self.segs.push(Seg::Data {
                chunks,
                start: (off % 512) as usize,
                len: len as usize,
            });
            p.next += 1;
        }
    }

    /// The header of a contiguous READ reply: a simple reply, or one data
    /// chunk (DF) with the DONE flag.
    fn contiguous_header(&mut self, p: &mut Progress) {
        let mark = self.head_mark();
        match self.style {
            Style::Simple => wire::put_simple_reply(&mut self.heads, p.req.cookie, 0),
            _ => {
                let head = ChunkHead::new(self.chunk_style(), p.req.cookie, p.req.offset).done();
                let _ =
                    wire::put_offset_data(&mut self.heads, head, p.req.offset, p.req.len as usize);
            }
        }
        self.push_head(mark);
        p.header_sent = true;
    }

    fn read_error(&mut self, p: &mut Progress, errno: Errno, off: u64, len: u64, last: bool) {
        let error = errno::from_host(errno as i32);
        let msg = format!(
            "read of {len} bytes at offset {off} failed: {}",
            errno.desc()
        );
        tracing::warn!(cookie = p.req.cookie, "{msg}");
        if !p.req.contiguous {
            let mark = self.head_mark();
            let mut head = ChunkHead::new(self.chunk_style(), p.req.cookie, off);
            if last {
                head = head.done();
            }
            wire::put_error_offset(&mut self.heads, head, error, &msg, off);
            self.push_head(mark);
            return;
        }
        if p.header_sent {
            // The reply promised data it cannot send: framing is lost.
            tracing::error!(
                cookie = p.req.cookie,
                "{msg}, after the reply began; closing the connection"
            );
            self.break_connection();
            return;
        }
        if p.error.is_none() {
            p.error = Some((errno, off));
            p.held.clear();
            self.reply_status(p.req.cookie, cmd::READ, p.req.offset, error, &msg);
        }
    }

    fn block_status(&mut self, req: &Pending, extents: &[Extent]) {
        let wanted: Vec<u32> = req.contexts.list().map(|(id, _)| id).collect();
        for (n, &id) in wanted.iter().enumerate() {
            self.extents.clear();
            let mut covered = 0u64;
            for e in extents {
                let len = e.len.min(req.len - covered);
                if len == 0 {
                    break;
                }
                covered += len;
                let s = match id {
                    BASE_ALLOCATION_ID if e.zero => STATE_HOLE | STATE_ZERO,
                    BASE_ALLOCATION_ID => 0,
                    _ => u32::from(e.depth),
                };
                match self.extents.last_mut() {
                    Some(last) if last.status == s => last.length += len,
                    _ => self.extents.push(wire::Extent {
                        length: len,
                        status: s,
                    }),
                }
            }
            let max = if req.req_one { 1 } else { wire::MAX_EXTENTS };
            let mut head = ChunkHead::new(self.chunk_style(), req.cookie, req.offset);
            if n + 1 == wanted.len() {
                head = head.done();
            }
            let mark = self.head_mark();
            if wire::put_block_status(&mut self.heads, head, id, &self.extents, max).is_err() {
                // The device covered nothing: say so rather than send an empty chunk.
                self.heads.truncate(mark);
                let head = head.done();
                wire::put_error(&mut self.heads, head, errno::EIO, "no block status");
                self.push_head(mark);
                return;
            }
            self.push_head(mark);
        }
    }

    fn break_connection(&mut self) {
        self.broken = true;
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Sends what is gathered, then lets its buffers go.
    fn write_batch(&mut self) {
        if !self.broken && !self.segs.is_empty() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(self.segs.len() * 2);
            for seg in &self.segs {
                match seg {
                    Seg::Head(r) => slices.push(IoSlice::new(&self.heads[r.clone()])),
                    Seg::Data { chunks, start, len } => {
                        let cs = chunks.chunk_size();
                        let (mut pos, end) = (*start, start + len);
                        while pos < end {
                            let (i, at) = (pos / cs, pos % cs);
                            let n = (cs - at).min(end - pos);
                            slices.push(IoSlice::new(&chunks.chunk(i)[at..at + n]));
                            pos += n;
                        }
                    }
                }
            }
            if let Err(e) = write_all_vectored(&mut self.stream, &mut slices) {
                tracing::debug!("writing replies: {e}");
                self.broken = true;
                let _ = self.stream.shutdown(Shutdown::Both);
            }
        }
        self.segs.clear();
        self.heads.clear();
    }
}

/// Offset and length of piece `piece` of `req`.
fn piece_range(req: &Pending, piece: u32) -> (u64, u64) {
    piece_bounds(req.offset, req.len, req.piece_size, piece)
}

/// Offset and length of piece `piece` of `len` bytes at `offset` cut into
/// `piece_size` pieces.
pub fn piece_bounds(offset: u64, len: u64, piece_size: u64, piece: u32) -> (u64, u64) {
    let start = u64::from(piece).saturating_mul(piece_size).min(len);
    (offset + start, piece_size.min(len - start))
}

fn write_all_vectored(stream: &mut Stream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let window = slices.len().min(1024);
        match stream.write_vectored(&slices[..window]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
