//! Transmission replies: the simple reply header, and structured or extended
//! chunks (`OFFSET_DATA`, `OFFSET_HOLE`, `ERROR`, `ERROR_OFFSET`, `NONE`,
//! `BLOCK_STATUS`, `BLOCK_STATUS_EXT`).
//!
//! Encoders append headers (and small payloads) to a caller-provided
//! `Vec<u8>`, allocating nothing when it has the capacity; bulk data such as a
//! read's bytes is not copied, the caller sends it after the header. An
//! encoder that fails appends nothing. Which header a chunk gets is the
//! caller's [`ChunkHead`], made once per reply from what was negotiated.

use thiserror::Error;

use super::consts::{
    EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, reply_flag, reply_type,
};
use super::wire::{MAX_STRING_LEN, truncate_str};

/// Bytes in a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes in a structured chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Bytes in an extended chunk header.
pub const EXTENDED_HEADER_LEN: usize = 32;
/// The most descriptors a block status chunk should carry.
pub const MAX_EXTENTS: usize = 1 << 20;

/// A reply that cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReplyError {
    /// The payload does not fit the header's length field.
    #[error("a chunk payload of {0} bytes does not fit the header")]
    PayloadTooLong(u64),
    /// A block status chunk needs at least one descriptor.
    #[error("a block status chunk needs at least one descriptor")]
    NoExtents,
    /// Extent lengths must be nonzero.
    #[error("block status descriptor {0} has length zero")]
    ZeroLengthExtent(usize),
    /// A hole must be nonzero.
    #[error("a hole chunk must cover at least one byte")]
    EmptyHole,
}

/// Which chunk header the connection uses, from negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStyle {
    /// `STRUCTURED_REPLY` was negotiated: 20-byte headers.
    Structured,
    /// `EXTENDED_HEADERS` was negotiated: 32-byte headers.
    Extended,
}

/// What every chunk of one reply shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHead {
    /// The header kind.
    pub style: ChunkStyle,
    /// Chunk flags (`reply_flag::DONE` on the last one).
    pub flags: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (sent in extended headers only).
    pub offset: u64,
}

impl ChunkHead {
    /// A head for the chunks answering a request, without `DONE`.
    pub fn new(style: ChunkStyle, cookie: u64, offset: u64) -> Self {
        ChunkHead {
            style,
            flags: 0,
            cookie,
            offset,
        }
    }

    /// The same head with `DONE` set: for the last chunk.
    pub fn done(self) -> Self {
        ChunkHead {
            flags: self.flags | reply_flag::DONE,
            ..self
        }
    }
}

/// Appends a simple reply header; for a successful READ the data follows.
pub fn put_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a chunk header of `head`'s style; `length` bytes of payload must
/// follow. Fails if `length` does not fit a structured header.
pub fn put_chunk_header(
    out: &mut Vec<u8>,
    head: ChunkHead,
    chunk_type: u16,
    length: u64,
) -> Result<(), ReplyError> {
    match head.style {
        ChunkStyle::Structured => {
            let length = u32::try_from(length).map_err(|_| ReplyError::PayloadTooLong(length))?;
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&head.flags.to_be_bytes());
            out.extend_from_slice(&chunk_type.to_be_bytes());
            out.extend_from_slice(&head.cookie.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        }
        ChunkStyle::Extended => {
            out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&head.flags.to_be_bytes());
            out.extend_from_slice(&chunk_type.to_be_bytes());
            out.extend_from_slice(&head.cookie.to_be_bytes());
            out.extend_from_slice(&head.offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        }
    }
    Ok(())
}

/// Appends a `NONE` chunk with `DONE`: the end of a reply, or the whole
/// successful reply under extended headers.
pub fn put_done(out: &mut Vec<u8>, head: ChunkHead) {
    // A zero length always fits.
    let _ = put_chunk_header(out, head.done(), reply_type::NONE, 0);
}

/// Appends an `OFFSET_DATA` header and its offset; `data_len` bytes of data
/// for `offset` onwards must follow.
pub fn put_offset_data(
    out: &mut Vec<u8>,
    head: ChunkHead,
    offset: u64,
    data_len: usize,
) -> Result<(), ReplyError> {
    let length = (data_len as u64)
        .checked_add(8)
        .ok_or(ReplyError::PayloadTooLong(u64::MAX))?;
    put_chunk_header(out, head, reply_type::OFFSET_DATA, length)?;
    out.extend_from_slice(&offset.to_be_bytes());
    Ok(())
}

/// Appends an `OFFSET_HOLE` chunk: `len` bytes at `offset` read as zeroes.
pub fn put_offset_hole(
    out: &mut Vec<u8>,
    head: ChunkHead,
    offset: u64,
    len: u32,
) -> Result<(), ReplyError> {
    if len == 0 {
        return Err(ReplyError::EmptyHole);
    }
    put_chunk_header(out, head, reply_type::OFFSET_HOLE, 12)?;
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

fn put_error_chunk(
    out: &mut Vec<u8>,
    head: ChunkHead,
    error: u32,
    message: &str,
    offset: Option<u64>,
) {
    let message = truncate_str(message, MAX_STRING_LEN);
    let (chunk_type, extra) = match offset {
        Some(_) => (reply_type::ERROR_OFFSET, 8),
        None => (reply_type::ERROR, 0),
    };
    // At most 4096 + 14 bytes: fits every header, and the u16.
    let length = 6 + message.len() as u64 + extra;
    let _ = put_chunk_header(out, head, chunk_type, length);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    if let Some(offset) = offset {
        out.extend_from_slice(&offset.to_be_bytes());
    }
}

/// Appends an `ERROR` chunk: `error` (an NBD errno) for the whole request,
/// with a message cut to 4096 bytes.
pub fn put_error(out: &mut Vec<u8>, head: ChunkHead, error: u32, message: &str) {
    put_error_chunk(out, head, error, message, None);
}

/// Appends an `ERROR_OFFSET` chunk: `error` at `offset`.
pub fn put_error_offset(
    out: &mut Vec<u8>,
    head: ChunkHead,
    error: u32,
    message: &str,
    offset: u64,
) {
    put_error_chunk(out, head, error, message, Some(offset));
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes this status covers; nonzero.
    pub length: u64,
    /// The context's status flags (32 bits for every context we serve).
    pub status: u32,
}

/// Appends one block status chunk for `context_id`: `BLOCK_STATUS` under a
/// structured head, `BLOCK_STATUS_EXT` under an extended one. Sends at most
/// `max` (and at most [`MAX_EXTENTS`]) of `extents`; under a structured head
/// an extent longer than 32 bits is cut to `u32::MAX` and ends the chunk.
/// Returns how many extents went out; the caller reports the rest later.
pub fn put_block_status(
    out: &mut Vec<u8>,
    head: ChunkHead,
    context_id: u32,
    extents: &[Extent],
    max: usize,
) -> Result<usize, ReplyError> {
    let take = extents.get(..max.min(MAX_EXTENTS)).unwrap_or(extents);
    if let Some(i) = take.iter().position(|e| e.length == 0) {
        return Err(ReplyError::ZeroLengthExtent(i));
    }
    let take = match head.style {
        ChunkStyle::Extended => take,
        ChunkStyle::Structured => match take.iter().position(|e| e.length > u64::from(u32::MAX)) {
            Some(i) => take.get(..=i).unwrap_or(take),
            None => take,
        },
    };
    if take.is_empty() {
        return Err(ReplyError::NoExtents);
    }
    // At most 2^20 extents: every length below fits its field.
    let count = take.len() as u64;
    match head.style {
        ChunkStyle::Structured => {
            put_chunk_header(out, head, reply_type::BLOCK_STATUS, 4 + 8 * count)?;
            out.extend_from_slice(&context_id.to_be_bytes());
            for e in take {
                let len = u32::try_from(e.length).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&e.status.to_be_bytes());
            }
        }
        ChunkStyle::Extended => {
            put_chunk_header(out, head, reply_type::BLOCK_STATUS_EXT, 8 + 16 * count)?;
            out.extend_from_slice(&context_id.to_be_bytes());
            out.extend_from_slice(&(count as u32).to_be_bytes());
            for e in take {
                out.extend_from_slice(&e.length.to_be_bytes());
                out.extend_from_slice(&u64::from(e.status).to_be_bytes());
            }
        }
    }
    Ok(take.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOKIE: u64 = 0x0102_0304_0506_0708;
    const COOKIE_BYTES: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn structured(flags: u8, chunk_type: [u8; 2], length: u32) -> Vec<u8> {
        let mut v = vec![0x66, 0x8e, 0x33, 0xef, 0, flags];
        v.extend_from_slice(&chunk_type);
        v.extend_from_slice(&COOKIE_BYTES);
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    fn extended(flags: u8, chunk_type: [u8; 2], offset: u64, length: u64) -> Vec<u8> {
        let mut v = vec![0x6e, 0x8a, 0x27, 0x8c, 0, flags];
        v.extend_from_slice(&chunk_type);
        v.extend_from_slice(&COOKIE_BYTES);
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    fn s() -> ChunkHead {
        ChunkHead::new(ChunkStyle::Structured, COOKIE, 0)
    }

    fn x() -> ChunkHead {
        ChunkHead::new(ChunkStyle::Extended, COOKIE, 512)
    }

    #[test]
    fn simple_reply() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, COOKIE, 22);
        let mut want = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22];
        want.extend_from_slice(&COOKIE_BYTES);
        assert_eq!(out, want);
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
    }

    #[test]
    fn headers() {
        let mut out = Vec::new();
        put_chunk_header(&mut out, s(), reply_type::OFFSET_DATA, 100).unwrap();
        assert_eq!(out, structured(0, [0, 1], 100));
        assert_eq!(out.len(), STRUCTURED_HEADER_LEN);
        assert_eq!(
            put_chunk_header(&mut out, s(), 1, 1 << 32),
            Err(ReplyError::PayloadTooLong(1 << 32))
        );
        assert_eq!(out.len(), STRUCTURED_HEADER_LEN);

        out.clear();
        put_chunk_header(&mut out, x().done(), reply_type::OFFSET_DATA, 1 << 32).unwrap();
        assert_eq!(out, extended(1, [0, 1], 512, 1 << 32));
        assert_eq!(out.len(), EXTENDED_HEADER_LEN);
    }

    #[test]
    fn done() {
        let mut out = Vec::new();
        put_done(&mut out, s());
        assert_eq!(out, structured(1, [0, 0], 0));
        out.clear();
        put_done(&mut out, x());
        assert_eq!(out, extended(1, [0, 0], 512, 0));
    }

    #[test]
    fn offset_data() {
        let mut out = Vec::new();
        put_offset_data(&mut out, s().done(), 4096, 512).unwrap();
        let mut want = structured(1, [0, 1], 520);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(out, want);
        assert!(put_offset_data(&mut out, s(), 0, u32::MAX as usize).is_err());
        assert_eq!(out, want);
    }

    #[test]
    fn offset_hole() {
        let mut out = Vec::new();
        put_offset_hole(&mut out, s(), 8192, 4096).unwrap();
        let mut want = structured(0, [0, 2], 12);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x10, 0]);
        assert_eq!(out, want);
        assert_eq!(
            put_offset_hole(&mut out, s(), 0, 0),
            Err(ReplyError::EmptyHole)
        );
        assert_eq!(out, want);
    }

    #[test]
    fn errors() {
        let mut out = Vec::new();
        put_error(&mut out, s().done(), 5, "io");
        let mut want = structured(1, [0x80, 1], 8);
        want.extend_from_slice(&[0, 0, 0, 5, 0, 2, b'i', b'o']);
        assert_eq!(out, want);

        out.clear();
        put_error_offset(&mut out, s(), 5, "", 4096);
        let mut want = structured(0, [0x80, 2], 14);
        want.extend_from_slice(&[0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(out, want);

        out.clear();
        put_error(&mut out, x(), 22, &"m".repeat(10_000));
        assert_eq!(out.len(), EXTENDED_HEADER_LEN + 6 + 4096);
        assert_eq!(out[36..38], [0x10, 0]);
    }

    #[test]
    fn block_status() {
        let extents = [
            Extent {
                length: 4096,
                status: 0,
            },
            Extent {
                length: 8192,
                status: 3,
            },
            Extent {
                length: 4096,
                status: 0,
            },
        ];
        let mut out = Vec::new();
        assert_eq!(
            put_block_status(&mut out, s().done(), 1, &extents, 2),
            Ok(2)
        );
        let mut want = structured(1, [0, 5], 20);
        want.extend_from_slice(&[0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0x20, 0, 0, 0, 0, 3]);
        assert_eq!(out, want);

        out.clear();
        assert_eq!(
            put_block_status(&mut out, x(), 2, &extents[1..2], 10),
            Ok(1)
        );
        let mut want = extended(0, [0, 6], 512, 24);
        want.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x20, 0]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(out, want);
    }

    #[test]
    fn block_status_limits() {
        let mut out = Vec::new();
        let big = [
            Extent {
                length: 1 << 40,
                status: 1,
            },
            Extent {
                length: 1,
                status: 0,
            },
        ];
        // A structured chunk cuts the long extent and stops there.
        assert_eq!(put_block_status(&mut out, s(), 1, &big, 9), Ok(1));
        assert_eq!(out[24..28], [0xff, 0xff, 0xff, 0xff]);
        out.clear();
        assert_eq!(put_block_status(&mut out, x(), 1, &big, 9), Ok(2));
        out.clear();
        assert_eq!(
            put_block_status(&mut out, s(), 1, &[], 9),
            Err(ReplyError::NoExtents)
        );
        assert_eq!(
            put_block_status(&mut out, s(), 1, &big, 0),
            Err(ReplyError::NoExtents)
        );
        let zero = [
            big[1],
            Extent {
                length: 0,
                status: 0,
            },
        ];
        assert_eq!(
            put_block_status(&mut out, s(), 1, &zero, 9),
            Err(ReplyError::ZeroLengthExtent(1))
        );
        assert!(out.is_empty());
        let many = vec![
            Extent {
                length: 1,
                status: 0
            };
            MAX_EXTENTS + 1
        ];
        assert_eq!(
            put_block_status(&mut out, x(), 1, &many, usize::MAX),
            Ok(MAX_EXTENTS)
        );
    }

    #[test]
    fn no_allocation_with_capacity() {
        let mut out = Vec::with_capacity(512);
        let ptr = out.as_ptr();
        put_simple_reply(&mut out, 1, 0);
        put_offset_data(&mut out, x(), 0, 4096).unwrap();
        put_offset_hole(&mut out, s(), 0, 1).unwrap();
        put_error(&mut out, s(), 5, "failed");
        put_done(&mut out, x());
        let e = [Extent {
            length: 1,
            status: 0,
        }; 4];
        put_block_status(&mut out, s(), 1, &e, 4).unwrap();
        assert_eq!(out.as_ptr(), ptr);
    }
}
