//! What an op is: the buffer sets ops move data through, and the op and its
//! terminal completion as the ring's owner sees them.

/// A set of buffers (one or more segments) that ops read into or write from.
///
/// # Safety
/// An implementation promises that each `segment(i)` for `i < segments()`
/// is valid for reads and writes of its length for as long as the value lives,
/// that the addresses do not change when the value is moved, that segments do
/// not overlap, and that nothing else reads or writes that memory while the
/// value is attached to a [`Ring`] with ops in flight.
pub unsafe trait BufSet: Send {
    fn segments(&self) -> usize;
    /// Address and length of segment `i`.
    fn segment(&self, i: usize) -> (*mut u8, usize);
}

/// Where an op's data is: from byte `offset` of segment `segment` of the set
/// attached at buffer slot `slot`, running on into the following segments
/// when the op is longer than what is left of that one (vectored I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufRef {
    pub slot: u32,
    pub segment: u32,
    pub offset: usize,
}

/// What an op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Read `len` bytes at `offset` into the buffer at `buf_offset`. Stops short
    /// only at end of file.
    Read,
    /// Write `len` bytes from the buffer at `buf_offset` to `offset`.
    Write,
    /// `fsync` (data and metadata).
    Fsync,
    /// `fdatasync`.
    Fdatasync,
    /// `fallocate(mode)` over `offset..offset + len`.
    Fallocate { mode: i32 },
    /// `posix_fadvise(advice)` over `offset..offset + len`.
    Fadvise { advice: i32 },
    /// Does nothing; completes at once.
    Nop,
    /// Socket: receive up to `len` bytes into the buffer; completes with
    /// whatever arrived (0: the peer closed its side).
    Recv,
    /// Socket: receive exactly `len` bytes, resubmitting after short
    /// receives; completes short only when the peer closed its side.
    RecvAll,
    /// Socket: send all `len` bytes, resubmitting after short sends.
    Send,
}

impl OpKind {
    /// Ops that move bytes through a buffer.
    pub(super) fn transfers(self) -> bool {
        matches!(
            self,
            OpKind::Read | OpKind::Write | OpKind::Recv | OpKind::RecvAll | OpKind::Send
        )
    }

    /// Socket ops: no file offset (sockets refuse one).
    pub(super) fn is_stream(self) -> bool {
        matches!(self, OpKind::Recv | OpKind::RecvAll | OpKind::Send)
    }

    /// Ops that fill the buffer (the others read from it).
    pub(super) fn fills(self) -> bool {
        matches!(self, OpKind::Read | OpKind::Recv | OpKind::RecvAll)
    }
}

/// One op to hand to the kernel.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub kind: OpKind,
    /// Index of the file in the ring's file table.
    pub file: usize,
    pub offset: u64,
    pub len: u64,
    /// The data, for reads and writes.
    pub buf: Option<BufRef>,
    /// The caller's token, given back in the completion.
    pub tag: u64,
}

/// The terminal result of an op.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub tag: u64,
    /// Bytes transferred (reads: fewer than asked only at end of file), or the
    /// errno.
    pub result: Result<u64, i32>,
    /// The op as it was pushed.
    pub op: Op,
}
