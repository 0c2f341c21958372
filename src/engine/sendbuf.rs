//! Bytes on their way out of a socket: header bytes the owner writes, and
//! data that stays in the pool chunks a device request filled (READ replies go
//! to the socket straight from the pool, with no copy).
//!
//! A [`SendBuf`] gathers replies in order. Sealed, it is a [`BufSet`] whose
//! segments are the header runs and the data runs, in that order, so one
//! vectored send op covers many replies. Any change after sealing unseals it
//! (its segment list empties), so the segments the ring sees always match
//! the memory they describe. The chunks it holds go back to the pool when it
//! is cleared or dropped, which the owner does only once no op uses it
//! (invariant 3: the ring owns an attached set until its last op's end).

use std::ops::Range;

use super::bufpool::Chunks;
use super::ring::BufSet;

#[derive(Debug)]
enum Seg {
    Head(Range<usize>),
    Data {
        chunks: usize,
        start: usize,
        len: usize,
    },
}

/// Replies gathered for one vectored send.
#[derive(Debug, Default)]
pub struct SendBuf {
    heads: Vec<u8>,
    segs: Vec<Seg>,
    chunks: Vec<Chunks>,
    /// The sealed segments, as (address, length); empty when unsealed.
    iov: Vec<(usize, usize)>,
    bytes: usize,
}

impl SendBuf {
    /// An empty buffer with room for `replies` replies before it allocates.
    pub fn with_capacity(replies: usize) -> SendBuf {
        SendBuf {
            heads: Vec::with_capacity(replies * 32),
            segs: Vec::with_capacity(replies * 2),
            chunks: Vec::with_capacity(replies),
            iov: Vec::with_capacity(replies * 4),
            bytes: 0,
        }
    }

    /// Header bytes: append to the returned vector, then call
    /// [`SendBuf::commit_head`] with the length it had before.
    pub fn heads(&mut self) -> &mut Vec<u8> {
        self.iov.clear();
        &mut self.heads
    }

    /// Where the next header bytes will start (for `commit_head`).
    pub fn mark(&self) -> usize {
        self.heads.len()
    }

    /// Makes the header bytes appended since `from` the next segment.
    pub fn commit_head(&mut self, from: usize) {
        self.iov.clear();
        let to = self.heads.len();
        if to <= from {
            return;
        }
        self.bytes += to - from;
        // Runs of headers with nothing between them go as one segment.
        if let Some(Seg::Head(r)) = self.segs.last_mut()
            && r.end == from
        {
            r.end = to;
            return;
        }
        self.segs.push(Seg::Head(from..to));
    }

    /// Drops header bytes appended since `from` that were not committed.
    pub fn discard_head(&mut self, from: usize) {
        self.iov.clear();
        self.heads.truncate(from);
    }

    /// Sends `len` bytes of `chunks` from byte `start` next; holds the
    /// chunks until the buffer is cleared.
    pub fn push_data(&mut self, chunks: Chunks, start: usize, len: usize) {
        self.iov.clear();
        let len = len.min(chunks.bytes().saturating_sub(start));
        self.bytes += len;
        self.chunks.push(chunks);
        if len > 0 {
            self.segs.push(Seg::Data {
                chunks: self.chunks.len() - 1,
                start,
                len,
            });
        }
    }

    /// Header bytes gathered (held here, not in pool chunks).
    pub fn head_bytes(&self) -> usize {
        self.heads.len()
    }

    /// Bytes gathered.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0 && self.chunks.is_empty()
    }

    /// Builds the segment list; the buffer must not change while an op
    /// uses it (any change unseals it).
    pub fn seal(&mut self) {
        self.iov.clear();
        let base = self.heads.as_ptr() as usize;
        for seg in &self.segs {
            match *seg {
                Seg::Head(ref r) => self.iov.push((base + r.start, r.len())),
                Seg::Data { chunks, start, len } => {
                    let c = &self.chunks[chunks];
                    let cs = c.chunk_size();
                    let (mut pos, end) = (start, start + len);
                    while pos < end {
                        let (i, at) = (pos / cs, pos % cs);
                        let n = (cs - at).min(end - pos);
                        self.iov.push((c.ptr(i) as usize + at, n));
                        pos += n;
                    }
                }
            }
        }
    }

    /// Segments of the sealed buffer (0 when unsealed).
    pub fn sealed_segments(&self) -> usize {
        self.iov.len()
    }

    /// Sealed segments `from..` that fit one op of at most `max` segments:
    /// how many, and their total length.
    pub fn window(&self, from: usize, max: usize) -> (usize, usize) {
        let segs = &self.iov[from.min(self.iov.len())..];
        let n = segs.len().min(max);
        (n, segs[..n].iter().map(|s| s.1).sum())
    }

    /// Empties the buffer and gives its chunks back to the pool; keeps the
    /// capacity.
    pub fn clear(&mut self) {
        self.iov.clear();
        self.heads.clear();
        self.segs.clear();
        self.chunks.clear();
        self.bytes = 0;
    }
}

// SAFETY: the sealed segments point into `heads` (heap memory that does not
// move when the value moves, and does not change while sealed: every method
// that could reallocate it unseals first) and into chunks this value owns
// (pool memory that stays mapped while the `Chunks` live). Segments do not
// overlap: header ranges are disjoint, and data runs are in distinct chunks or
// distinct ranges of one chunk. While attached to a ring the owner cannot
// reach the value, so nothing changes it under an op.
unsafe impl BufSet for SendBuf {
    fn segments(&self) -> usize {
        self.iov.len()
    }
    fn segment(&self, i: usize) -> (*mut u8, usize) {
        let (addr, len) = self.iov[i];
        (addr as *mut u8, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::bufpool::{BufPool, PoolConfig};

    #[test]
    fn segments_follow_the_replies_in_order() {
        let pool = BufPool::new(PoolConfig {
            chunk_size: 4096,
            chunks: 8,
            reserve: 4,
            lock_memory: false,
            poison_on_free: false,
        })
        .unwrap();
        let mut data = pool.try_alloc(2).unwrap();
        data.copy_from_at(100, &[7u8; 5000]);
        let mut b = SendBuf::with_capacity(4);
        let m = b.mark();
        b.heads().extend_from_slice(b"abcd");
        b.commit_head(m);
        let m = b.mark();
        b.heads().extend_from_slice(b"ef");
        b.commit_head(m);
        b.push_data(data, 100, 5000);
        let m = b.mark();
        b.heads().extend_from_slice(b"gh");
        b.commit_head(m);
        assert_eq!(b.bytes(), 6 + 5000 + 2);
        assert_eq!(b.segments(), 0, "unsealed");
        b.seal();
        // "abcdef" as one run, the data across two chunks, "gh".
        let lens: Vec<usize> = (0..b.segments()).map(|i| b.segment(i).1).collect();
        assert_eq!(lens, vec![6, 3996, 1004, 2]);
        assert_eq!(b.window(1, 2), (2, 5000));
        assert_eq!(b.window(3, 64), (1, 2));
        assert_eq!(pool.stats().free, 6);
        b.clear();
        assert!(b.is_empty());
        assert_eq!(pool.stats().free, 8);
    }
}
