//! The transmission phase of one connection: read requests off the wire,
//! check them as `docs/nbd.md` says, and hand them to the device; replies
//! go out as requests complete ([`super::replies`]), so a slow request never
//! holds up a fast one.
//!
//! The connection runs on the device's worker thread, as a
//! [`Protocol`]: the worker receives the socket's bytes and sends the
//! replies through the same io_uring ring as the disk I/O. A WRITE's payload
//! lands in pool buffers (straight from the socket, beyond what arrived with
//! its header), and a READ's data goes out of the pool buffers the device
//! read into. A request larger than the device takes at once is cut into
//! pieces, each its own device request. Back pressure: a connection that
//! owes too many replies, or too much READ data, is not read until replies
//! go out; one that cannot get memory waits in the worker's FIFO line
//! (invariant 4).

use std::collections::TryReserveError;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::errno::Errno;

use crate::device::{
    Command, ConnCx, ConnEnd, Device, Flags, Protocol, Reply, Request, SendBuf, Step,
};

use super::codec::{self, cmd, cmd_flag, errno};
use super::export::{Contexts, MAX_PAYLOAD};
use super::handshake::{Session, Style};
use super::replies::{Origin, Pending, Replies, piece_bounds, token};

/// Replies one connection may owe at once; its input waits beyond this.
/// (448 fills a table of 512 buckets, reserved when the connection starts.)
const MAX_IN_FLIGHT: usize = 448;
/// Bytes of reply headers and small replies (not READ data) waiting for the
/// socket beyond which a connection's requests are not read.
const MAX_UNSENT: usize = 4 << 20;

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// The client sent DISC.
    Disconnect,
    /// The client closed the connection between requests.
    Closed,
    /// The server shut down: it answered every request it read, then
    /// closed the connection.
    Stopped,
    /// The connection cannot go on (framing lost, socket error).
    Broken(String),
}

/// Flags each command accepts (more are refused with EINVAL). FUA is
/// accepted on every command once advertised (clients set it on reads too),
/// and means something only for writes.
fn allowed_flags(command: u16, style: Style, read_only: bool) -> u16 {
    let fua = if read_only { 0 } else { cmd_flag::FUA };
    fua | match command {
        cmd::READ if style != Style::Simple => cmd_flag::DF,
        cmd::WRITE if style == Style::Extended => cmd_flag::PAYLOAD_LEN,
        cmd::WRITE_ZEROES => cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO,
        cmd::BLOCK_STATUS => cmd_flag::REQ_ONE,
        _ => 0,
    }
}

/// Serves requests on `socket` (with `buffered` bytes already read from
/// it) until the client leaves or the connection breaks; returns once every
/// started request has been answered and the device let the socket go.
/// `id` names the connection in log lines.
pub fn serve(socket: OwnedFd, buffered: Vec<u8>, session: &Session, id: u64) -> End {
    let device = session.export.device.clone();
    let origin = Origin {
        conn: id,
        export: session.export.name.as_str().into(),
    };
    let conn = match NbdConn::new(&device, origin, session.style, session.contexts) {
        Ok(c) => c,
        Err(e) => return End::Broken(format!("no memory for the connection's state: {e}")),
    };
    let done = device.serve(socket, buffered, Box::new(conn));
    match done.wait() {
        ConnEnd::Done => End::Disconnect,
        ConnEnd::Closed => End::Closed,
        ConnEnd::Stopped => End::Stopped,
        ConnEnd::Broken(why) => End::Broken(why),
    }
}

/// A request being handed to the device piece by piece.
struct Current {
    id: u64,
    command: Command,
    offset: u64,
    len: u64,
    flags: Flags,
    pieces: u32,
    next: u32,
    piece_size: u64,
}

/// A request refused before it reached the device, answered once its
/// payload (if any) has been skipped.
struct Refused {
    cookie: u64,
    command: u16,
    /// The request's offset: extended reply headers carry it.
    offset: u64,
    error: u32,
    message: &'static str,
}

/// One connection's transmission phase, driven by the device's worker.
struct NbdConn {
    style: Style,
    contexts: Contexts,
    capacity: u64,
    read_only: bool,
    /// Bytes per device request.
    piece_size: u64,
    /// READ bytes this connection may hold in pool buffers at once.
    read_budget: u64,
    next_id: u64,
    current: Option<Current>,
    replies: Replies,
    /// Replies owed, and the READ bytes among them.
    owed: usize,
    read_owed: u64,
    /// The server is shutting down: new requests get ESHUTDOWN.
    stopping: bool,
    /// A refusal sent once the request's payload has been skipped.
    refused: Option<Refused>,
    /// A request was refused with ESHUTDOWN: the client knows, and is to
    /// send DISC (the connection stays until it does, or the server cuts
    /// it).
    told_of_stop: bool,
}

impl NbdConn {
    fn new(
        device: &Arc<Device>,
        origin: Origin,
        style: Style,
        contexts: Contexts,
    ) -> Result<NbdConn, TryReserveError> {
        // The device takes at most `max_io` bytes, with sector slack on each side.
        let max_io = device.max_io();
        let piece_size = if max_io > 8192 {
            (max_io + 1024 - 4096) / 4096 * 4096
        } else {
            (max_io / 2).max(512) / 512 * 512
        };
        // A client that does not read its replies keeps its READ buffers; half
        // the pool at most, so the other connections always have the rest.
        let pool = device.pool();
        Ok(NbdConn {
            style,
            contexts,
            capacity: device.capacity(),
            read_only: device.read_only(),
            piece_size,
            read_budget: (pool.chunk_size() * pool.chunks() / 2) as u64,
            next_id: 0,
            current: None,
            replies: Replies::new(origin, style, MAX_IN_FLIGHT)?,
            owed: 0,
            read_owed: 0,
            stopping: false,
            told_of_stop: false,
            refused: None,
        })
    }

    fn header_len(&self) -> usize {
        if self.style == Style::Extended {
            codec::EXTENDED_REQUEST_LEN
        } else {
            codec::REQUEST_LEN
        }
    }

    /// Why `req` is refused before it reaches the device, if it is.
    fn refusal(&self, req: &codec::Request, payload: u64) -> Option<(u32, &'static str)> {
        let (command, offset, len) = (req.command, req.offset, req.length);
        let size = self.capacity;
        if codec::cmd::name(command).is_none() || command == cmd::RESIZE {
            Some((errno::EINVAL, "unknown command"))
        } else if req.flags & !allowed_flags(command, self.style, self.read_only) != 0 {
            Some((errno::EINVAL, "flag not valid for this command"))
        } else if payload > 0 && command != cmd::WRITE {
            Some((errno::EINVAL, "unexpected payload"))
        } else if self.read_only && matches!(command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) {
            Some((errno::EPERM, "the export is read-only"))
        } else if matches!(
            command,
            cmd::READ | cmd::WRITE | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS
        ) && (offset > size || len > size - offset)
        {
            Some(if matches!(command, cmd::WRITE | cmd::WRITE_ZEROES) {
                (errno::ENOSPC, "past the end of the export")
            } else {
                (errno::EINVAL, "past the end of the export")
            })
        } else if command == cmd::READ && len > u64::from(MAX_PAYLOAD) {
            Some((errno::EINVAL, "read larger than the maximum payload"))
        } else if command == cmd::BLOCK_STATUS && !self.contexts.any() {
            Some((errno::EINVAL, "no metadata context was negotiated"))
        } else if command == cmd::BLOCK_STATUS && len == 0 {
            Some((errno::EINVAL, "block status of zero bytes"))
        } else {
            None
        }
    }

    /// Answers a request with `error` once its payload (if any) has been
    /// read past: a client may not take a reply for a request it is still
    /// sending (libnbd finds no such cookie in flight).
    fn refuse_after_payload(&mut self, req: &codec::Request, error: u32, message: &'static str) {
        self.refused = Some(Refused {
            cookie: req.cookie,
            command: req.command,
            offset: req.offset,
            error,
            message,
        });
    }

    /// Answers a request at once, with no device request behind it.
    fn now(&self, out: &mut SendBuf, req: &codec::Request, error: u32, message: &str) {
        self.replies
            .status(out, req.cookie, req.command, req.offset, error, message);
    }

    /// Reads one request header and decides what it needs.
    fn header(&mut self, input: &[u8], cx: &mut ConnCx<'_>) -> Step {
        let hlen = self.header_len();
        if input.len() < hlen {
            return Step::NeedInput;
        }
        let decoded = if self.style == Style::Extended {
            codec::Request::decode_extended(&input[..hlen])
        } else {
            codec::Request::decode(&input[..hlen])
        };
        let req = match decoded {
            Ok(req) => req,
            Err(e) => {
                return Step::Close {
                    consumed: 0,
                    why: Some(e.to_string()),
                };
            }
        };
        let (cookie, command, offset, len) = (req.cookie, req.command, req.offset, req.length);
        if command == cmd::DISC {
            // No reply, whatever its flags, length or payload: the client is
            // leaving. What it sent before is answered first.
            return Step::Close {
                consumed: hlen,
                why: None,
            };
        }
        // Bytes of payload that follow the header.
        let payload = match command {
            cmd::WRITE => len,
            _ if req.flags & cmd_flag::PAYLOAD_LEN != 0 && self.style == Style::Extended => len,
            _ => 0,
        };
        if payload > u64::from(MAX_PAYLOAD) {
            self.now(cx.out(), &req, errno::EINVAL, "payload too large");
            return Step::Close {
                consumed: hlen,
                why: Some(format!(
                    "request {cookie:#x} carries {payload} bytes, more than {MAX_PAYLOAD}"
                )),
            };
        }
        if cx.unsent_heads() > MAX_UNSENT {
            // A client that sends requests and does not read the replies
            // gets no more read from it: its replies are not kept without
            // bound. (READ data, in pool chunks, has its budget below.)
            return Step::Wait;
        }
        // Refuse before reading the payload, then skip it: framing holds.
        // Once the server is stopping, every request is refused.
        let refused = if self.stopping {
            Some((errno::ESHUTDOWN, "the server is shutting down"))
        } else {
            self.refusal(&req, payload)
        };
        if let Some((error, message)) = refused {
            let o = self.replies.origin();
            tracing::debug!(
                conn = o.conn,
                export = %o.export,
                cookie,
                command,
                offset,
                len,
                error,
                message,
                "refused"
            );
            self.refuse_after_payload(&req, error, message);
            self.told_of_stop |= self.stopping;
            return Step::Skip {
                consumed: hlen,
                skip: payload,
            };
        }
        let command_kind = match command {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::CACHE => Command::Cache,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            _ => Command::BlockStatus,
        };
        if len == 0 && command != cmd::FLUSH {
            // Nothing to do, and nothing to wait for.
            self.now(cx.out(), &req, 0, "");
            return Step::Consumed(hlen);
        }
        let held = self.read_owed + cx.unsent() as u64;
        if command == cmd::READ && held > 0 {
            // Leave the header until replies have gone out. Data read and
            // not yet taken by the socket counts: a client that does not
            // read its replies holds no more than the budget, nor more than
            // half of what is free and what it holds, so that k such
            // clients leave at least 1/2^k of the pool to the others. (With
            // nothing owed or unsent, one READ goes ahead whatever its size.)
            let cap = self.read_budget.min((cx.pool_free() + held) / 2);
            if held + len > cap {
                return Step::Wait;
            }
        }
        let data = matches!(command_kind, Command::Read | Command::Write);
        let pieces = if data {
            len.div_ceil(self.piece_size).max(1)
        } else {
            1
        };
        let piece_size = if data { self.piece_size } else { len };
        let id = self.next_id;
        self.next_id += 1;
        self.replies.begin(
            id,
            Pending {
                cookie,
                command,
                offset,
                len,
                pieces: pieces as u32,
                piece_size,
                contiguous: command == cmd::READ
                    && (self.style == Style::Simple || req.flags & cmd_flag::DF != 0),
                contexts: self.contexts,
                req_one: req.flags & cmd_flag::REQ_ONE != 0,
            },
        );
        self.owed += 1;
        if command == cmd::READ {
            self.read_owed += len;
        }
        self.current = Some(Current {
            id,
            command: command_kind,
            offset,
            len,
            flags: Flags {
                fua: req.flags & cmd_flag::FUA != 0,
                no_hole: req.flags & cmd_flag::NO_HOLE != 0,
                fast_zero: req.flags & cmd_flag::FAST_ZERO != 0,
            },
            pieces: pieces as u32,
            next: 0,
            piece_size,
        });
        Step::Consumed(hlen)
    }

    /// Hands the current request's next piece to the device.
    fn next_piece(&mut self, cx: &mut ConnCx<'_>) -> Step {
        let Some(cur) = self.current.as_mut() else {
            return Step::NeedInput;
        };
        let i = cur.next;
        let (at, n) = piece_bounds(cur.offset, cur.len, cur.piece_size, i);
        let data = matches!(cur.command, Command::Read | Command::Write);
        let buffers = if data {
            match cx.alloc(at, n) {
                Some(chunks) => Some(chunks),
                None => return Step::NoMemory,
            }
        } else {
            None
        };
        let req = Request {
            command: cur.command,
            offset: at,
            len: n,
            flags: cur.flags,
            data: buffers,
            token: token(cur.id, i),
        };
        let payload = if cur.command == Command::Write { n } else { 0 };
        cur.next += 1;
        if cur.next == cur.pieces {
            self.current = None;
        }
        Step::Submit {
            consumed: 0,
            req,
            payload,
        }
    }
}

impl Protocol for NbdConn {
    fn input(&mut self, input: &[u8], cx: &mut ConnCx<'_>) -> Step {
        if self.current.is_some() {
            return self.next_piece(cx);
        }
        if self.owed >= MAX_IN_FLIGHT {
            return Step::Wait;
        }
        self.header(input, cx)
    }

    fn complete(
        &mut self,
        token: u64,
        result: Result<Reply, Errno>,
        out: &mut SendBuf,
    ) -> Option<String> {
        let done = self.replies.piece(out, token, result);
        if done.reply {
            self.owed = self.owed.saturating_sub(1);
            self.read_owed = self.read_owed.saturating_sub(done.read_bytes);
        }
        done.broken
            .then(|| "a READ failed after its reply began".to_string())
    }

    fn skipped(&mut self, out: &mut SendBuf) {
        if let Some(r) = self.refused.take() {
            self.replies
                .status(out, r.cookie, r.command, r.offset, r.error, r.message);
        }
    }

    fn stop(&mut self) {
        self.stopping = true;
    }

    fn drained(&self) -> bool {
        self.owed == 0 && self.current.is_none() && !self.told_of_stop
    }

    fn input_ended(&mut self, out: &mut SendBuf) {
        // Pieces never handed to the device still need their replies.
        if let Some(cur) = self.current.take() {
            for piece in cur.next..cur.pieces {
                let _ = self.complete(token(cur.id, piece), Err(Errno::EIO), out);
            }
        }
    }
}
