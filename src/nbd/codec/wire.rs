//! A bounds-checked big-endian cursor over untrusted bytes, and the string
//! rules every NBD string obeys. Every read returns `None` rather than
//! panicking when the bytes run out.

/// The longest string (export name, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Reads big-endian fields from the front of a slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The next `n` bytes, or `None` (and nothing consumed) if fewer remain.
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.buf.split_at_checked(n)?;
        self.buf = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Why bytes are not an NBD string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringFault {
    /// Longer than [`MAX_STRING_LEN`].
    TooLong,
    /// Not UTF-8.
    NotUtf8,
    /// Contains a NUL byte.
    Nul,
}

/// `bytes` as an NBD string: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
pub(crate) fn check_string(bytes: &[u8]) -> Result<&str, StringFault> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(StringFault::TooLong);
    }
    let s = std::str::from_utf8(bytes).map_err(|_| StringFault::NotUtf8)?;
    if s.contains('\0') {
        return Err(StringFault::Nul);
    }
    Ok(s)
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a char
/// boundary: for messages, which may be cut but must stay UTF-8.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_stops_at_the_end() {
        let mut r = Reader::new(&[0, 1, 0, 0, 0, 2, 9]);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u32(), Some(2));
        assert_eq!(r.u16(), None);
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.bytes(1), Some(&[9][..]));
        assert_eq!(r.u64(), None);
    }

    #[test]
    fn strings() {
        assert_eq!(check_string(b"disk"), Ok("disk"));
        assert_eq!(check_string(b""), Ok(""));
        assert_eq!(check_string(b"a\0b"), Err(StringFault::Nul));
        assert_eq!(check_string(&[0xff]), Err(StringFault::NotUtf8));
        assert_eq!(check_string(&[b'a'; 4097]), Err(StringFault::TooLong));
        assert!(check_string(&[b'a'; 4096]).is_ok());
    }

    #[test]
    fn truncation_keeps_utf8() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("héllo", 3), "hé");
        assert_eq!(truncate_str("abc", 10), "abc");
        assert_eq!(truncate_str("abc", 0), "");
    }
}
