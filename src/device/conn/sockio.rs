//! A connection's socket ops on the ring: the receive into its input
//! buffer, the vectored sends of its gathered replies, and their
//! completions (a WRITE's payload received into its pool chunks included).

use nix::errno::Errno;

use super::{ConnEnd, INPUT, INPUT_SLACK, SEND_WINDOW};
use crate::device::worker::{P_PAYLOAD, P_RECV, P_SEND, Worker, tag};
use crate::engine::bufset::DevBuf;
use crate::engine::ring::{BufRef, Completion, Op, OpKind};

impl Worker {
    /// Puts what the connection gathered on the wire, if nothing is.
    pub(super) fn send(&mut self, c: u32) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        if conn.broken {
            conn.out.clear();
            return;
        }
        if conn.sending.is_some() || conn.out.is_empty() {
            return;
        }
        let mut buf = std::mem::replace(&mut conn.out, std::mem::take(&mut conn.spare));
        buf.seal();
        let (bytes, segs) = (buf.bytes(), buf.sealed_segments());
        if segs == 0 {
            // Only empty data pushes: their chunks simply go back.
            buf.clear();
            conn.spare = buf;
            return;
        }
        let _ = self.ring.attach(conn.send_slot, DevBuf::Send(buf));
        conn.sending = Some((bytes, 0, segs));
        self.push_send(c);
    }

    /// Pushes the send op for the next window of the send buffer.
    fn push_send(&mut self, c: u32) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        let Some((_, from, _)) = conn.sending else {
            return;
        };
        let Some(DevBuf::Send(buf)) = self.ring.buf(conn.send_slot) else {
            return;
        };
        let (n, len) = buf.window(from, SEND_WINDOW);
        let op = Op {
            kind: OpKind::Send,
            file: conn.file,
            offset: 0,
            len: len as u64,
            buf: Some(BufRef {
                slot: conn.send_slot,
                segment: from as u32,
                offset: 0,
            }),
            tag: tag(P_SEND, c),
        };
        if let Some(s) = conn.sending.as_mut() {
            s.1 = from + n;
        }
        conn.sends += 1;
        self.push(op);
    }

    /// Posts a receive when the protocol waits for input.
    pub(super) fn receive(&mut self, c: u32) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        if !conn.open || conn.recv_busy || conn.payload.is_some() || !conn.want_input {
            return;
        }
        let Some(DevBuf::Own(input)) = self.ring.buf_mut(conn.in_slot) else {
            return;
        };
        if conn.in_start == conn.in_end {
            conn.in_start = 0;
            conn.in_end = 0;
        } else if INPUT - conn.in_end < INPUT_SLACK {
            input
                .as_mut_slice()
                .copy_within(conn.in_start..conn.in_end, 0);
            conn.in_end -= conn.in_start;
            conn.in_start = 0;
        }
        let op = Op {
            kind: OpKind::Recv,
            file: conn.file,
            offset: 0,
            len: (INPUT - conn.in_end) as u64,
            buf: Some(BufRef {
                slot: conn.in_slot,
                segment: 0,
                offset: conn.in_end,
            }),
            tag: tag(P_RECV, c),
        };
        conn.recv_busy = true;
        self.push(op);
    }

    /// A socket op of connection `c` completed.
    pub(in crate::device) fn on_conn_op(&mut self, purpose: u64, c: u32, done: &Completion) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        match purpose {
            P_RECV => {
                conn.recv_busy = false;
                match done.result {
                    Ok(0) => {
                        let end = if conn.skip > 0 {
                            ConnEnd::Broken(format!(
                                "the client closed the connection in the middle of a refused \
                                 request's payload ({} bytes of it still to come)",
                                conn.skip
                            ))
                        } else if conn.in_start < conn.in_end {
                            ConnEnd::Broken(format!(
                                "the client closed the connection in the middle of a request \
                                 ({} bytes of it arrived)",
                                conn.in_end - conn.in_start
                            ))
                        } else {
                            ConnEnd::Closed
                        };
                        self.stop_reading(c, end);
                    }
                    Ok(n) => {
                        conn.in_end = (conn.in_end + n as usize).min(INPUT);
                        if !conn.open && conn.end == Some(ConnEnd::Stopped) {
                            // It raced the close: the connection ends
                            // without reading it.
                            conn.end = Some(ConnEnd::Broken(format!(
                                "the client sent {n} more bytes as the connection closed at \
                                 shutdown; they were not read"
                            )));
                        }
                    }
                    Err(e) => self.break_conn(c, format!("receiving: {}", Errno::from_raw(e))),
                }
            }
            P_PAYLOAD => {
                let chunks = match self.ring.detach(conn.payload_slot) {
                    Some(DevBuf::Pool(chunks)) => Some(chunks),
                    _ => None,
                };
                let Some(mut req) = conn.payload.take() else {
                    return;
                };
                let want = conn.payload_len;
                match (done.result, chunks) {
                    (Ok(n), Some(chunks)) if n == want => {
                        req.data = Some(chunks);
                        self.submit_conn(c, req);
                    }
                    (result, _) => {
                        let why = match result {
                            Ok(n) => format!(
                                "the client closed the connection after {n} of the last {want} \
                                 bytes of a {}-byte write payload",
                                req.len
                            ),
                            Err(e) => format!("receiving a payload: {}", Errno::from_raw(e)),
                        };
                        // The request never reached the device: count it
                        // and answer it, so the protocol owes nothing.
                        if let Some(Some(conn)) = self.conns.get_mut(c as usize) {
                            conn.requests += 1;
                        }
                        self.conn_complete(c, req.token, Err(Errno::EIO));
                        self.break_conn(c, why);
                    }
                }
            }
            P_SEND => {
                if let Err(e) = done.result {
                    let why = format!("sending replies: {}", Errno::from_raw(e));
                    if let Some(Some(conn)) = self.conns.get_mut(c as usize) {
                        conn.sending = None;
                    }
                    self.recycle_send(c);
                    self.break_conn(c, why);
                } else if conn.sending.is_some_and(|(_, next, segs)| next < segs) {
                    self.push_send(c);
                } else {
                    conn.sending = None;
                    self.recycle_send(c);
                }
            }
            _ => {}
        }
        self.mark_ready(c);
    }

    /// Takes the sent buffer back from the ring, empties it (its chunks go
    /// back to the pool) and keeps it for the next send.
    fn recycle_send(&mut self, c: u32) {
        let Some(Some(conn)) = self.conns.get_mut(c as usize) else {
            return;
        };
        if let Some(DevBuf::Send(mut buf)) = self.ring.detach(conn.send_slot) {
            buf.clear();
            conn.spare = buf;
        }
    }
}
