//! Transmission requests, compact (28 bytes) and extended (32 bytes).
//!
//! Both decode to one [`Request`] with a 64-bit length. A bad magic means the
//! stream has lost its framing and the connection must close; the checks
//! that follow (known command, valid flags, range) belong to the caller, which
//! answers them with an errno and goes on.

use thiserror::Error;

use super::consts::{EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC};
use super::wire::Reader;

/// Bytes in a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes in an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// A request header that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RequestError {
    /// Fewer bytes than a header.
    #[error("request header needs {need} bytes, got {got}")]
    Short { need: usize, got: usize },
    /// The magic is wrong: framing is lost.
    #[error("request has magic {found:#010x}, expected {expected:#010x}")]
    BadMagic { found: u32, expected: u32 },
    /// The length does not fit a compact request (encoding only).
    #[error("length {0} does not fit a compact request")]
    LengthTooLarge(u64),
}

/// One transmission request, whichever header carried it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cmd_flag::*`), unchecked.
    pub flags: u16,
    /// The command (`cmd::*`), unchecked.
    pub command: u16,
    /// Opaque; echoed in every reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length: of the effect, or of the payload with `PAYLOAD_LEN`.
    pub length: u64,
}

impl Request {
    /// Decodes the first [`REQUEST_LEN`] bytes of `buf` as a compact request.
    pub fn decode(buf: &[u8]) -> Result<Self, RequestError> {
        let mut r = Reader::new(buf);
        let fields = (r.u32(), r.u16(), r.u16(), r.u64(), r.u64(), r.u32());
        let (Some(magic), Some(flags), Some(command), Some(cookie), Some(offset), Some(length)) =
            fields
        else {
            return Err(RequestError::Short {
                need: REQUEST_LEN,
                got: buf.len(),
            });
        };
        check_magic(magic, REQUEST_MAGIC)?;
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length: u64::from(length),
        })
    }

    /// Decodes the first [`EXTENDED_REQUEST_LEN`] bytes of `buf` as an
    /// extended request.
    pub fn decode_extended(buf: &[u8]) -> Result<Self, RequestError> {
        let mut r = Reader::new(buf);
        let fields = (r.u32(), r.u16(), r.u16(), r.u64(), r.u64(), r.u64());
        let (Some(magic), Some(flags), Some(command), Some(cookie), Some(offset), Some(length)) =
            fields
        else {
            return Err(RequestError::Short {
                need: EXTENDED_REQUEST_LEN,
                got: buf.len(),
            });
        };
        check_magic(magic, EXTENDED_REQUEST_MAGIC)?;
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    /// Appends the compact encoding; fails, appending nothing, if the length
    /// needs more than 32 bits.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), RequestError> {
        let length =
            u32::try_from(self.length).map_err(|_| RequestError::LengthTooLarge(self.length))?;
        self.put_common(out, REQUEST_MAGIC);
        out.extend_from_slice(&length.to_be_bytes());
        Ok(())
    }

    /// Appends the extended encoding.
    pub fn encode_extended(&self, out: &mut Vec<u8>) {
        self.put_common(out, EXTENDED_REQUEST_MAGIC);
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    fn put_common(&self, out: &mut Vec<u8>, magic: u32) {
        out.extend_from_slice(&magic.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
    }
}

fn check_magic(found: u32, expected: u32) -> Result<(), RequestError> {
    if found == expected {
        Ok(())
    } else {
        Err(RequestError::BadMagic { found, expected })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::codec::consts::{cmd, cmd_flag};

    const COMPACT: [u8; 28] = [
        0x25, 0x60, 0x95, 0x13, // magic
        0x00, 0x01, // flags: FUA
        0x00, 0x01, // type: WRITE
        1, 2, 3, 4, 5, 6, 7, 8, // cookie
        0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
        0, 0, 0x20, 0, // length 8192
    ];

    const EXTENDED: [u8; 32] = [
        0x21, 0xe4, 0x1c, 0x71, // magic
        0x00, 0x08, // flags: REQ_ONE
        0x00, 0x07, // type: BLOCK_STATUS
        0, 0, 0, 0, 0, 0, 0, 9, // cookie
        0, 0, 0, 1, 0, 0, 0, 0, // offset 2^32
        0, 0, 0, 2, 0, 0, 0, 0, // length 2^33
    ];

    #[test]
    fn compact_decodes() {
        let r = Request::decode(&COMPACT).unwrap();
        assert_eq!(
            r,
            Request {
                flags: cmd_flag::FUA,
                command: cmd::WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 8192,
            }
        );
        let mut out = Vec::new();
        r.encode(&mut out).unwrap();
        assert_eq!(out, COMPACT);
        assert_eq!(cmd::name(r.command), Some("WRITE"));
        assert_eq!(cmd::name(99), None);
    }

    #[test]
    fn extended_decodes() {
        let r = Request::decode_extended(&EXTENDED).unwrap();
        assert_eq!(
            r,
            Request {
                flags: cmd_flag::REQ_ONE,
                command: cmd::BLOCK_STATUS,
                cookie: 9,
                offset: 1 << 32,
                length: 1 << 33,
            }
        );
        let mut out = Vec::new();
        r.encode_extended(&mut out);
        assert_eq!(out, EXTENDED);
        assert_eq!(
            r.encode(&mut out),
            Err(RequestError::LengthTooLarge(1 << 33))
        );
        assert_eq!(out.len(), EXTENDED_REQUEST_LEN);
    }

    #[test]
    fn bad_magic_and_short() {
        assert_eq!(
            Request::decode(&EXTENDED),
            Err(RequestError::BadMagic {
                found: EXTENDED_REQUEST_MAGIC,
                expected: REQUEST_MAGIC
            })
        );
        assert!(matches!(
            Request::decode_extended(&[COMPACT.as_slice(), &[0; 4]].concat()),
            Err(RequestError::BadMagic { .. })
        ));
        assert_eq!(
            Request::decode(&COMPACT[..27]),
            Err(RequestError::Short { need: 28, got: 27 })
        );
        assert_eq!(
            Request::decode_extended(&EXTENDED[..31]),
            Err(RequestError::Short { need: 32, got: 31 })
        );
        assert!(Request::decode(&[]).is_err());
    }
}
