//! The transmission phase of one connection: read requests off the wire,
//! check them as `docs/nbd.md` says, and hand them to the device; the
//! replies go out from the writer thread ([`super::replies`]) as they
//! complete, so a slow request never holds up a fast one.
//!
//! A WRITE's payload is read straight into pool buffers, and a READ's buffers
//! are taken from the pool before it is submitted: the pool's line (invariant
//! 4) is the connection's back pressure. A request larger than the device
//! takes at once is cut into pieces, each its own device request. Before the
//! connection goes, every request it started is answered or dropped after its
//! device completion (invariant 3).

use std::sync::Arc;

use nix::errno::Errno;

use crate::device::{Command, Flags, Request};

use super::codec::{self, cmd, cmd_flag, errno};
use super::export::MAX_PAYLOAD;
use super::handshake::{Session, Style};
use super::replies::{Out, Pending, Shared, Writer, piece_bounds, token};
use super::stream::{Input, ReadError};

/// Replies one connection may owe at once; the reader waits beyond this.
const MAX_IN_FLIGHT: usize = 512;

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// The client sent DISC.
    Disconnect,
    /// The client closed the connection between requests.
    Closed,
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

struct Conn<'a> {
    session: &'a Session,
    shared: Arc<Shared>,
    /// The next request id (for reply tokens).
    next_id: u64,
    /// Bytes per device request.
    piece_size: u64,
    /// READ bytes this connection may hold in pool buffers at once.
    read_budget: u64,
}

/// Serves requests on `input` until the client leaves or the connection
/// breaks; returns once every started request has been answered.
pub fn serve(mut input: Input, session: &Session) -> End {
    let shared = Arc::new(Shared::default());
    let writer = match input.stream().try_clone() {
        Ok(stream) => Writer::new(stream, session.style),
        Err(e) => return End::Broken(format!("cannot clone the socket: {e}")),
    };
    let spawned = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("ubd-nbd-reply".into())
            .spawn(move || writer.run(&shared))
    };
    let writer = match spawned {
        Ok(handle) => handle,
        Err(e) => return End::Broken(format!("cannot start the reply writer: {e}")),
    };
    let device = &session.export.device;
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
    let read_budget = (pool.chunk_size() * pool.chunks() / 2) as u64;
    let mut conn = Conn {
        session,
        shared: shared.clone(),
        next_id: 0,
        piece_size,
        read_budget,
    };
    let end = conn.read_requests(&mut input);
    device.kick();
    shared.drain_and_close();
    let _ = writer.join();
    end
}

impl Conn<'_> {
    fn read_requests(&mut self, input: &mut Input) -> End {
        let extended = self.session.style == Style::Extended;
        let hlen = if extended {
            codec::EXTENDED_REQUEST_LEN
        } else {
            codec::REQUEST_LEN
        };
        let mut head = [0u8; codec::EXTENDED_REQUEST_LEN];
        let device = &self.session.export.device;
        loop {
            // Requests already in hand go to the worker with one wake-up,
            // before the reader may block on the socket.
            if input.buffered() < hlen {
                device.kick();
            }
            match input.read_exact(&mut head[..hlen]) {
                Ok(()) => {}
                Err(ReadError::Closed) => return End::Closed,
                Err(e) => return End::Broken(format!("reading a request header: {e}")),
            }
            let decoded = if extended {
                codec::Request::decode_extended(&head)
            } else {
                codec::Request::decode(&head)
            };
            let req = match decoded {
                Ok(req) => req,
                Err(e) => return End::Broken(e.to_string()),
            };
            if let Some(end) = self.request(input, req) {
                return end;
            }
        }
    }

    fn now(&self, cookie: u64, command: u16, error: u32, message: &'static str) {
        let out = Out::Now {
            cookie,
            command,
            error,
            message,
        };
        let device = &self.session.export.device;
        self.shared
            .announce(out, MAX_IN_FLIGHT, 0, 0, || device.kick());
    }

    /// Handles one request; `Some` when the connection must end.
    fn request(&mut self, input: &mut Input, req: codec::Request) -> Option<End> {
        let export = &self.session.export;
        let device = &export.device;
        let size = device.capacity();
        let (cookie, command, offset, len) = (req.cookie, req.command, req.offset, req.length);
        let read_only = device.read_only();
        // Bytes of payload that follow the header.
        let payload = match command {
            cmd::WRITE => len,
            _ if req.flags & cmd_flag::PAYLOAD_LEN != 0
                && self.session.style == Style::Extended =>
            {
                len
            }
            _ => 0,
        };
        if payload > u64::from(MAX_PAYLOAD) {
            self.now(cookie, command, errno::EINVAL, "payload too large");
            return Some(End::Broken(format!(
                "request {cookie:#x} carries {payload} bytes, more than {MAX_PAYLOAD}"
            )));
        }
        // Refuse before reading the payload, then consume it: framing holds.
        let refusal = if codec::cmd::name(command).is_none() || command == cmd::RESIZE {
            Some((errno::EINVAL, "unknown command"))
        } else if req.flags & !allowed_flags(command, self.session.style, read_only) != 0 {
            Some((errno::EINVAL, "flag not valid for this command"))
        } else if payload > 0 && command != cmd::WRITE {
            Some((errno::EINVAL, "unexpected payload"))
        } else if read_only && matches!(command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) {
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
        } else if command == cmd::BLOCK_STATUS && !self.session.contexts.any() {
            Some((errno::EINVAL, "no metadata context was negotiated"))
        } else if command == cmd::BLOCK_STATUS && len == 0 {
            Some((errno::EINVAL, "block status of zero bytes"))
        } else {
            None
        };
        if let Some((error, message)) = refusal {
            if let Err(e) = input.skip(payload) {
                return Some(End::Broken(format!("reading a refused payload: {e}")));
            }
            tracing::debug!(cookie, command, offset, len, error, message, "refused");
            self.now(cookie, command, error, message);
            return None;
        }
        let flags = Flags {
            fua: req.flags & cmd_flag::FUA != 0,
            no_hole: req.flags & cmd_flag::NO_HOLE != 0,
            fast_zero: req.flags & cmd_flag::FAST_ZERO != 0,
        };
        let dev_command = match command {
            cmd::DISC => return Some(End::Disconnect),
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
            self.now(cookie, command, 0, "");
            return None;
        }
        let data = matches!(dev_command, Command::Read | Command::Write);
        let pieces = if data {
            len.div_ceil(self.piece_size).max(1)
        } else {
            1
        };
        let id = self.next_id;
        self.next_id += 1;
        let pending = Pending {
            cookie,
            command,
            offset,
            len,
            pieces: pieces as u32,
            piece_size: if data { self.piece_size } else { len },
            contiguous: command == cmd::READ
                && (self.session.style == Style::Simple || req.flags & cmd_flag::DF != 0),
            contexts: self.session.contexts,
            req_one: req.flags & cmd_flag::REQ_ONE != 0,
        };
        let piece_size = pending.piece_size;
        let read_bytes = if command == cmd::READ { len } else { 0 };
        let begin = Out::Begin { id, req: pending };
        self.shared
            .announce(begin, MAX_IN_FLIGHT, read_bytes, self.read_budget, || {
                device.kick()
            });
        for i in 0..pieces as usize {
            let (at, n) = piece_bounds(offset, len, piece_size, i as u32);
            let tok = token(id, i as u32);
            let mut buffers = None;
            if data {
                // Waiting for memory needs the requests in hand to be running.
                let quick = device.try_alloc(at, n).ok_or(Errno::EAGAIN);
                let mut chunks = match quick.or_else(|_| {
                    device.kick();
                    device.alloc(at, n)
                }) {
                    Ok(c) => c,
                    Err(e) => {
                        self.fail_rest(id, i as u32, pieces as u32, e);
                        if command == cmd::WRITE {
                            // The rest of the payload still has to be read.
                            let rest = offset + len - at;
                            if let Err(e) = input.skip(rest) {
                                return Some(End::Broken(format!("reading a payload: {e}")));
                            }
                        }
                        return None;
                    }
                };
                if command == cmd::WRITE && (input.buffered() as u64) < n {
                    device.kick();
                }
                if command == cmd::WRITE
                    && let Err(e) = read_into(input, &mut chunks, at, n, at - offset, len)
                {
                    drop(chunks);
                    self.fail_rest(id, i as u32, pieces as u32, Errno::EIO);
                    return Some(End::Broken(format!(
                        "reading the payload of request {cookie:#x}: {e}"
                    )));
                }
                buffers = Some(chunks);
            }
            let request = Request {
                command: dev_command,
                offset: at,
                len: n,
                flags,
                data: buffers,
                token: tok,
            };
            device.submit_quiet(request, self.shared.clone());
        }
        None
    }

    /// Completes pieces `from..pieces` of request `id` with `errno`, so its
    /// reply still goes out.
    fn fail_rest(&self, id: u64, from: u32, pieces: u32, errno: Errno) {
        for piece in from..pieces {
            self.shared.piece(token(id, piece), Err(errno));
        }
    }
}

/// Reads `n` payload bytes for device offset `at` into `chunks`, placed at
/// byte `at % 512` as the device wants them.
fn read_into(
    input: &mut Input,
    chunks: &mut crate::engine::bufpool::Chunks,
    at: u64,
    n: u64,
    before: u64,
    total: u64,
) -> Result<(), ReadError> {
    let cs = chunks.chunk_size();
    let start = (at % 512) as usize;
    let end = start + n as usize;
    let mut pos = start;
    while pos < end {
        let (i, off) = (pos / cs, pos % cs);
        let take = (cs - off).min(end - pos);
        let done = before as usize + (pos - start);
        input.read_exact_counted(
            &mut chunks.chunk_mut(i)[off..off + take],
            done,
            total as usize,
        )?;
        pos += take;
    }
    Ok(())
}
