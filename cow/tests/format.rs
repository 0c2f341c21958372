//! Property tests of the header codec and geometry, over every version.

use std::path::PathBuf;

use proptest::prelude::*;
use ubd_cow::{ByteOrder, CowError, Geometry, Header, MAX_HEADER_SIZE, Version, legacy};

fn path() -> impl Strategy<Value = PathBuf> {
    prop::collection::vec(1u8..=255, 1..256)
        .prop_filter("no NUL", |b| !b.contains(&0))
        .prop_map(|b| {
            use std::os::unix::ffi::OsStrExt;
            PathBuf::from(std::ffi::OsStr::from_bytes(&b))
        })
}

fn header() -> impl Strategy<Value = Header> {
    (
        prop_oneof![
            Just(Version::V1),
            Just(Version::V2),
            Just(Version::V3Broken),
            Just(Version::V3)
        ],
        prop_oneof![Just(ByteOrder::Big), Just(ByteOrder::Little)],
        path(),
        any::<u32>(),
        0u64..(1 << 50),
        0u32..16,
    )
        .prop_map(|(version, order, path, mtime, size, align_log)| {
            let v3 = matches!(version, Version::V3 | Version::V3Broken);
            Header {
                version,
                // v3 headers as written today are big-endian; the parser accepts
                // either magic order for every version.
                magic_order: order,
                backing_file: path,
                mtime,
                size,
                sector_size: 512,
                alignment: if v3 { 1 << (align_log + 9) } else { 512 },
                cow_format: 0,
            }
        })
}

/// The geometry formulas of cow-format.md, written out independently.
fn expected(h: &Header) -> (u64, u64, u64) {
    let round_up = |v: u64, a: u64| v.div_ceil(a) * a;
    let hs = h.version.header_size() as u64;
    match h.version {
        Version::V1 | Version::V2 => {
            let len = (h.size + 511) / (8 * 512);
            (hs, len, round_up(hs + len, 512))
        }
        _ => {
            let a = u64::from(h.alignment);
            let off = round_up(hs, a);
            let len = h.size.div_ceil(512).div_ceil(8);
            (off, len, round_up(off + len, a))
        }
    }
}

proptest! {
    #[test]
    fn parse_of_write_is_identity(h in header()) {
        let bytes = legacy::encode(&h).unwrap();
        prop_assert_eq!(bytes.len(), h.version.header_size());
        prop_assert_eq!(Header::parse(&bytes).unwrap(), h);
    }

    #[test]
    fn geometry_matches_the_formulas(h in header()) {
        let g = Geometry::new(&h).unwrap();
        let (bitmap_offset, bitmap_len, data_offset) = expected(&h);
        prop_assert_eq!(g.bitmap_offset, bitmap_offset);
        prop_assert_eq!(g.bitmap_len, bitmap_len);
        prop_assert_eq!(g.data_offset, data_offset);
        prop_assert_eq!(g.sectors, h.size.div_ceil(512));
        prop_assert!(g.mapped_sectors() <= g.sectors);
        if g.sectors > 0 {
            prop_assert_eq!(g.cow_offset(g.sectors - 1), Some(data_offset + 512 * (g.sectors - 1)));
        }
    }

    #[test]
    fn v3_writes_then_parses(p in path(), size in 0u64..(1 << 55), mtime in any::<u32>()) {
        let h = Header::new_v3(&p, size, mtime).unwrap();
        let bytes = h.encode().unwrap();
        let plen = p.as_os_str().len();
        prop_assert!(bytes[32 + plen..].iter().all(|&b| b == 0));
        prop_assert_eq!(&legacy::encode(&h).unwrap(), &bytes);
        prop_assert_eq!(Header::parse(&bytes).unwrap(), h);
    }

    #[test]
    fn any_bytes_parse_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..MAX_HEADER_SIZE + 8)) {
        if let Ok(h) = Header::parse(&bytes) {
            prop_assert!(Geometry::new(&h).is_ok());
        }
    }

    #[test]
    fn mutated_headers_parse_or_fail_cleanly(
        h in header(),
        flips in prop::collection::vec((0usize..MAX_HEADER_SIZE, any::<u8>()), 1..8),
        cut in 0usize..MAX_HEADER_SIZE + 1,
    ) {
        let mut bytes = legacy::encode(&h).unwrap();
        for (at, v) in flips {
            if let Some(b) = bytes.get_mut(at) {
                *b = v;
            }
        }
        bytes.truncate(cut);
        let _ = Header::parse(&bytes);
    }
}

#[test]
fn old_layouts_parse_to_their_geometry() {
    let base = |version, order| Header {
        version,
        magic_order: order,
        backing_file: PathBuf::from("/srv/base.img"),
        mtime: 1_234_567_890,
        size: 1_000_000,
        sector_size: 512,
        alignment: if version == Version::V3Broken {
            4096
        } else {
            512
        },
        cow_format: 0,
    };
    // 1954 sectors: v1 and v2 bitmaps are 244 bytes, one short of the 245 needed.
    for (version, order, bitmap_offset, bitmap_len, data_offset, first) in [
        (
            Version::V1,
            ByteOrder::Little,
            280,
            244,
            1024,
            [0x4D, 0x4F, 0x4F, 0x4F],
        ),
        (
            Version::V1,
            ByteOrder::Big,
            280,
            244,
            1024,
            [0x4F, 0x4F, 0x4F, 0x4D],
        ),
        (
            Version::V2,
            ByteOrder::Big,
            4120,
            244,
            4608,
            [0x4F, 0x4F, 0x4F, 0x4D],
        ),
        (
            Version::V3Broken,
            ByteOrder::Big,
            8192,
            245,
            12288,
            [0x4F, 0x4F, 0x4F, 0x4D],
        ),
    ] {
        let h = base(version, order);
        let bytes = legacy::encode(&h).unwrap();
        assert_eq!(&bytes[0..4], &first, "{version:?}");
        let parsed = Header::parse(&bytes).unwrap();
        assert_eq!(parsed, h);
        let g = Geometry::new(&parsed).unwrap();
        assert_eq!(
            (g.bitmap_offset, g.bitmap_len, g.data_offset),
            (bitmap_offset, bitmap_len, data_offset),
            "{version:?}"
        );
        assert_eq!(g.sectors, 1954);
        let mapped = if matches!(version, Version::V1 | Version::V2) {
            1952
        } else {
            1954
        };
        assert_eq!(g.mapped_sectors(), mapped, "{version:?}");
    }
}

#[test]
fn broken_v3_is_told_from_v3_by_bytes_32_to_36() {
    let mut h = Header::new_v3(std::path::Path::new("/b.img"), 4096, 7).unwrap();
    h.version = Version::V3Broken;
    let bytes = legacy::encode(&h).unwrap();
    assert_eq!(&bytes[32..36], &[0, 0, 0, 0]);
    assert_eq!(&bytes[16..24], &4096u64.to_be_bytes());
    assert_eq!(&bytes[36..42], b"/b.img");
    assert_eq!(Header::parse(&bytes).unwrap().version, Version::V3Broken);
}

#[test]
fn v1_and_v2_paths_must_be_terminated() {
    let h = Header {
        version: Version::V1,
        magic_order: ByteOrder::Little,
        backing_file: PathBuf::from("/b"),
        mtime: 0,
        size: 512,
        sector_size: 512,
        alignment: 512,
        cow_format: 0,
    };
    let mut bytes = legacy::encode(&h).unwrap();
    bytes[8..264].fill(b'x');
    assert_eq!(
        Header::parse(&bytes).unwrap_err(),
        CowError::BackingPathUnterminated {
            offset: 8,
            len: 256
        }
    );
    // v1 sector size is a signed field in the writer's order.
    let mut bytes = legacy::encode(&h).unwrap();
    bytes[276..280].copy_from_slice(&(-512i32).to_le_bytes());
    assert_eq!(
        Header::parse(&bytes).unwrap_err(),
        CowError::BadSectorSize {
            value: -512,
            offset: 276
        }
    );
}
