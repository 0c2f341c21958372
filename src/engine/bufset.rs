//! The buffer sets the device attaches to its ring: a request's pool chunks,
//! one of the device's own aligned buffers, or replies on their way out of a
//! socket.

use super::aligned::AlignedBuf;
use super::bufpool::Chunks;
use super::ring::BufSet;
use super::sendbuf::SendBuf;

// SAFETY: each chunk is `chunk_size` bytes of the pool's arena, which stays
// mapped while the `Chunks` (holding the pool's Arc) lives; chunks are distinct
// indices, so segments do not overlap; the pool hands an index to one `Chunks`
// at a time, and addresses do not depend on where the `Chunks` value is.
unsafe impl BufSet for Chunks {
    fn segments(&self) -> usize {
        self.len()
    }
    fn segment(&self, i: usize) -> (*mut u8, usize) {
        (self.ptr(i), self.chunk_size())
    }
}

/// A buffer set of the device: request data from the pool, or the device's
/// own memory (merge scratch, bitmap staging).
// `Chunks` keeps its indices inline so that no request allocates; boxing it
// to shrink the enum would bring that allocation back.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum DevBuf {
    Pool(Chunks),
    Own(AlignedBuf),
    Send(SendBuf),
}

impl DevBuf {
    /// The whole set as one byte slice, for the device's own buffers.
    pub fn own(&self) -> Option<&AlignedBuf> {
        match self {
            DevBuf::Own(b) => Some(b),
            _ => None,
        }
    }

    pub fn own_mut(&mut self) -> Option<&mut AlignedBuf> {
        match self {
            DevBuf::Own(b) => Some(b),
            _ => None,
        }
    }

    pub fn chunks_mut(&mut self) -> Option<&mut Chunks> {
        match self {
            DevBuf::Pool(c) => Some(c),
            _ => None,
        }
    }

    /// Zeroes `len` bytes from byte `pos` of the set (across segments).
    pub fn zero(&mut self, pos: usize, len: usize) {
        match self {
            DevBuf::Own(b) => {
                let s = b.as_mut_slice();
                let end = (pos + len).min(s.len());
                if pos < end {
                    s[pos..end].fill(0);
                }
            }
            DevBuf::Pool(c) => {
                let cs = c.chunk_size();
                let (mut at, end) = (pos, (pos + len).min(c.bytes()));
                while at < end {
                    let (i, off) = (at / cs, at % cs);
                    let n = (cs - off).min(end - at);
                    c.chunk_mut(i)[off..off + n].fill(0);
                    at += n;
                }
            }
            DevBuf::Send(_) => {}
        }
    }
}

// SAFETY: delegates to the two implementations above, whose promises hold for
// the variant held.
unsafe impl BufSet for DevBuf {
    fn segments(&self) -> usize {
        match self {
            DevBuf::Pool(c) => c.segments(),
            DevBuf::Own(b) => b.segments(),
            DevBuf::Send(s) => s.segments(),
        }
    }
    fn segment(&self, i: usize) -> (*mut u8, usize) {
        match self {
            DevBuf::Pool(c) => c.segment(i),
            DevBuf::Own(b) => b.segment(i),
            DevBuf::Send(s) => s.segment(i),
        }
    }
}
