//! Property tests across the codec: every decoder survives arbitrary bytes,
//! and what the encoders write decodes back to what went in.

use proptest::prelude::*;

use super::client::{encode_info_option, encode_meta_option};
use super::consts::{opt, rep};
use super::option_reply::{put_error, put_meta_context};
use super::reply::{ChunkHead, ChunkStyle, Extent, put_block_status, put_error as put_chunk_error};
use super::*;

fn request() -> impl Strategy<Value = Request> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(flags, command, cookie, offset, length)| Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
}

/// A string the protocol allows: no NUL, at most 4096 bytes.
fn nbd_string() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,40}"
}

proptest! {
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128), option in 0u32..16) {
        let _ = OptionHeader::decode(&bytes);
        let _ = decode_client_flags(&bytes);
        let _ = Request::decode(&bytes);
        let _ = Request::decode_extended(&bytes);
        if let Ok(parsed) = parse_option(option, &bytes) {
            match parsed {
                ClientOption::Info(i) | ClientOption::Go(i) => {
                    prop_assert!(i.requests.iter().count() == i.requests.len());
                }
                ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
                    prop_assert_eq!(m.queries.iter().count(), m.queries.len());
                }
                _ => {}
            }
        }
    }

    #[test]
    fn options_with_a_valid_prefix_never_panic(
        name_len in any::<u32>(),
        count in any::<u32>(),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut data = name_len.to_be_bytes().to_vec();
        data.extend_from_slice(&count.to_be_bytes());
        data.extend_from_slice(&tail);
        for option in [opt::INFO, opt::GO, opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
            let _ = parse_option(option, &data);
            let _ = parse_option(option, data.get(4..).unwrap_or_default());
        }
    }

    #[test]
    fn compact_requests_round_trip(mut r in request()) {
        r.length &= u64::from(u32::MAX);
        let mut out = Vec::new();
        r.encode(&mut out).unwrap();
        prop_assert_eq!(out.len(), REQUEST_LEN);
        prop_assert_eq!(Request::decode(&out), Ok(r));
        prop_assert!(Request::decode_extended(&[out.as_slice(), &[0; 4]].concat()).is_err());
    }

    #[test]
    fn extended_requests_round_trip(r in request()) {
        let mut out = Vec::new();
        r.encode_extended(&mut out);
        prop_assert_eq!(out.len(), EXTENDED_REQUEST_LEN);
        prop_assert_eq!(Request::decode_extended(&out), Ok(r));
        prop_assert!(Request::decode(&out).is_err());
    }

    #[test]
    fn info_options_round_trip(name in nbd_string(), requests in proptest::collection::vec(any::<u16>(), 0..8), go in any::<bool>()) {
        let option = if go { opt::GO } else { opt::INFO };
        let mut out = Vec::new();
        prop_assert!(encode_info_option(&mut out, option, &name, &requests));
        let h = OptionHeader::decode(&out).unwrap();
        let data = &out[OPTION_HEADER_LEN..];
        prop_assert_eq!(h.length as usize, data.len());
        let (ClientOption::Info(i) | ClientOption::Go(i)) = parse_option(h.option, data).unwrap() else {
            panic!("not INFO or GO");
        };
        prop_assert_eq!(i.name, name.as_str());
        prop_assert_eq!(i.requests.iter().collect::<Vec<_>>(), requests);
    }

    #[test]
    fn meta_options_round_trip(name in nbd_string(), queries in proptest::collection::vec(nbd_string(), 0..6)) {
        let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
        let mut out = Vec::new();
        prop_assert!(encode_meta_option(&mut out, opt::SET_META_CONTEXT, &name, &refs));
        let h = OptionHeader::decode(&out).unwrap();
        let ClientOption::SetMetaContext(m) = parse_option(h.option, &out[OPTION_HEADER_LEN..]).unwrap() else {
            panic!("not SET_META_CONTEXT");
        };
        prop_assert_eq!(m.name, name.as_str());
        prop_assert_eq!(m.queries.iter().collect::<Vec<_>>(), refs);
    }

    #[test]
    fn option_reply_lengths_match(message in ".{0,5000}", name in nbd_string(), id in any::<u32>()) {
        let mut out = Vec::new();
        put_error(&mut out, opt::GO, rep::ERR_UNKNOWN, &message);
        let declared = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        prop_assert_eq!(declared, out.len() - 20);
        prop_assert!(declared <= MAX_STRING_LEN);
        prop_assert!(std::str::from_utf8(&out[20..]).is_ok());
        out.clear();
        put_meta_context(&mut out, opt::LIST_META_CONTEXT, id, &name).unwrap();
        let declared = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        prop_assert_eq!(declared, out.len() - 20);
    }

    #[test]
    fn chunk_lengths_match(
        message in ".{0,5000}",
        lens in proptest::collection::vec(1u64..1 << 34, 1..20),
        max in 1usize..30,
        extended in any::<bool>(),
    ) {
        let (style, header) = if extended {
            (ChunkStyle::Extended, 32)
        } else {
            (ChunkStyle::Structured, 20)
        };
        let head = ChunkHead::new(style, 1, 0);
        let declared = |out: &[u8]| -> usize {
            if extended {
                u64::from_be_bytes(out[24..32].try_into().unwrap()) as usize
            } else {
                u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize
            }
        };
        let mut out = Vec::new();
        put_chunk_error(&mut out, head, 5, &message);
        prop_assert_eq!(declared(&out), out.len() - header);
        out.clear();
        let extents: Vec<Extent> = lens.iter().map(|&length| Extent { length, status: 1 }).collect();
        let n = put_block_status(&mut out, head, 1, &extents, max).unwrap();
        prop_assert!(n >= 1 && n <= max.min(extents.len()));
        prop_assert_eq!(declared(&out), out.len() - header);
        let per = if extended { 16 } else { 8 };
        prop_assert_eq!(out.len() - header - if extended { 8 } else { 4 }, per * n);
    }
}
