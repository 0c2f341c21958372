//! Client connections served on the device's worker thread: their sockets
//! go through the same ring as the disk I/O, so a request costs no thread
//! hop and no wake-up beyond the ring's own (the issue's "socket I/O through
//! the same io_uring machinery").
//!
//! The device moves the bytes and runs the requests; a [`Protocol`] (NBD, in
//! `crate::nbd`) says what the bytes mean. Per connection the worker keeps an
//! input buffer with at most one receive in flight, a payload slot that a
//! WRITE's data is received into straight (pool chunks, no copy beyond what
//! arrived with the header), and two [`SendBuf`]s: one gathering replies and
//! one on the wire, so one vectored send carries every reply that completed
//! in one turn of the loop, and READ data goes out of the pool chunks the
//! device read into.
//!
//! Memory (invariant 4): a connection that cannot get chunks joins the
//! worker's FIFO line; only the head of the line may use the pool's reserve,
//! and it is tried again whenever memory comes back, so nothing overtakes it.
//! Memory only a client can give back (replies it does not read, a WRITE
//! payload it does not send) is taken back by cutting that client after
//! [`SEND_STALL`] while the line waits.
//! Teardown (invariant 3): a connection goes only when it reads nothing more,
//! has no op in flight on its socket or buffers, and every request it started
//! has ended; its buffers leave the ring only then.
//!
//! Here: a connection's state and its life on the worker (adoption, reading
//! requests, submitting them, replies, stopping, closing). What a protocol
//! sees is in `protocol.rs`, the socket ops and their completions in
//! `sockio.rs`, the memory line in `memline.rs`.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{Shutdown, shutdown};

mod memline;
mod protocol;
mod sockio;

pub(super) use memline::MemLine;
pub use protocol::{ConnCx, ConnDone, ConnEnd, Protocol, Step};

use super::worker::{Origin, P_PAYLOAD, P_SEND, Worker, tag};
use super::{Command, Reply, Request, check_request};
use crate::engine::aligned::AlignedBuf;
use crate::engine::bufset::DevBuf;
use crate::engine::ring::{BufRef, MAX_IOV, Op, OpKind};
use crate::engine::sendbuf::SendBuf;

/// A batch of replies at least this large on the wire means a client is
/// taking a stream of data: the send completes as fast as the client reads,
/// so polling for that completion only takes the CPU the client (or a TLS
/// bridge) needs to read it. (Not so for a large WRITE payload coming in:
/// polling while it arrives was measured 13% faster for 1 MiB writes from
/// fio, though 25% slower through a TLS bridge.)
const STREAMING: usize = 64 * 1024;

/// While a connection waits for memory, a connection whose client has read
/// none of its replies, or sent none of the WRITE payload being received
/// into its buffers, for this long is cut: what it holds goes to the
/// others. (A client that moves something in every such span is never
/// cut.)
pub(super) const SEND_STALL: Duration = Duration::from_secs(10);
/// How often the worker looks for such clients while memory is short.
pub(super) const STALL_CHECK: Duration = Duration::from_secs(1);

/// While READs are parsed, the ops queued are submitted once this many
/// wait. Submitting a batch of 32 4K reads at once, the first waited some
/// 35 us in the block layer for the rest, and the disk took its requests in
/// bursts: with fio on the worker's CPU (as it mostly is), groups of 4 took
/// 4K random reads at QD32 from 42-49k to 50-56k a second (5 runs each, the
/// same CPU per read), and 2 did as well at 10% more CPU. Not after WRITEs:
/// 4 connections writing at QD8 lost 7-13% to the extra submissions (more
/// CPU per write), with groups of 4 and of 8 alike.
const SUBMIT_GROUP: usize = 4;

/// Bytes of a connection's input buffer (headers, and small payloads that
/// arrive with them).
const INPUT: usize = 64 << 10;
/// Compact the input buffer before receiving when less than this is free.
const INPUT_SLACK: usize = 4096;
/// Segments one send op takes (the ring's vectored limit, with room).
const SEND_WINDOW: usize = MAX_IOV - 1;

/// A socket handed to the device, on its way to the worker.
pub(super) struct NewConn {
    pub(super) socket: OwnedFd,
    pub(super) buffered: Vec<u8>,
    pub(super) protocol: Box<dyn Protocol>,
    pub(super) done: Arc<ConnDone>,
}

/// One connection's state on the worker.
pub(super) struct Conn {
    file: usize,
    fd: i32,
    proto: Box<dyn Protocol>,
    done: Arc<ConnDone>,
    in_slot: u32,
    send_slot: u32,
    payload_slot: u32,
    in_start: usize,
    in_end: usize,
    recv_busy: bool,
    /// The last parse needs more input.
    want_input: bool,
    /// A WRITE whose payload is being received into `payload_slot`.
    payload: Option<Request>,
    payload_len: u64,
    skip: u64,
    out: SendBuf,
    spare: SendBuf,
    /// The send buffer is on the wire: bytes, next segment, segments.
    sending: Option<(usize, usize, usize)>,
    /// Send ops pushed so far.
    sends: u64,
    /// Where what the client holds up stood when first seen there by
    /// [`Worker::cut_stalled_senders`], and when.
    stall: Option<(Held, Instant)>,
    requests: u32,
    /// Still reading requests.
    open: bool,
    /// Replies can no longer be sent: they are dropped.
    broken: bool,
    end: Option<ConnEnd>,
    /// In the worker's ready list.
    queued: bool,
}

/// Buffer slots each connection uses.
pub(super) const CONN_SLOTS: u32 = 3;

/// What a connection's pool buffers wait for from its client, as
/// [`Worker::cut_stalled_senders`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Replies on the wire: send ops pushed, bytes of the last one moved,
    /// bytes the client has not read.
    Send(u64, u64, usize),
    /// A WRITE's payload: bytes of it received so far.
    Payload(u64),
}

impl Worker {
    /// Takes a new connection on, or ends it at once when there is no room.
    pub(super) fn adopt(&mut self, nc: NewConn) {
        let NewConn {
            socket,
            buffered,
            mut protocol,
            done,
        } = nc;
        if self.conns_stopped {
            protocol.stop();
        }
        let Some(index) = self.conns.iter().position(Option::is_none) else {
            drop(protocol);
            done.set(ConnEnd::Broken(format!(
                "the device serves {} connections already",
                self.conns.len()
            )));
            return;
        };
        let Some(mut input) = AlignedBuf::new(INPUT, 4096) else {
            drop(protocol);
            done.set(ConnEnd::Broken("no memory for the connection".into()));
            return;
        };
        let fd = socket.as_raw_fd();
        let file = match self.ring.add_file(Arc::new(File::from(socket))) {
            Ok(f) => f,
            Err(_) => {
                drop(protocol);
                done.set(ConnEnd::Broken("the device's file table is full".into()));
                return;
            }
        };
        let n = buffered.len().min(INPUT);
        input.as_mut_slice()[..n].copy_from_slice(&buffered[..n]);
        let base = self.conn_base + index as u32 * CONN_SLOTS;
        let _ = self.ring.attach(base, DevBuf::Own(input));
        self.conns[index] = Some(Conn {
            file,
            fd,
            proto: protocol,
            done,
            in_slot: base,
            send_slot: base + 1,
            payload_slot: base + 2,
            in_start: 0,
            in_end: n,
            recv_busy: false,
            want_input: false,
            payload: None,
            payload_len: 0,
            skip: 0,
            out: SendBuf::with_capacity(64),
            spare: SendBuf::with_capacity(64),
            sending: None,
            sends: 0,
            stall: None,
            requests: 0,
            open: true,
            broken: false,
            end: None,
            queued: false,
        });
        self.mark_ready(index as u32);
    }

    pub(super) fn mark_ready(&mut self, c: u32) {
        if let Some(Some(conn)) = self.conns.get_mut(c as usize)
            && !conn.queued
        {
            conn.queued = true;
            self.ready.push(c);
        }
    }

    /// `stop_conns` is set and the connections have not heard it yet.
    pub(super) fn stop_pending(&self) -> bool {
        !self.conns_stopped && self.stop_conns.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether any connection is live.
    pub(super) fn has_conns(&self) -> bool {
        self.conns.iter().any(Option::is_some)
    }

    /// Whether polling for a connection's next completion may pay: some
    /// connection is live, and none has a large batch of replies on the wire
    /// (see [`STREAMING`]). One pass over the connections.
    pub(super) fn conns_want_polling(&self) -> bool {
        let mut live = false;
        for c in self.conns.iter().flatten() {
            if c.sending.is_some_and(|(bytes, _, _)| bytes >= STREAMING) {
                return false;
            }
            live = true;
        }
        live
    }

    /// Runs every connection that has something to do.
    pub(super) fn run_conns(&mut self) {
        if let Some(head) = self.line.head() {
            self.mark_ready(head);
        }
        if self.stop_pending() {
            self.conns_stopped = true;
            for c in 0..self.conns.len() as u32 {
                if let Some(Some(conn)) = self.conns.get_mut(c as usize) {
                    conn.proto.stop();
                    self.mark_ready(c);
                }
            }
        }
        if self.closing_conns() {
            for c in 0..self.conns.len() as u32 {
                self.stop_reading(c, ConnEnd::Closed);
            }
        }
        while !self.ready.is_empty() {
            // Two lists swapped back and forth: no allocation once warm.
            let mut ready = std::mem::take(&mut self.ready_work);
            std::mem::swap(&mut ready, &mut self.ready);
            for &c in &ready {
                if let Some(Some(conn)) = self.conns.get_mut(c as usize) {
                    conn.queued = false;
                }
                self.read_requests(c);
                self.end_if_stopped(c);
                self.send(c);
                self.receive(c);
                self.maybe_close(c);
            }
            ready.clear();
            self.ready_work = ready;
        }
    }

    fn closing_conns(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Feeds the connection's input to its protocol until it needs more,
    /// waits, or closes.
    fn read_requests(&mut self, c: u32) {
        loop {
            let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
                return;
            };
            if !conn.open || conn.recv_busy || conn.payload.is_some() {
                return;
            }
            let Some(DevBuf::Own(input)) = self.ring.buf(conn.in_slot) else {
                return;
            };
            let bytes = &input.as_slice()[conn.in_start..conn.in_end];
            if conn.skip > 0 {
                let n = (conn.skip.min(bytes.len() as u64)) as usize;
                conn.in_start += n;
                conn.skip -= n as u64;
                if conn.skip > 0 {
                    conn.want_input = true;
                    return;
                }
                conn.proto.skipped(&mut conn.out);
                continue;
            }
            let unsent = conn.sending.map_or(0, |s| s.0);
            let unsent_heads = match self.ring.buf(conn.send_slot) {
                Some(DevBuf::Send(wire)) => wire.head_bytes(),
                _ => 0,
            };
            let mut cx = ConnCx {
                pool: &self.pool,
                line: &mut self.line,
                conn: c,
                max_io: self.max_io,
                unsent,
                unsent_heads,
                out: &mut conn.out,
            };
            let step = conn.proto.input(bytes, &mut cx);
            conn.want_input = false;
            match step {
                Step::Consumed(0) | Step::NeedInput => {
                    conn.want_input = true;
                    return;
                }
                Step::Consumed(n) => conn.in_start = (conn.in_start + n).min(conn.in_end),
                Step::Skip { consumed, skip } => {
                    conn.in_start = (conn.in_start + consumed).min(conn.in_end);
                    conn.skip = skip;
                    if skip == 0 {
                        conn.proto.skipped(&mut conn.out);
                    }
                }
                Step::NoMemory | Step::Wait => return,
                Step::Close { consumed, why } => {
                    conn.in_start = (conn.in_start + consumed).min(conn.in_end);
                    let end = why.map_or(ConnEnd::Done, ConnEnd::Broken);
                    self.stop_reading(c, end);
                    return;
                }
                Step::Submit {
                    consumed,
                    req,
                    payload,
                } => {
                    conn.in_start = (conn.in_start + consumed).min(conn.in_end);
                    let read = req.command == Command::Read;
                    self.take_payload(c, req, payload);
                    // What the requests read so far started goes to the
                    // host in groups, not after the whole batch: the disk
                    // starts on the first while the rest are parsed.
                    if read && self.ring.queued() >= SUBMIT_GROUP {
                        // A failure shows again at the next `run`.
                        let _ = self.ring.submit_queued();
                    }
                }
            }
        }
    }

    /// Moves a WRITE's payload from the input buffer into its chunks and
    /// receives the rest straight into them; submits the request when it is
    /// all there.
    fn take_payload(&mut self, c: u32, mut req: Request, payload: u64) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        let at = (req.offset % 512) as usize;
        let mut got = 0usize;
        if payload > 0
            && let (Some(data), Some(DevBuf::Own(input))) =
                (req.data.as_mut(), self.ring.buf(conn.in_slot))
        {
            let have = &input.as_slice()[conn.in_start..conn.in_end];
            let n = (payload.min(have.len() as u64)) as usize;
            got = data.copy_from_at(at, &have[..n]);
            conn.in_start += got;
        }
        let rest = payload - got as u64;
        if rest == 0 {
            self.submit_conn(c, req);
            return;
        }
        let Some(data) = req.data.take() else {
            self.submit_conn(c, req);
            return;
        };
        let cs = data.chunk_size();
        let pos = at + got;
        let _ = self.ring.attach(conn.payload_slot, DevBuf::Pool(data));
        let op = Op {
            kind: OpKind::RecvAll,
            file: conn.file,
            offset: 0,
            len: rest,
            buf: Some(BufRef {
                slot: conn.payload_slot,
                segment: (pos / cs) as u32,
                offset: pos % cs,
            }),
            tag: tag(P_PAYLOAD, c),
        };
        conn.payload_len = rest;
        conn.payload = Some(req);
        self.push(op);
    }

    /// Hands a connection's request to the device, in ticket order.
    fn submit_conn(&mut self, c: u32, req: Request) {
        if let Some(Some(conn)) = self.conns.get_mut(c as usize) {
            conn.requests += 1;
        }
        if let Err(errno) = check_request(&req, self.capacity, self.read_only, self.max_io) {
            self.conn_complete(c, req.token, Err(errno));
            return;
        }
        let seq = self.seq.clone();
        let ticket = seq.enter();
        // Requests handed to `Device::submit` under earlier tickets may still
        // wait in the intake: they go first (invariant 5).
        self.intake.take_requests_into(&mut self.local);
        if self.local.is_empty() && !self.free.is_empty() {
            self.start(req, Origin::Conn(c));
            drop(ticket);
            return;
        }
        self.local.push_back((req, Origin::Conn(c)));
        drop(ticket);
        // In order, and without the ticket: a request of `Device::submit`
        // that ends at once tells its sink, which may submit again.
        while !self.free.is_empty() {
            let Some((req, origin)) = self.local.pop_front() else {
                break;
            };
            self.start(req, origin);
        }
    }

    /// A request of connection `c` ended.
    pub(super) fn conn_complete(&mut self, c: u32, token: u64, result: Result<Reply, Errno>) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        conn.requests = conn.requests.saturating_sub(1);
        let fatal = conn.proto.complete(token, result, &mut conn.out);
        if conn.broken {
            conn.out.clear();
        }
        if let Some(why) = fatal {
            self.break_conn(c, why);
        }
        self.mark_ready(c);
    }

    /// Stops reading connection `c`; it closes once everything it started
    /// is answered.
    fn stop_reading(&mut self, c: u32, end: ConnEnd) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        if !conn.open {
            return;
        }
        conn.open = false;
        conn.end.get_or_insert(end);
        if conn.recv_busy || conn.payload.is_some() {
            // Ends the receive in flight.
            let _ = shutdown(conn.fd, Shutdown::Read);
        }
        conn.proto.input_ended(&mut conn.out);
        self.line.leave(c);
        self.mark_ready(c);
    }

    /// While some connection waits in the memory line: cuts each connection
    /// whose client has, for [`SEND_STALL`], read nothing of its replies (a
    /// send is on the wire, the socket holds bytes the client has not read,
    /// and neither changed) or sent nothing of the WRITE payload being
    /// received into its buffers: the memory they hold is what the line
    /// waits for. Looks at most four times per [`STALL_CHECK`].
    pub(super) fn cut_stalled_senders(&mut self) {
        let now = Instant::now();
        if self
            .stall_checked
            .is_some_and(|at| now.duration_since(at) < STALL_CHECK / 4)
        {
            return;
        }
        self.stall_checked = Some(now);
        for c in 0..self.conns.len() as u32 {
            let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
                continue;
            };
            // Nothing on the wire, or nothing unread (or no answer): the
            // client is not what holds a send up.
            let unread = if conn.sending.is_some() && !conn.broken {
                crate::engine::sockq::unread_output(conn.fd).unwrap_or(0)
            } else {
                0
            };
            let at = if unread > 0 {
                let moved = self.ring.progress_of(tag(P_SEND, c)).unwrap_or(0);
                Held::Send(conn.sends, moved, unread)
            } else if conn.payload.is_some() && !conn.broken {
                Held::Payload(self.ring.progress_of(tag(P_PAYLOAD, c)).unwrap_or(0))
            } else {
                conn.stall = None;
                continue;
            };
            let stalled_for = match conn.stall {
                Some((seen, since)) if seen == at => now.duration_since(since),
                _ => {
                    conn.stall = Some((at, now));
                    continue;
                }
            };
            if stalled_for >= SEND_STALL {
                let what = match at {
                    Held::Send(..) => "read none of its replies",
                    Held::Payload(_) => "sent none of a WRITE payload",
                };
                let why = format!(
                    "its client {what} for {}s while other connections waited for memory",
                    stalled_for.as_secs()
                );
                self.break_conn(c, why);
            }
        }
    }

    /// After [`Protocol::stop`]: stops reading once the protocol is drained
    /// and no request is partly received, so the connection closes when
    /// its replies are out. (A request the client sends after that is not
    /// read: the connection ends under it.)
    fn end_if_stopped(&mut self, c: u32) {
        if !self.conns_stopped {
            return;
        }
        let Some(Some(conn)) = self.conns.get(c as usize) else {
            return;
        };
        if conn.open
            && conn.payload.is_none()
            && conn.skip == 0
            && conn.in_start == conn.in_end
            && conn.requests == 0
            && conn.proto.drained()
        {
            self.stop_reading(c, ConnEnd::Stopped);
        }
    }

    /// The connection cannot go on: replies are dropped from now on.
    fn break_conn(&mut self, c: u32, why: String) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        if !conn.broken {
            tracing::debug!(conn = c, "{why}");
        }
        conn.broken = true;
        conn.out.clear();
        conn.end = Some(match conn.end.take() {
            None | Some(ConnEnd::Done | ConnEnd::Closed | ConnEnd::Stopped) => {
                ConnEnd::Broken(why.clone())
            }
            Some(end) => end,
        });
        let _ = shutdown(conn.fd, Shutdown::Both);
        self.stop_reading(c, ConnEnd::Broken(why));
    }

    /// Closes connection `c` once nothing of it is in flight.
    fn maybe_close(&mut self, c: u32) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        let quiet = !conn.open
            && !conn.recv_busy
            && conn.payload.is_none()
            && conn.sending.is_none()
            && conn.requests == 0
            && (conn.out.is_empty() || conn.broken)
            && self.ring.file_ops(conn.file) == 0;
        if !quiet {
            return;
        }
        let Some(mut conn) = self.conns[c as usize].take() else {
            return;
        };
        drop(self.ring.detach(conn.in_slot));
        drop(self.ring.detach(conn.payload_slot));
        drop(self.ring.detach(conn.send_slot));
        // Closes the socket (the last handle the device holds).
        drop(self.ring.remove_file(conn.file));
        self.line.leave(c);
        // The protocol (the owner's, and what it holds) goes before the
        // owner hears the end (invariant 1).
        let (done, end) = (conn.done.clone(), conn.end.take());
        drop(conn);
        done.set(end.unwrap_or(ConnEnd::Closed));
    }

    /// Ends every connection now (the worker is failing): their owners hear
    /// `why`. What the kernel may still use (buffers, sockets) is in the
    /// ring's tables, which drain or leak it; the rest of each connection,
    /// its protocol included, goes before its owner hears (invariant 1).
    pub(super) fn fail_conns(&mut self, why: &str) {
        for slot in &mut self.conns {
            let Some(conn) = slot.take() else { continue };
            let _ = shutdown(conn.fd, Shutdown::Both);
            let done = conn.done.clone();
            drop(conn);
            done.set(ConnEnd::Broken(why.to_string()));
        }
    }

    /// Whether the memory line's head may be able to allocate now (checked
    /// before the worker sleeps; a free after this wakes it).
    pub(super) fn line_may_move(&self) -> bool {
        if self.line.head().is_none() {
            return false;
        }
        self.pool.notify_free();
        let st = self.pool.stats();
        st.waiting == 0 && st.free >= self.line.need.max(1)
    }
}
