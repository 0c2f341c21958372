//! A connection's replies: what each request still owes the client, and the
//! encoding of each reply into the connection's send buffer as the device
//! completes the request's pieces.
//!
//! The connection registers each request ([`Replies::begin`]) before any of
//! its pieces reaches the device, so a completion always finds its request.
//! Replies go out in any order; READ data goes out of the pool chunks the
//! device filled. A READ larger than one device request arrives in pieces:
//! with structured replies each piece is its own data chunk; with simple
//! replies (or `DF`) the pieces go out in order as one run. The chunks of a
//! piece that came early are held until its turn.

use std::collections::{HashMap, TryReserveError};
use std::sync::Arc;

use nix::errno::Errno;

use crate::device::{Extent, Reply, SendBuf};
use crate::engine::bufpool::Chunks;

use super::codec::reply::{self as wire, ChunkHead, ChunkStyle};
use super::codec::{self, cmd, errno};
use super::export::{BASE_ALLOCATION_ID, Contexts};
use super::handshake::Style;

/// `base:allocation` flags.
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// A request the device will answer, as the replies need to know it.
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

/// Per-request progress.
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

/// What finishing a piece finished.
#[derive(Debug, Default, Clone, Copy)]
pub struct Finished {
    /// The request's reply is complete.
    pub reply: bool,
    /// READ bytes that reply owed.
    pub read_bytes: u64,
    /// The connection cannot go on (a reply began and cannot be finished).
    pub broken: bool,
}

/// Token of piece `piece` of request `id`.
pub fn token(id: u64, piece: u32) -> u64 {
    id << 16 | u64::from(piece)
}

/// The connection and the export its requests come on, for log lines
/// about one request; made once per connection.
pub struct Origin {
    pub conn: u64,
    pub export: Arc<str>,
}

/// One connection's replies owed.
pub struct Replies {
    origin: Origin,
    style: Style,
    pending: HashMap<u64, Progress>,
    /// Scratch for block status descriptors.
    extents: Vec<wire::Extent>,
}

impl Replies {
    /// Room for the replies a connection may owe is reserved here, once;
    /// an error when memory is short, so the connection is refused, not the
    /// server aborted.
    pub fn new(
        origin: Origin,
        style: Style,
        owed_at_most: usize,
    ) -> Result<Replies, TryReserveError> {
        let mut pending = HashMap::new();
        pending.try_reserve(owed_at_most)?;
        Ok(Replies {
            origin,
            style,
            pending,
            extents: Vec::new(),
        })
    }

    /// The connection and export, for log lines.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    fn chunk_style(&self) -> ChunkStyle {
        match self.style {
            Style::Extended => ChunkStyle::Extended,
            _ => ChunkStyle::Structured,
        }
    }

    /// Registers request `id`, whose pieces the device will complete.
    pub fn begin(&mut self, id: u64, req: Pending) {
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
    }

    /// A reply with no data: success, or an error.
    pub fn status(
        &self,
        out: &mut SendBuf,
        cookie: u64,
        command: u16,
        offset: u64,
        error: u32,
        msg: &str,
    ) {
        let mark = out.mark();
        let read_like = command == cmd::READ || command == cmd::BLOCK_STATUS;
        let simple = match self.style {
            Style::Simple => true,
            Style::Structured => !read_like,
            Style::Extended => false,
        };
        let heads = out.heads();
        if simple {
            wire::put_simple_reply(heads, cookie, error);
        } else if error == 0 {
            let head = ChunkHead::new(self.chunk_style(), cookie, offset);
            wire::put_done(heads, head);
        } else {
            let head = ChunkHead::new(self.chunk_style(), cookie, offset).done();
            wire::put_error(heads, head, error, msg);
        }
        out.commit_head(mark);
    }

    /// Piece `token` of a request ended with `result`; its reply (or part
    /// of it) goes into `out`.
    pub fn piece(
        &mut self,
        out: &mut SendBuf,
        token: u64,
        result: Result<Reply, Errno>,
    ) -> Finished {
        let id = token >> 16;
        let piece = (token & 0xffff) as u32;
        let Some(mut p) = self.pending.remove(&id) else {
            let o = &self.origin;
            tracing::error!(
                conn = o.conn,
                export = %o.export,
                token,
                "completion for an unknown request"
            );
            return Finished::default();
        };
        p.done += 1;
        let last = p.done == p.req.pieces;
        let (piece_off, piece_len) = piece_range(&p.req, piece);
        let mut broken = false;
        match (p.req.command, result) {
            (cmd::READ, Ok(Reply::Data(chunks))) => {
                self.read_data(out, &mut p, piece, chunks, piece_off, piece_len, last);
            }
            (cmd::READ, result) => {
                let errno = result.err().unwrap_or(Errno::EIO);
                broken = self.read_error(out, &mut p, errno, piece_off, piece_len, last);
            }
            (cmd::BLOCK_STATUS, Ok(Reply::Extents(extents))) => {
                self.block_status(out, &p.req, &extents);
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
            return Finished {
                broken,
                ..Finished::default()
            };
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
                self.status(out, p.req.cookie, p.req.command, p.req.offset, error, &msg);
            }
        }
        Finished {
            reply: true,
            read_bytes: if p.req.command == cmd::READ {
                p.req.len
            } else {
                0
            },
            broken,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read_data(
        &mut self,
        out: &mut SendBuf,
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
            let mark = out.mark();
            // An extended header carries the request's offset; the chunk's
            // own offset field, the piece's.
            let mut head = ChunkHead::new(self.chunk_style(), p.req.cookie, p.req.offset);
            if last {
                head = head.done();
            }
            // A piece is at most MAX_PAYLOAD bytes: it fits any chunk header.
            let _ = wire::put_offset_data(out.heads(), head, off, len);
            out.commit_head(mark);
            out.push_data(chunks, start, len);
            return;
        }
        if p.error.is_some() {
            // The error reply went out already; this data has nowhere to go.
            return;
        }
        if p.held.is_empty() {
            // One piece: header and data together.
            self.contiguous_header(out, p);
            out.push_data(chunks, start, len);
            return;
        }
        if let Some(slot) = p.held.get_mut(piece as usize) {
            *slot = Some(chunks);
        }
        while let Some(chunks) = p.held.get_mut(p.next as usize).and_then(Option::take) {
            if !p.header_sent {
                self.contiguous_header(out, p);
            }
            let (off, len) = piece_range(&p.req, p.next);
            out.push_data(chunks, (off % 512) as usize, len as usize);
            p.next += 1;
        }
    }

    /// The header of a contiguous READ reply: a simple reply, or one data
    /// chunk (DF) with the DONE flag.
    fn contiguous_header(&self, out: &mut SendBuf, p: &mut Progress) {
        let mark = out.mark();
        match self.style {
            Style::Simple => wire::put_simple_reply(out.heads(), p.req.cookie, 0),
            _ => {
                let head = ChunkHead::new(self.chunk_style(), p.req.cookie, p.req.offset).done();
                let _ = wire::put_offset_data(out.heads(), head, p.req.offset, p.req.len as usize);
            }
        }
        out.commit_head(mark);
        p.header_sent = true;
    }

    /// A READ piece failed; returns true when the connection must close.
    fn read_error(
        &self,
        out: &mut SendBuf,
        p: &mut Progress,
        errno: Errno,
        off: u64,
        len: u64,
        last: bool,
    ) -> bool {
        let error = errno::from_host(errno as i32);
        let msg = format!(
            "read of {len} bytes at offset {off} failed: {}",
            errno.desc()
        );
        let o = &self.origin;
        tracing::warn!(conn = o.conn, export = %o.export, cookie = p.req.cookie, "{msg}");
        if !p.req.contiguous {
            let mark = out.mark();
            let mut head = ChunkHead::new(self.chunk_style(), p.req.cookie, p.req.offset);
            if last {
                head = head.done();
            }
            wire::put_error_offset(out.heads(), head, error, &msg, off);
            out.commit_head(mark);
            return false;
        }
        if p.header_sent {
            // The reply promised data it cannot send: framing is lost.
            tracing::error!(
                conn = o.conn,
                export = %o.export,
                cookie = p.req.cookie,
                "{msg}, after the reply began; closing the connection"
            );
            return true;
        }
        if p.error.is_none() {
            p.error = Some((errno, off));
            p.held.clear();
            self.status(out, p.req.cookie, cmd::READ, p.req.offset, error, &msg);
        }
        false
    }

    fn block_status(&mut self, out: &mut SendBuf, req: &Pending, extents: &[Extent]) {
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
            let mark = out.mark();
            if wire::put_block_status(out.heads(), head, id, &self.extents, max).is_err() {
                // The device covered nothing: say so rather than send an empty chunk.
                out.discard_head(mark);
                let head = head.done();
                wire::put_error(out.heads(), head, errno::EIO, "no block status");
                out.commit_head(mark);
                return;
            }
            out.commit_head(mark);
        }
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
