//! The client's side of the handshake: its flags, option headers, and the data
//! of each option, parsed strictly inside the option's declared length.
//!
//! Lengths from the wire are never used to allocate: the caller reads at most
//! [`MAX_OPTION_LEN`] bytes of data (a longer option is a hard disconnect) and
//! the parsers borrow from those bytes. Each malformation is its own
//! [`OptionError`], and [`OptionError::reply_type`] says which error reply
//! answers it. Encoders for the client's direction exist for round trips,
//! tests, and fuzz seeds.

use thiserror::Error;

use super::consts::{IHAVEOPT, opt};
use super::wire::{Reader, StringFault, check_string};

/// Bytes in an option header: `IHAVEOPT`, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// The longest option data accepted; longer means disconnect, unread.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// An option header that cannot be acted on; the handshake cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionHeaderError {
    /// Fewer bytes than a header.
    #[error("option header needs {need} bytes, got {got}")]
    Short { need: usize, got: usize },
    /// The header does not start with `IHAVEOPT`.
    #[error("option header has magic {0:#018x}, not IHAVEOPT")]
    BadMagic(u64),
    /// The data is longer than [`MAX_OPTION_LEN`].
    #[error("option {option} declares {length} bytes of data, more than the {max} allowed")]
    TooLong { option: u32, length: u32, max: u32 },
}

/// The header of one client option; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number (`opt::*`).
    pub option: u32,
    /// Bytes of data after the header, at most [`MAX_OPTION_LEN`].
    pub length: u32,
}

impl OptionHeader {
    /// Decodes the first [`OPTION_HEADER_LEN`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, OptionHeaderError> {
        let short = OptionHeaderError::Short {
            need: OPTION_HEADER_LEN,
            got: buf.len(),
        };
        let mut r = Reader::new(buf);
        let (Some(magic), Some(option), Some(length)) = (r.u64(), r.u32(), r.u32()) else {
            return Err(short);
        };
        if magic != IHAVEOPT {
            return Err(OptionHeaderError::BadMagic(magic));
        }
        if length > MAX_OPTION_LEN {
            return Err(OptionHeaderError::TooLong {
                option,
                length,
                max: MAX_OPTION_LEN,
            });
        }
        Ok(OptionHeader { option, length })
    }

    /// Appends the header's 16 bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// Decodes the client's 32-bit flags that answer the handshake flags.
pub fn decode_client_flags(buf: &[u8]) -> Option<u32> {
    Reader::new(buf).u32()
}

/// Option data that breaks the protocol's rules for that option.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionError {
    /// The option takes no data but some came.
    #[error("option {option} takes no data, got {len} bytes")]
    UnexpectedData { option: u32, len: usize },
    /// The data ended inside the named field.
    #[error("option {option} data ends inside its {field}")]
    Truncated { option: u32, field: &'static str },
    /// Bytes were left after the last field.
    #[error("option {option} has {extra} bytes after its last field")]
    TrailingData { option: u32, extra: usize },
    /// A string is longer than the protocol allows.
    #[error("option {option}: the {field} is longer than 4096 bytes")]
    StringTooLong { option: u32, field: &'static str },
    /// A string is not UTF-8.
    #[error("option {option}: the {field} is not UTF-8")]
    NotUtf8 { option: u32, field: &'static str },
    /// A string contains a NUL byte.
    #[error("option {option}: the {field} contains a NUL byte")]
    Nul { option: u32, field: &'static str },
}

impl OptionError {
    /// The option reply type that answers this error: `ERR_TOO_BIG` for an
    /// overlong string, `ERR_INVALID` otherwise.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionError::StringTooLong { .. } => super::consts::rep::ERR_TOO_BIG,
            _ => super::consts::rep::ERR_INVALID,
        }
    }
}

/// The list of `NBD_INFO_*` types an `INFO` or `GO` asks for, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRequests<'a>(&'a [u8]);

impl<'a> InfoRequests<'a> {
    /// How many types were asked for.
    pub fn len(&self) -> usize {
        self.0.len() / 2
    }

    /// Whether none were asked for.
    pub fn is_empty(&self) -> bool {
        self.0.len() < 2
    }

    /// The types, in the order asked.
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.0
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    }

    /// Whether `info` was asked for.
    pub fn contains(&self, info: u16) -> bool {
        self.iter().any(|i| i == info)
    }
}

/// The data of `INFO` and `GO`: an export name and the information wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// The export name; empty means the default export.
    pub name: &'a str,
    /// The `NBD_INFO_*` types asked for.
    pub requests: InfoRequests<'a>,
}

/// The queries of a `LIST_META_CONTEXT` or `SET_META_CONTEXT`, borrowed and
/// already checked to be well-formed strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queries<'a> {
    count: u32,
    bytes: &'a [u8],
}

impl<'a> Queries<'a> {
    /// How many queries there are.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there are none (for `LIST`: list every context).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The queries, in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = Reader::new(self.bytes);
        std::iter::from_fn(move || {
            let len = r.u32()?;
            let bytes = r.bytes(usize::try_from(len).ok()?)?;
            std::str::from_utf8(bytes).ok()
        })
    }
}

/// The data of `LIST_META_CONTEXT` and `SET_META_CONTEXT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// The export name.
    pub name: &'a str,
    /// The queries, each `namespace:leaf`.
    pub queries: Queries<'a>,
}

/// One client option with its data parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOption<'a> {
    /// `EXPORT_NAME`: the whole data is the name.
    ExportName(&'a str),
    /// `ABORT`.
    Abort,
    /// `LIST`.
    List,
    /// `STARTTLS`.
    StartTls,
    /// `INFO`.
    Info(InfoRequest<'a>),
    /// `GO`.
    Go(InfoRequest<'a>),
    /// `STRUCTURED_REPLY`.
    StructuredReply,
    /// `LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest<'a>),
    /// `SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest<'a>),
    /// `EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Any other option (answered `ERR_UNSUP`); its data is not looked at.
    Unknown(u32),
}

/// Parses the data of option `option`; `data` is exactly the option's
/// declared length.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption<'_>, OptionError> {
    let no_data = |parsed| {
        if data.is_empty() {
            Ok(parsed)
        } else {
            Err(OptionError::UnexpectedData {
                option,
                len: data.len(),
            })
        }
    };
    match option {
        opt::EXPORT_NAME => string(option, "export name", data).map(ClientOption::ExportName),
        // proto.md: the server should ignore data sent with ABORT.
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => no_data(ClientOption::List),
        opt::STARTTLS => no_data(ClientOption::StartTls),
        opt::STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        opt::EXTENDED_HEADERS => no_data(ClientOption::ExtendedHeaders),
        opt::INFO => parse_info(option, data).map(ClientOption::Info),
        opt::GO => parse_info(option, data).map(ClientOption::Go),
        opt::LIST_META_CONTEXT => parse_meta(option, data).map(ClientOption::ListMetaContext),
        opt::SET_META_CONTEXT => parse_meta(option, data).map(ClientOption::SetMetaContext),
        _ => Ok(ClientOption::Unknown(option)),
    }
}

fn string<'a>(option: u32, field: &'static str, bytes: &'a [u8]) -> Result<&'a str, OptionError> {
    check_string(bytes).map_err(|fault| match fault {
        StringFault::TooLong => OptionError::StringTooLong { option, field },
        StringFault::NotUtf8 => OptionError::NotUtf8 { option, field },
        StringFault::Nul => OptionError::Nul { option, field },
    })
}

/// A u32 length followed by that many bytes of string.
fn prefixed<'a>(
    r: &mut Reader<'a>,
    option: u32,
    field: &'static str,
) -> Result<&'a str, OptionError> {
    let truncated = OptionError::Truncated { option, field };
    let len = r.u32().ok_or(truncated.clone())?;
    let len = usize::try_from(len).map_err(|_| truncated.clone())?;
    let bytes = r.bytes(len).ok_or(truncated)?;
    string(option, field, bytes)
}

fn finish(r: &Reader<'_>, option: u32) -> Result<(), OptionError> {
    match r.remaining() {
        0 => Ok(()),
        extra => Err(OptionError::TrailingData { option, extra }),
    }
}

fn parse_info(option: u32, data: &[u8]) -> Result<InfoRequest<'_>, OptionError> {
    let mut r = Reader::new(data);
    let name = prefixed(&mut r, option, "export name")?;
    let field = "information request list";
    let count = r.u16().ok_or(OptionError::Truncated { option, field })?;
    let list = r
        .bytes(usize::from(count) * 2)
        .ok_or(OptionError::Truncated { option, field })?;
    finish(&r, option)?;
    Ok(InfoRequest {
        name,
        requests: InfoRequests(list),
    })
}

fn parse_meta(option: u32, data: &[u8]) -> Result<MetaContextRequest<'_>, OptionError> {
    let mut r = Reader::new(data);
    let name = prefixed(&mut r, option, "export name")?;
    let count = r.u32().ok_or(OptionError::Truncated {
        option,
        field: "query count",
    })?;
    let start = r;
    // Each query takes at least four bytes, so this loop ends with the data.
    for _ in 0..count {
        prefixed(&mut r, option, "query")?;
    }
    finish(&r, option)?;
    // `finish` saw the data end with the last query: the queries are its tail.
    let bytes = data
        .get(data.len() - start.remaining()..)
        .unwrap_or_default();
    Ok(MetaContextRequest {
        name,
        queries: Queries { count, bytes },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::codec::consts::{info, rep};

    fn header(option: u32, length: u32) -> Vec<u8> {
        let mut v = b"IHAVEOPT".to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    #[test]
    fn option_header_decodes() {
        let bytes = [
            0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0, 0, 0x01, 0x00,
        ];
        let h = OptionHeader::decode(&bytes).unwrap();
        assert_eq!(
            h,
            OptionHeader {
                option: opt::GO,
                length: 256
            }
        );
        let mut again = Vec::new();
        h.encode(&mut again);
        assert_eq!(again, bytes);
    }

    #[test]
    fn option_header_errors() {
        assert_eq!(
            OptionHeader::decode(&header(1, 0)[..15]),
            Err(OptionHeaderError::Short { need: 16, got: 15 })
        );
        let mut bad = header(1, 0);
        bad[0] = b'X';
        assert!(matches!(
            OptionHeader::decode(&bad),
            Err(OptionHeaderError::BadMagic(_))
        ));
        assert_eq!(
            OptionHeader::decode(&header(1, MAX_OPTION_LEN)).map(|h| h.length),
            Ok(MAX_OPTION_LEN)
        );
        assert_eq!(
            OptionHeader::decode(&header(1, MAX_OPTION_LEN + 1)),
            Err(OptionHeaderError::TooLong {
                option: 1,
                length: MAX_OPTION_LEN + 1,
                max: MAX_OPTION_LEN
            })
        );
    }

    #[test]
    fn client_flags() {
        assert_eq!(decode_client_flags(&[0, 0, 0, 3]), Some(3));
        assert_eq!(decode_client_flags(&[0, 0, 3]), None);
    }

    #[test]
    fn export_name() {
        assert_eq!(
            parse_option(opt::EXPORT_NAME, b"disk"),
            Ok(ClientOption::ExportName("disk"))
        );
        assert_eq!(
            parse_option(opt::EXPORT_NAME, b""),
            Ok(ClientOption::ExportName(""))
        );
        let err = parse_option(opt::EXPORT_NAME, b"d\0").unwrap_err();
        assert_eq!(err.reply_type(), rep::ERR_INVALID);
        let err = parse_option(opt::EXPORT_NAME, &[b'a'; 5000]).unwrap_err();
        assert_eq!(err.reply_type(), rep::ERR_TOO_BIG);
        assert!(matches!(
            parse_option(opt::EXPORT_NAME, &[0xc3]),
            Err(OptionError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn options_without_data() {
        for (option, parsed) in [
            (opt::LIST, ClientOption::List),
            (opt::STARTTLS, ClientOption::StartTls),
            (opt::STRUCTURED_REPLY, ClientOption::StructuredReply),
            (opt::EXTENDED_HEADERS, ClientOption::ExtendedHeaders),
        ] {
            assert_eq!(parse_option(option, &[]), Ok(parsed));
            let err = parse_option(option, &[0]).unwrap_err();
            assert_eq!(err, OptionError::UnexpectedData { option, len: 1 });
            assert_eq!(err.reply_type(), rep::ERR_INVALID);
        }
    }

    #[test]
    fn abort_ignores_its_data() {
        assert_eq!(parse_option(opt::ABORT, &[]), Ok(ClientOption::Abort));
        assert_eq!(parse_option(opt::ABORT, b"junk"), Ok(ClientOption::Abort));
    }

    #[test]
    fn unknown_options_ignore_their_data() {
        assert_eq!(
            parse_option(opt::PEEK_EXPORT, b"junk"),
            Ok(ClientOption::Unknown(opt::PEEK_EXPORT))
        );
        assert_eq!(parse_option(999, &[]), Ok(ClientOption::Unknown(999)));
    }

    #[test]
    fn info_and_go() {
        // name "sda", two requests: NAME, BLOCK_SIZE.
        let data = [0, 0, 0, 3, b's', b'd', b'a', 0, 2, 0, 1, 0, 3];
        let ClientOption::Go(go) = parse_option(opt::GO, &data).unwrap() else {
            panic!("not GO");
        };
        assert_eq!(go.name, "sda");
        assert_eq!(go.requests.len(), 2);
        assert_eq!(go.requests.iter().collect::<Vec<_>>(), [1, 3]);
        assert!(go.requests.contains(info::BLOCK_SIZE));
        assert!(!go.requests.contains(info::DESCRIPTION));
        let ClientOption::Info(i) = parse_option(opt::INFO, &data).unwrap() else {
            panic!("not INFO");
        };
        assert_eq!(i, go);
        // Default export, no requests.
        let ClientOption::Info(i) = parse_option(opt::INFO, &[0, 0, 0, 0, 0, 0]).unwrap() else {
            panic!("not INFO");
        };
        assert_eq!(i.name, "");
        assert!(i.requests.is_empty());
    }

    #[test]
    fn info_malformations() {
        let t = |data: &[u8]| parse_option(opt::INFO, data).unwrap_err();
        assert!(matches!(
            t(&[]),
            OptionError::Truncated {
                field: "export name",
                ..
            }
        ));
        assert!(matches!(
            t(&[0xff, 0xff, 0xff, 0xff, 0, 0]),
            OptionError::Truncated {
                field: "export name",
                ..
            }
        ));
        assert!(matches!(
            t(&[0, 0, 0, 1, b'a']),
            OptionError::Truncated {
                field: "information request list",
                ..
            }
        ));
        assert!(matches!(
            t(&[0, 0, 0, 0, 0, 2, 0, 1]),
            OptionError::Truncated {
                field: "information request list",
                ..
            }
        ));
        assert_eq!(
            t(&[0, 0, 0, 0, 0, 1, 0, 1, 9]),
            OptionError::TrailingData {
                option: opt::INFO,
                extra: 1
            }
        );
        assert!(matches!(t(&[0, 0, 0, 1, 0, 0, 0]), OptionError::Nul { .. }));
    }

    #[test]
    fn meta_context() {
        let mut data = vec![0, 0, 0, 1, b'x', 0, 0, 0, 2];
        data.extend_from_slice(&[0, 0, 0, 15]);
        data.extend_from_slice(b"base:allocation");
        data.extend_from_slice(&[0, 0, 0, 5]);
        data.extend_from_slice(b"qemu:");
        let ClientOption::SetMetaContext(m) = parse_option(opt::SET_META_CONTEXT, &data).unwrap()
        else {
            panic!("not SET_META_CONTEXT");
        };
        assert_eq!(m.name, "x");
        assert_eq!(m.queries.len(), 2);
        assert_eq!(
            m.queries.iter().collect::<Vec<_>>(),
            ["base:allocation", "qemu:"]
        );
        let ClientOption::ListMetaContext(l) =
            parse_option(opt::LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]).unwrap()
        else {
            panic!("not LIST_META_CONTEXT");
        };
        assert!(l.queries.is_empty());
        assert_eq!(l.queries.iter().count(), 0);
    }

    #[test]
    fn meta_context_malformations() {
        let t = |data: &[u8]| parse_option(opt::LIST_META_CONTEXT, data).unwrap_err();
        assert!(matches!(
            t(&[0, 0, 0, 0, 0, 0]),
            OptionError::Truncated {
                field: "query count",
                ..
            }
        ));
        // A huge count with no queries ends at the data, without looping 2^32 times.
        assert!(matches!(
            t(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            OptionError::Truncated { field: "query", .. }
        ));
        assert!(matches!(
            t(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, b'a']),
            OptionError::Truncated { field: "query", .. }
        ));
        assert_eq!(
            t(&[0, 0, 0, 0, 0, 0, 0, 0, 7]),
            OptionError::TrailingData {
                option: opt::LIST_META_CONTEXT,
                extra: 1
            }
        );
        assert!(matches!(
            t(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0xfe]),
            OptionError::NotUtf8 { field: "query", .. }
        ));
    }

    #[test]
    fn client_encoders_round_trip() {
        use crate::nbd::codec::client::{encode_info_option, encode_meta_option};
        let mut out = Vec::new();
        assert!(encode_info_option(&mut out, opt::GO, "disk", &[info::NAME]));
        let h = OptionHeader::decode(&out).unwrap();
        let data = &out[OPTION_HEADER_LEN..];
        assert_eq!(h.length as usize, data.len());
        let ClientOption::Go(go) = parse_option(h.option, data).unwrap() else {
            panic!("not GO");
        };
        assert_eq!(
            (go.name, go.requests.iter().collect::<Vec<_>>()),
            ("disk", vec![1])
        );

        out.clear();
        assert!(encode_meta_option(
            &mut out,
            opt::LIST_META_CONTEXT,
            "",
            &["base:"]
        ));
        let h = OptionHeader::decode(&out).unwrap();
        let ClientOption::ListMetaContext(m) =
            parse_option(h.option, &out[OPTION_HEADER_LEN..]).unwrap()
        else {
            panic!("not LIST_META_CONTEXT");
        };
        assert_eq!(m.queries.iter().collect::<Vec<_>>(), ["base:"]);
    }
}
