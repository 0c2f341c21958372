//! The ring's hooks for tests and tools: each file's role, the recorder that
//! logs writes and syncs as they are submitted, and injected faults.

use std::sync::Arc;

use super::{BufRef, BufSet, Op, OpKind, Ring};
use crate::engine::record::{Event, Faults, OpClass, Recorder, Role};

impl<B: BufSet> Ring<B> {
    /// Sets what each file is to the owner (for the recorder and faults);
    /// files past the end are [`Role::Other`].
    pub fn set_roles(&mut self, roles: Vec<Role>) {
        self.roles = roles;
    }

    /// Logs every write and sync from now on into `recorder`.
    pub fn set_recorder(&mut self, recorder: Option<Arc<Recorder>>) {
        self.recorder = recorder;
    }

    /// Fails the ops `faults` names from now on.
    pub fn set_faults(&mut self, faults: Option<Arc<Faults>>) {
        self.faults = faults;
    }

    fn role(&self, file: usize) -> Role {
        self.roles.get(file).copied().unwrap_or(Role::Other)
    }

    /// The errno an injected fault gives `op`, if one applies.
    pub(super) fn injected(&self, op: &Op) -> Option<i32> {
        let faults = self.faults.as_ref()?;
        let class = match op.kind {
            OpKind::Read => OpClass::Read,
            OpKind::Write => OpClass::Write,
            OpKind::Fsync | OpKind::Fdatasync => OpClass::Sync,
            OpKind::Fallocate { .. } => OpClass::Fallocate,
            _ => return None,
        };
        faults.check(class, self.role(op.file), op.offset..op.offset + op.len)
    }

    /// Logs `op`'s submission, if it changes a file or syncs one.
    pub(super) fn record(&self, op: &Op) -> Option<u64> {
        let rec = self.recorder.as_ref()?;
        let role = self.role(op.file);
        let (offset, len) = (op.offset, op.len);
        match op.kind {
            OpKind::Write => {
                let data = self.gather(op.buf?, len)?;
                Some(rec.start(|op| Event::Write {
                    op,
                    role,
                    offset,
                    data,
                }))
            }
            OpKind::Fallocate { mode }
                if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 =>
            {
                Some(rec.start(|op| Event::Zero {
                    op,
                    role,
                    offset,
                    len,
                }))
            }
            OpKind::Fsync | OpKind::Fdatasync => Some(rec.start(|op| Event::Sync { op, role })),
            _ => None,
        }
    }

    /// A copy of the `len` bytes an op would write from `r`.
    fn gather(&self, r: BufRef, len: u64) -> Option<Vec<u8>> {
        let set = self.bufs.get(r.slot as usize)?.as_ref()?;
        let mut out = Vec::with_capacity(usize::try_from(len).ok()?);
        let (mut seg, mut off) = (r.segment as usize, r.offset);
        while (out.len() as u64) < len && seg < set.segments() {
            let (base, seg_len) = set.segment(seg);
            if off < seg_len {
                let take = (seg_len - off).min(len as usize - out.len());
                // SAFETY: `off + take <= seg_len`, so the range lies in the
                // segment, which the attached set keeps valid (BufSet's
                // contract); the op is not submitted yet and the owner cannot
                // reach an attached set, so nothing writes it meanwhile.
                let bytes = unsafe { std::slice::from_raw_parts(base.add(off), take) };
                out.extend_from_slice(bytes);
            }
            off = off.saturating_sub(seg_len);
            seg += 1;
        }
        (out.len() as u64 == len).then_some(out)
    }
}
