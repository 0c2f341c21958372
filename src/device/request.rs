//! A request's life on the worker: its start (planned into ops in
//! `plan.rs`, or handed to the flush round or BLOCK_STATUS), the dispatch of
//! completions, the checks of each op's result, and its end. A request ends
//! only when all its ops are back, and its slot and buffers are freed before
//! its caller hears of it (invariant 1).

use std::ops::Range;
use std::sync::Arc;

use nix::errno::Errno;

use super::log_every::LogEvery;
use super::worker::{
    FILE_BACKING, FILE_MAIN, Origin, P_BITMAP, P_COPY, P_DATA, P_FILL, P_PAYLOAD, P_PREALLOC,
    P_RECV, P_SEND, P_SYNC_DATA, P_SYNC_META, SECTOR, Worker, log_slot,
};
use super::{Command, Reply, Request};
use crate::engine::bufset::DevBuf;
use crate::engine::ring::{Completion, Op, OpKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Waiting in the range lock's line.
    Locking,
    /// Waiting for a scratch buffer.
    Scratch,
    /// Reading old sectors for a merge.
    Merging,
    /// Data ops in flight.
    Data,
    /// Waiting for a flush round.
    Flushing,
}

pub(super) struct Req {
    pub(super) command: Command,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) fua: bool,
    pub(super) no_hole: bool,
    pub(super) token: u64,
    pub(super) origin: Origin,
    pub(super) stage: Stage,
    pub(super) ops: u32,
    pub(super) error: Option<i32>,
    pub(super) scratch: Option<u32>,
    pub(super) locked: bool,
}

impl Req {
    pub(super) fn sectors(&self) -> Range<u64> {
        self.offset / SECTOR..(self.offset + self.len).div_ceil(SECTOR)
    }
    /// Byte of the first sector where the request's data starts.
    pub(super) fn head(&self) -> u64 {
        self.offset % SECTOR
    }
    /// Bytes of the last sector past the request's end (0 if it ends on a sector).
    pub(super) fn tail_gap(&self) -> u64 {
        (SECTOR - (self.offset + self.len) % SECTOR) % SECTOR
    }
}

impl Worker {
    /// Ends the batch of every sink that heard `complete_batched`.
    pub(super) fn flush_sinks(&mut self) {
        for sink in self.batched.drain(..) {
            sink.flush();
        }
    }

    /// Tells a request's origin of its end.
    pub(super) fn tell(&mut self, origin: Origin, token: u64, result: Result<Reply, Errno>) {
        match origin {
            Origin::Sink(sink) => {
                sink.complete_batched(token, result);
                if !self.batched.last().is_some_and(|s| Arc::ptr_eq(s, &sink)) {
                    self.batched.push(sink);
                }
            }
            Origin::Conn(c) => self.conn_complete(c, token, result),
        }
    }

    pub(super) fn start(&mut self, req: Request, origin: Origin) {
        let Some(slot) = self.free.pop() else {
            self.local.push_front((req, origin));
            return;
        };
        self.started += 1;
        let r = Req {
            command: req.command,
            offset: req.offset,
            len: req.len,
            fua: req.flags.fua,
            no_hole: req.flags.no_hole,
            token: req.token,
            origin,
            stage: Stage::Data,
            ops: 0,
            error: None,
            scratch: None,
            locked: false,
        };
        if let Some(data) = req.data
            && self.ring.attach(slot, DevBuf::Pool(data)).is_err()
        {
            self.free.push(slot);
            self.tell(r.origin, r.token, Err(Errno::EIO));
            return;
        }
        let command = r.command;
        let sectors = r.sectors();
        self.flushed |= command == Command::Flush || r.fua;
        self.reqs[slot as usize] = Some(r);
        match command {
            Command::Read => {
                self.plan_read(slot, sectors, slot, 0, P_DATA);
                self.maybe_finish(slot);
            }
            Command::Write | Command::WriteZeroes | Command::Trim => {
                if let Some(cow) = &self.cow
                    && sectors.end > cow.mapped
                    && command != Command::Trim
                {
                    // v1/v2 bitmaps have no bit for the last few sectors.
                    self.fail(slot, libc::EIO);
                    return;
                }
                if self.locks.acquire(slot, sectors) {
                    self.locked(slot);
                } else if let Some(r) = self.req(slot) {
                    r.stage = Stage::Locking;
                }
            }
            Command::Flush => {
                if let Some(r) = self.req(slot) {
                    r.stage = Stage::Flushing;
                }
                self.round.waiting.push(slot);
                self.start_round(false);
            }
            Command::Cache => {
                self.plan_cache(slot);
                self.maybe_finish(slot);
            }
            Command::BlockStatus => {
                let result = self.block_status(slot);
                self.end(slot, result);
            }
        }
    }

    pub(super) fn req(&mut self, slot: u32) -> Option<&mut Req> {
        self.reqs.get_mut(slot as usize)?.as_mut()
    }

    /// Emits an op for request `slot` and counts it.
    pub(super) fn emit(&mut self, owner: u32, op: Op) {
        if let Some(r) = self.req(owner) {
            r.ops += 1;
        }
        self.push(op);
    }

    pub(super) fn on_complete(&mut self, c: Completion) {
        let purpose = c.tag >> 32;
        let slot = (c.tag & 0xFFFF_FFFF) as u32;
        match purpose {
            P_SYNC_DATA | P_BITMAP | P_SYNC_META => self.on_round(purpose, c.result),
            P_RECV | P_PAYLOAD | P_SEND => self.on_conn_op(purpose, slot, &c),
            // Only ever a help: a failure just leaves holes.
            P_PREALLOC => {}
            P_COPY => self.copied(slot, &c),
            P_FILL => self.filled(slot, &c),
            _ => {
                let ok = self.check(&c);
                let Some(r) = self.req(slot) else { return };
                r.ops = r.ops.saturating_sub(1);
                if let Err(e) = ok {
                    r.error.get_or_insert(e);
                }
                self.maybe_finish(slot);
            }
        }
    }

    /// The overlay's (or raw image's) path.
    pub(super) fn main_path(&self) -> &std::path::Path {
        &self.paths[FILE_MAIN]
    }

    /// A completion's result, with short transfers judged: a read may stop at
    /// the end of the backing file's data (in the backing file, the raw
    /// image or the overlay), nowhere else. An overlay's sector that the
    /// bitmap marks present but the file does not reach (a truncated
    /// overlay) is an I/O error, not stale data. Failures are logged with
    /// the file and offset.
    fn check(&self, c: &Completion) -> Result<(), i32> {
        let op = &c.op;
        let path = || {
            self.paths
                .get(op.file)
                .map_or_else(String::new, |p| p.display().to_string())
        };
        let done = match c.result {
            Ok(done) => done,
            Err(e) => {
                if let Some(quiet) = self.fail_log[log_slot(op.file)].allow() {
                    tracing::warn!(
                        "{}: {:?} of {} bytes at offset {} failed: {}{}",
                        path(),
                        op.kind,
                        op.len,
                        op.offset,
                        Errno::from_raw(e),
                        LogEvery::more(quiet)
                    );
                }
                return Err(e);
            }
        };
        if !matches!(op.kind, OpKind::Read) || done >= op.len {
            return Ok(());
        }
        // Where the file may end (the buffer past it was zero-filled first).
        let file_len = match &self.cow {
            Some(cow) if op.file == FILE_BACKING => cow.backing_len,
            Some(cow) => cow.data_end(),
            None => self.main_len,
        };
        if op.offset + done >= file_len {
            return Ok(());
        }
        if let Some(quiet) = self.truncated_log[log_slot(op.file)].allow() {
            tracing::error!(
                "{}: read of {} bytes at offset {} ended after {} bytes: the file is \
                 shorter than the data it should hold (truncated?){}",
                path(),
                op.len,
                op.offset,
                done,
                LogEvery::more(quiet)
            );
        }
        Err(libc::EIO)
    }

    /// Moves a request on once its ops are done.
    pub(super) fn maybe_finish(&mut self, slot: u32) {
        let Some(r) = self.reqs[slot as usize].as_ref() else {
            return;
        };
        if r.ops > 0 {
            return;
        }
        match (r.stage, r.error) {
            (Stage::Locking | Stage::Scratch | Stage::Flushing, _) => {}
            (Stage::Merging, None) => {
                self.merge(slot);
                // The merge may have planned no ops (nothing else to write).
                if self.reqs[slot as usize]
                    .as_ref()
                    .is_some_and(|r| r.ops == 0)
                {
                    self.data_done(slot);
                }
            }
            (Stage::Merging, Some(e)) => {
                self.release_scratch(slot);
                self.fail(slot, e);
            }
            (Stage::Data, Some(e)) => self.fail(slot, e),
            (Stage::Data, None) => self.data_done(slot),
        }
    }

    /// Every data op of `slot` completed without error.
    fn data_done(&mut self, slot: u32) {
        let Some(r) = self.reqs[slot as usize].as_ref() else {
            return;
        };
        let (command, sectors, fua) = (r.command, r.sectors(), r.fua);
        match command {
            Command::Write | Command::WriteZeroes => {
                self.release_scratch(slot);
                // Invariant 7: the RAM bit only after the data write completed.
                self.set_bits(sectors);
                self.unlock(slot);
            }
            Command::Trim => self.unlock(slot),
            _ => {}
        }
        let changes = matches!(
            command,
            Command::Write | Command::WriteZeroes | Command::Trim
        );
        if changes && fua {
            if let Some(r) = self.req(slot) {
                r.stage = Stage::Flushing;
            }
            // The pool buffers are not needed while the round runs.
            drop(self.ring.detach(slot));
            self.round.waiting.push(slot);
            self.start_round(false);
            return;
        }
        let reply = match command {
            Command::Read => match self.ring.detach(slot) {
                Some(DevBuf::Pool(chunks)) => Ok(Reply::Data(chunks)),
                _ => Err(Errno::EIO),
            },
            _ => Ok(Reply::Done),
        };
        self.end(slot, reply);
    }

    fn unlock(&mut self, slot: u32) {
        let Some(r) = self.req(slot) else { return };
        if !std::mem::replace(&mut r.locked, false) {
            return;
        }
        let mut granted: [u32; 64] = [0; 64];
        let mut n = 0;
        let mut overflow = Vec::new();
        self.locks.release(slot, |s| {
            if n < granted.len() {
                granted[n] = s;
                n += 1;
            } else {
                overflow.push(s);
            }
        });
        for s in granted[..n].iter().copied().chain(overflow) {
            self.locked(s);
        }
    }

    fn fail(&mut self, slot: u32, errno: i32) {
        self.release_scratch(slot);
        self.unlock(slot);
        self.end(slot, Err(Errno::from_raw(errno)));
    }

    /// Ends request `slot`: frees its slot and buffers first, then tells the
    /// caller (invariant 1: nothing of the request is touched after that).
    pub(super) fn end(&mut self, slot: u32, result: Result<Reply, Errno>) {
        drop(self.ring.detach(slot));
        let Some(r) = self.reqs[slot as usize].take() else {
            return;
        };
        self.free.push(slot);
        self.tell(r.origin, r.token, result);
    }
}
