//! The flush protocol (invariant 7), one round at a time: snapshot the bitmap
//! blocks that changed into a staging buffer (every bit in them belongs to a
//! completed data write), fdatasync the overlay, write the staged blocks,
//! fdatasync again, then answer every FLUSH and FUA request of the round. A
//! FUA request joins a round after its own data has completed.
//!
//! This file owns the round's state and the RAM bitmap's changes: a bit is set
//! (`set_bits`) only after its sector's data write completed, and marks its
//! bitmap block dirty for the next round. A round that fails leaves its
//! blocks dirty.
//!
//! A failed fdatasync of a main file written through the page cache
//! (`cache=writeback`, or a file system without direct I/O) is for good:
//! Linux may have dropped those pages' data and marked them clean, so a later
//! fdatasync would succeed without them. From then on every round fails at
//! once with that error, and no bitmap block is written again (invariant 7),
//! as qemu does for the same reason. With direct I/O the data is not in the
//! page cache, and the next round may try again.

use std::ops::Range;

use nix::errno::Errno;

use super::Reply;
use super::worker::{
    BLOCK, FILE_MAIN, FILE_META, P_BITMAP, P_SYNC_DATA, P_SYNC_META, SCRATCH, Worker, tag,
};
use crate::engine::bufset::DevBuf;
use crate::engine::ring::{BufRef, Op, OpKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Idle,
    SyncData,
    Bitmap,
    SyncMeta,
}

pub(super) struct Round {
    pub(super) phase: Phase,
    pub(super) waiting: Vec<u32>,
    pub(super) members: Vec<u32>,
    pub(super) blocks: Vec<u32>,
    pub(super) pending: u32,
    pub(super) error: Option<i32>,
    /// The error of a failed fdatasync of a buffered main file: every
    /// round since has failed with it.
    pub(super) lost: Option<i32>,
}

impl Worker {
    pub(super) fn set_bits(&mut self, sectors: Range<u64>) {
        let Some(cow) = self.cow.as_mut() else { return };
        // Bits already set need no bitmap write: a round that started
        // before them, or the next one, makes them durable, and a later
        // FLUSH waits for both. A rewrite then costs a FLUSH one sync.
        if sectors.is_empty()
            || cow.ram.next_change(sectors.start, sectors.end, true) == sectors.end
        {
            return;
        }
        cow.ram.set_range(sectors.clone(), true);
        let first = sectors.start / 8 / BLOCK;
        let last = (sectors.end - 1) / 8 / BLOCK;
        for b in first..=last {
            if let Some(d) = cow.dirty.get_mut(b as usize)
                && !*d
            {
                *d = true;
                cow.dirty_list.push(b as u32);
            }
        }
    }

    /// Starts a flush round if none runs and someone waits (or `always`).
    pub(super) fn start_round(&mut self, always: bool) {
        if self.round.phase != Phase::Idle || (self.round.waiting.is_empty() && !always) {
            return;
        }
        std::mem::swap(&mut self.round.members, &mut self.round.waiting);
        self.round.error = None;
        self.round.blocks.clear();
        if let Some(e) = self.round.lost {
            self.round.error = Some(e);
            self.finish_round();
            return;
        }
        let staging = self.max_requests + SCRATCH;
        if let Some(cow) = self.cow.as_mut() {
            // Snapshot: every bit here belongs to a completed data write.
            std::mem::swap(&mut self.round.blocks, &mut cow.dirty_list);
            if let Some(own) = self.ring.buf_mut(staging).and_then(DevBuf::own_mut) {
                let dst = own.as_mut_slice();
                let src = cow.ram.as_bytes();
                for &b in &self.round.blocks {
                    cow.dirty[b as usize] = false;
                    let from = (u64::from(b) * BLOCK) as usize;
                    let to = (from + BLOCK as usize).min(src.len());
                    dst[from..to].copy_from_slice(&src[from..to]);
                }
            }
        }
        self.round.phase = Phase::SyncData;
        self.round.pending = 1;
        self.push(Op {
            kind: OpKind::Fdatasync,
            file: FILE_MAIN,
            offset: 0,
            len: 0,
            buf: None,
            tag: tag(P_SYNC_DATA, 0),
        });
    }

    pub(super) fn on_round(&mut self, purpose: u64, result: Result<u64, i32>) {
        if let Err(e) = result {
            self.round.error.get_or_insert(e);
            if purpose == P_SYNC_DATA && !self.main_direct && self.round.lost.is_none() {
                self.round.lost = Some(e);
                tracing::error!(
                    "{}: fdatasync failed: {}; data written through the page cache may be \
                     lost, so every FLUSH fails from now on (restart the server to go on \
                     from what is on disk)",
                    self.main_path().display(),
                    Errno::from_raw(e)
                );
            }
        }
        self.round.pending = self.round.pending.saturating_sub(1);
        if self.round.pending > 0 {
            return;
        }
        let next = match (purpose, &self.cow, self.round.error) {
            (P_SYNC_DATA, Some(_), None) if !self.round.blocks.is_empty() => Phase::Bitmap,
            (P_BITMAP, _, None) => Phase::SyncMeta,
            _ => Phase::Idle,
        };
        match next {
            Phase::Bitmap => {
                let (offset, len) = match &self.cow {
                    Some(c) => (c.bitmap_offset, c.bitmap_len),
                    None => return,
                };
                let staging = self.max_requests + SCRATCH;
                self.round.phase = Phase::Bitmap;
                self.round.pending = self.round.blocks.len() as u32;
                for i in 0..self.round.blocks.len() {
                    let b = u64::from(self.round.blocks[i]);
                    self.push(Op {
                        kind: OpKind::Write,
                        file: FILE_META,
                        offset: offset + b * BLOCK,
                        len: BLOCK.min(len - b * BLOCK),
                        buf: Some(BufRef {
                            slot: staging,
                            segment: 0,
                            offset: (b * BLOCK) as usize,
                        }),
                        tag: tag(P_BITMAP, 0),
                    });
                }
            }
            Phase::SyncMeta => {
                self.round.phase = Phase::SyncMeta;
                self.round.pending = 1;
                self.push(Op {
                    kind: OpKind::Fdatasync,
                    file: FILE_META,
                    offset: 0,
                    len: 0,
                    buf: None,
                    tag: tag(P_SYNC_META, 0),
                });
            }
            _ => self.finish_round(),
        }
    }

    fn finish_round(&mut self) {
        let error = self.round.error;
        if error.is_some()
            && let Some(cow) = self.cow.as_mut()
        {
            // The blocks were not made durable: they stay dirty.
            for &b in &self.round.blocks {
                if !cow.dirty[b as usize] {
                    cow.dirty[b as usize] = true;
                    cow.dirty_list.push(b);
                }
            }
        }
        self.round.phase = Phase::Idle;
        let mut members = std::mem::take(&mut self.round.members);
        for &slot in &members {
            let result = match error {
                Some(e) => Err(Errno::from_raw(e)),
                None => Ok(Reply::Done),
            };
            self.end(slot, result);
        }
        members.clear();
        self.round.members = members;
        self.start_round(false);
    }
}
