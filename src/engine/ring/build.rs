//! Turns an op table slot into its SQE: the file (fixed or by fd), where a
//! transfer resumes, the iovecs it spans, and the fixed-buffer variants when
//! every segment lies in the registered arena.

use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};

use super::{BufSet, MAX_IOV, OpKind, Ring};

impl<B: BufSet> Ring<B> {
    pub(super) fn build(&mut self, index: u32) -> Result<squeue::Entry, i32> {
        let slot = self.slots[index as usize].as_ref().ok_or(libc::EINVAL)?;
        let op = &slot.op;
        let file = self
            .files
            .get(op.file)
            .and_then(Option::as_ref)
            .ok_or(libc::EBADF)?;
        // Sockets take no offset: a resubmission goes on from where the
        // stream is.
        let offset = if op.kind.is_stream() {
            0
        } else {
            op.offset + slot.done
        };
        let fd = if self.registered.get(op.file) == Some(&true) {
            None
        } else {
            Some(file.as_raw_fd())
        };
        let entry = match op.kind {
            kind if kind.transfers() => {
                let r = op.buf.ok_or(libc::EFAULT)?;
                let set = self
                    .bufs
                    .get(r.slot as usize)
                    .and_then(Option::as_ref)
                    .ok_or(libc::EFAULT)?;
                if r.segment as usize >= set.segments() {
                    return Err(libc::EFAULT);
                }
                let remaining = u32::try_from(op.len - slot.done).map_err(|_| libc::EINVAL)?;
                if remaining == 0 {
                    // Nothing to move: no iovec is built, so no address
                    // (another op's, or none) goes to the kernel. It
                    // completes with 0 bytes.
                    return Ok(opcode::Nop::new().build());
                }
                // Find where the transfer resumes, then the segments it spans.
                let (mut seg, mut off) = (r.segment as usize, r.offset + slot.done as usize);
                while seg < set.segments() && off >= set.segment(seg).1 {
                    off -= set.segment(seg).1;
                    seg += 1;
                }
                let iov = &mut self.iovs[index as usize];
                let (mut n, mut left) = (0usize, remaining as usize);
                while left > 0 {
                    if seg >= set.segments() || n == MAX_IOV {
                        return Err(libc::EINVAL);
                    }
                    let (base, seg_len) = set.segment(seg);
                    let take = (seg_len - off).min(left);
                    // SAFETY: off < seg_len, so the pointer stays inside the
                    // segment, which the ring's buffer table owns while this
                    // op is in flight.
                    iov[n].iov_base = unsafe { base.add(off) }.cast();
                    iov[n].iov_len = take;
                    n += 1;
                    left -= take;
                    off = 0;
                    seg += 1;
                }
                let ptr = iov[0].iov_base.cast::<u8>();
                let iov_ptr = iov.as_ptr();
                let vectored = n > 1;
                let in_arena = |v: &libc::iovec| {
                    self.arena.is_some_and(|(base, len)| {
                        let p = v.iov_base as usize;
                        p >= base && p + v.iov_len <= base + len
                    })
                };
                let fixed = iov[..n].iter().all(in_arena) && (!vectored || self.vectored_fixed);
                let fills = op.kind.fills();
                macro_rules! rw {
                    ($fd:expr) => {
                        match (fills, fixed) {
                            (true, _) if vectored => opcode::Readv::new($fd, iov_ptr, n as u32)
                                .offset(offset)
                                .build(),
                            (false, _) if vectored => opcode::Writev::new($fd, iov_ptr, n as u32)
                                .offset(offset)
                                .build(),
                            (true, true) => opcode::ReadFixed::new($fd, ptr, remaining, 0)
                                .offset(offset)
                                .build(),
                            (true, false) => opcode::Read::new($fd, ptr, remaining)
                                .offset(offset)
                                .build(),
                            (false, true) => opcode::WriteFixed::new($fd, ptr, remaining, 0)
                                .offset(offset)
                                .build(),
                            (false, false) => opcode::Write::new($fd, ptr, remaining)
                                .offset(offset)
                                .build(),
                        }
                    };
                }
                match fd {
                    None => rw!(types::Fixed(op.file as u32)),
                    Some(fd) => rw!(types::Fd(fd)),
                }
            }
            kind => {
                macro_rules! other {
                    ($fd:expr) => {
                        match kind {
                            OpKind::Fsync => opcode::Fsync::new($fd).build(),
                            OpKind::Fdatasync => opcode::Fsync::new($fd)
                                .flags(types::FsyncFlags::DATASYNC)
                                .build(),
                            OpKind::Fallocate { mode } => opcode::Fallocate::new($fd, op.len)
                                .offset(op.offset)
                                .mode(mode)
                                .build(),
                            OpKind::Fadvise { advice } => {
                                let len = i64::try_from(op.len).map_err(|_| libc::EINVAL)?;
                                opcode::Fadvise::new($fd, len, advice)
                                    .offset(op.offset)
                                    .build()
                            }
                            _ => opcode::Nop::new().build(),
                        }
                    };
                }
                match fd {
                    None => other!(types::Fixed(op.file as u32)),
                    Some(fd) => other!(types::Fd(fd)),
                }
            }
        };
        Ok(entry)
    }
}
