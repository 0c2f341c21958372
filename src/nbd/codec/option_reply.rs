//! The server's side of the handshake: the greeting, option replies and their
//! payloads, and the old-style `EXPORT_NAME` reply.
//!
//! Every encoder appends to a caller-provided `Vec<u8>` and allocates nothing
//! when it has the capacity. Names the server chose must be valid NBD strings
//! (else [`EncodeError`], nothing appended); human-readable messages are cut
//! to 4096 bytes on a character boundary instead.

use thiserror::Error;

use super::consts::{IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, info, rep};
use super::wire::{MAX_STRING_LEN, StringFault, check_string, truncate_str};

/// Bytes in the greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes in an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// A string the server supplied cannot go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// Longer than 4096 bytes.
    #[error("the {0} is longer than 4096 bytes")]
    StringTooLong(&'static str),
    /// Contains a NUL byte.
    #[error("the {0} contains a NUL byte")]
    Nul(&'static str),
}

fn name_ok(what: &'static str, s: &str) -> Result<(), EncodeError> {
    match check_string(s.as_bytes()) {
        Ok(_) => Ok(()),
        Err(StringFault::TooLong) => Err(EncodeError::StringTooLong(what)),
        // A `&str` is UTF-8; only NUL is left.
        Err(StringFault::Nul | StringFault::NotUtf8) => Err(EncodeError::Nul(what)),
    }
}

/// Appends the 18-byte greeting of a fixed newstyle server.
pub fn put_greeting(out: &mut Vec<u8>, handshake_flags: u16) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&handshake_flags.to_be_bytes());
}

/// Appends the reply to a successful `EXPORT_NAME`: size, transmission flags,
/// and 124 zero bytes unless `NO_ZEROES` was agreed.
pub fn put_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0; 124]);
    }
}

/// Appends an option reply header; `length` bytes of payload must follow.
pub fn put_reply_header(out: &mut Vec<u8>, option: u32, reply_type: u32, length: u32) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends `ACK` for `option`.
pub fn put_ack(out: &mut Vec<u8>, option: u32) {
    put_reply_header(out, option, rep::ACK, 0);
}

/// Lengths below are bounded by [`MAX_STRING_LEN`] plus a few bytes.
fn len32(n: usize) -> u32 {
    debug_assert!(n <= MAX_STRING_LEN + 16);
    n as u32
}

/// Appends a `SERVER` reply naming one export (answering `LIST`).
pub fn put_server(out: &mut Vec<u8>, option: u32, name: &str) -> Result<(), EncodeError> {
    name_ok("export name", name)?;
    put_reply_header(out, option, rep::SERVER, len32(4 + name.len()));
    out.extend_from_slice(&len32(name.len()).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

/// Appends `INFO` / `INFO_EXPORT`: the export's size and transmission flags.
pub fn put_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    put_reply_header(out, option, rep::INFO, 12);
    out.extend_from_slice(&info::EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
}

fn put_info_string(out: &mut Vec<u8>, option: u32, info_type: u16, s: &str) {
    put_reply_header(out, option, rep::INFO, len32(2 + s.len()));
    out.extend_from_slice(&info_type.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends `INFO` / `INFO_NAME`: the export's canonical name.
pub fn put_info_name(out: &mut Vec<u8>, option: u32, name: &str) -> Result<(), EncodeError> {
    name_ok("export name", name)?;
    put_info_string(out, option, info::NAME, name);
    Ok(())
}

/// Appends `INFO` / `INFO_DESCRIPTION`, cut to 4096 bytes if longer.
pub fn put_info_description(out: &mut Vec<u8>, option: u32, description: &str) {
    let description = truncate_str(description, MAX_STRING_LEN);
    put_info_string(out, option, info::DESCRIPTION, description);
}

/// Appends `INFO` / `INFO_BLOCK_SIZE`: minimum, preferred and maximum sizes.
pub fn put_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    put_reply_header(out, option, rep::INFO, 14);
    out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&min.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&max.to_be_bytes());
}

/// Appends a `META_CONTEXT` reply: a context's id and name.
pub fn put_meta_context(
    out: &mut Vec<u8>,
    option: u32,
    id: u32,
    name: &str,
) -> Result<(), EncodeError> {
    name_ok("context name", name)?;
    put_reply_header(out, option, rep::META_CONTEXT, len32(4 + name.len()));
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

/// Appends an error reply (`reply_type` should be one of `rep::ERR_*`) with a
/// message for humans, cut to 4096 bytes if longer.
pub fn put_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    let message = truncate_str(message, MAX_STRING_LEN);
    put_reply_header(out, option, reply_type, len32(message.len()));
    out.extend_from_slice(message.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::codec::consts::{flag, handshake_flag, opt};

    const MAGIC: [u8; 8] = [0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];

    fn header(option: u8, reply_type: [u8; 4], length: u8) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&[0, 0, 0, option]);
        v.extend_from_slice(&reply_type);
        v.extend_from_slice(&[0, 0, 0, length]);
        v
    }

    #[test]
    fn greeting() {
        let mut out = Vec::new();
        put_greeting(
            &mut out,
            handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES,
        );
        assert_eq!(out, b"NBDMAGICIHAVEOPT\x00\x03");
        assert_eq!(out.len(), GREETING_LEN);
    }

    #[test]
    fn export_name_reply() {
        let mut out = Vec::new();
        put_export_name_reply(&mut out, 0x1000, flag::HAS_FLAGS | flag::READ_ONLY, true);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 3]);
        out.clear();
        put_export_name_reply(&mut out, 0x1000, 1, false);
        assert_eq!(out.len(), 134);
        assert!(out[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn ack() {
        let mut out = Vec::new();
        put_ack(&mut out, opt::ABORT);
        assert_eq!(out, header(2, [0, 0, 0, 1], 0));
        assert_eq!(out.len(), OPTION_REPLY_HEADER_LEN);
    }

    #[test]
    fn server() {
        let mut out = Vec::new();
        put_server(&mut out, opt::LIST, "ab").unwrap();
        let mut want = header(3, [0, 0, 0, 2], 6);
        want.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        assert_eq!(out, want);
    }

    #[test]
    fn info_export() {
        let mut out = Vec::new();
        put_info_export(&mut out, opt::GO, 1 << 30, 0x0d0f);
        let mut want = header(7, [0, 0, 0, 3], 12);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0x0d, 0x0f]);
        assert_eq!(out, want);
    }

    #[test]
    fn info_name_and_description() {
        let mut out = Vec::new();
        put_info_name(&mut out, opt::INFO, "d").unwrap();
        let mut want = header(6, [0, 0, 0, 3], 3);
        want.extend_from_slice(&[0, 1, b'd']);
        assert_eq!(out, want);

        out.clear();
        put_info_description(&mut out, opt::INFO, "hi");
        let mut want = header(6, [0, 0, 0, 3], 4);
        want.extend_from_slice(&[0, 2, b'h', b'i']);
        assert_eq!(out, want);

        out.clear();
        put_info_description(&mut out, opt::INFO, &"é".repeat(3000));
        assert_eq!(out.len(), OPTION_REPLY_HEADER_LEN + 2 + 4096);
    }

    #[test]
    fn info_block_size() {
        let mut out = Vec::new();
        put_info_block_size(&mut out, opt::GO, 1, 4096, 32 << 20);
        let mut want = header(7, [0, 0, 0, 3], 14);
        want.extend_from_slice(&[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        assert_eq!(out, want);
    }

    #[test]
    fn meta_context() {
        let mut out = Vec::new();
        put_meta_context(&mut out, opt::SET_META_CONTEXT, 7, "base:allocation").unwrap();
        let mut want = header(10, [0, 0, 0, 4], 19);
        want.extend_from_slice(&[0, 0, 0, 7]);
        want.extend_from_slice(b"base:allocation");
        assert_eq!(out, want);
    }

    #[test]
    fn error_reply() {
        let mut out = Vec::new();
        put_error(&mut out, opt::STARTTLS, rep::ERR_POLICY, "no");
        let mut want = header(5, [0x80, 0, 0, 2], 2);
        want.extend_from_slice(b"no");
        assert_eq!(out, want);
        assert!(rep::is_error(rep::ERR_POLICY) && !rep::is_error(rep::ACK));

        out.clear();
        put_error(&mut out, opt::GO, rep::ERR_UNKNOWN, &"x".repeat(5000));
        assert_eq!(out.len(), OPTION_REPLY_HEADER_LEN + 4096);
        assert_eq!(out[16..20], [0, 0, 0x10, 0]);
    }

    #[test]
    fn bad_names_append_nothing() {
        let mut out = Vec::new();
        let long = "n".repeat(4097);
        assert_eq!(
            put_server(&mut out, opt::LIST, &long),
            Err(EncodeError::StringTooLong("export name"))
        );
        assert_eq!(
            put_info_name(&mut out, opt::GO, "a\0"),
            Err(EncodeError::Nul("export name"))
        );
        assert!(put_meta_context(&mut out, opt::GO, 1, &long).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn no_allocation_with_capacity() {
        let mut out = Vec::with_capacity(256);
        let ptr = out.as_ptr();
        put_info_export(&mut out, opt::GO, 1, 1);
        put_info_block_size(&mut out, opt::GO, 1, 2, 3);
        put_ack(&mut out, opt::GO);
        assert_eq!(out.as_ptr(), ptr);
    }
}
