//! The COW header: parsing every version UML ever wrote, writing v3.
//!
//! Layouts (offsets in bytes; v2 and v3 integers are big-endian, v1 integers are in
//! the writer's byte order, which the magic reveals):
//!
//! | version | magic | version | path | mtime | size | sectorsize | alignment | cow_format | header |
//! |---|---|---|---|---|---|---|---|---|---|
//! | v1 | 0 | 4 | 8 (256) | 264 | 268 | 276 | = sectorsize | - | 280 |
//! | v2 | 0 | 4 | 8 (4096) | 4104 | 4108 | 4116 | = sectorsize | - | 4120 |
//! | v3 | 0 | 4 | 32 (4096) | 8 | 12 | 20 | 24 | 28 | 4128 |
//! | broken v3 | 0 | 4 | 36 (4096) | 8 | 16 | 24 | 28 | 32 | 4136 |
//!
//! The backing file path must end with a NUL inside its field (256 bytes in v1,
//! 4096 in v2 and v3); a header whose path fills the field is refused. UML's
//! own reader (`read_cow_header` in `arch/um/drivers/cow_user.c`) has no such
//! check: it copies the field with an unbounded `strdup`, which runs on into
//! the fields after it (v1: mtime, size) or past the end of the header buffer
//! (v3), so such a header never named a file on purpose.
//!
//! "Broken v3" is what 64-bit builds wrote before 2006: the v3 fields without
//! packing. It is told apart from v3 by bytes 32..36, which hold the start of the
//! path in a real v3 header and the zero bitmap format in a broken one.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{COW_MAGIC, CowError, SECTOR_SIZE, V3_ALIGNMENT};

/// The largest header of any version (broken v3); reading this many bytes from
/// the start of a file (or the whole file, if shorter) is enough to parse it.
pub const MAX_HEADER_SIZE: usize = 4136;

/// Length of the backing file field in v2 and v3 headers, NUL included.
pub const V3_PATH_LEN: usize = 4096;

const V1_PATH_LEN: usize = 256;

/// A header version, as found on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    V1,
    V2,
    /// v3 as written by 64-bit builds before 2006 (unpacked struct).
    V3Broken,
    V3,
}

impl Version {
    /// The number stored in the version field.
    pub fn number(self) -> u32 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
            Version::V3Broken | Version::V3 => 3,
        }
    }

    /// The header's size in bytes.
    pub fn header_size(self) -> usize {
        match self {
            Version::V1 => 280,
            Version::V2 => 4120,
            Version::V3 => 4128,
            Version::V3Broken => 4136,
        }
    }

    /// A short name for messages: `v1`, `v2`, `v3`, `broken v3`.
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
            Version::V3 => "v3",
            Version::V3Broken => "broken v3",
        }
    }
}

/// Byte order of a multi-byte field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ByteOrder {
    Big,
    Little,
}

impl ByteOrder {
    /// `big-endian` or `little-endian`.
    pub fn name(self) -> &'static str {
        match self {
            ByteOrder::Big => "big-endian",
            ByteOrder::Little => "little-endian",
        }
    }
}

/// A parsed, validated COW header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Which layout the file uses.
    pub version: Version,
    /// The byte order the magic was found in. v1 fields use it; v2 and v3 fields
    /// are big-endian whatever it is, as UML reads them.
    pub magic_order: ByteOrder,
    /// The backing file's path, as stored (up to the first NUL).
    pub backing_file: PathBuf,
    /// The backing file's mtime in whole seconds when the overlay was made.
    pub mtime: u32,
    /// The backing file's size in bytes.
    pub size: u64,
    /// Always 512 once validated.
    pub sector_size: u32,
    /// Alignment of the bitmap and data areas; for v1 and v2 the sector size.
    pub alignment: u32,
    /// Bitmap format; always 0 once validated (v1 and v2 have no such field).
    pub cow_format: u32,
}

/// Field offsets of one layout, used by both the parser and the legacy writers.
pub(crate) struct Layout {
    pub path: usize,
    pub path_len: usize,
    pub mtime: usize,
    pub size: usize,
    pub sector_size: usize,
    /// Alignment and bitmap format offsets; v1 and v2 have neither.
    pub alignment: Option<(usize, usize)>,
}

impl Layout {
    pub(crate) fn of(version: Version) -> Layout {
        match version {
            Version::V1 => Layout {
                path: 8,
                path_len: V1_PATH_LEN,
                mtime: 264,
                size: 268,
                sector_size: 276,
                alignment: None,
            },
            Version::V2 => Layout {
                path: 8,
                path_len: V3_PATH_LEN,
                mtime: 4104,
                size: 4108,
                sector_size: 4116,
                alignment: None,
            },
            Version::V3 => Layout {
                path: 32,
                path_len: V3_PATH_LEN,
                mtime: 8,
                size: 12,
                sector_size: 20,
                alignment: Some((24, 28)),
            },
            Version::V3Broken => Layout {
                path: 36,
                path_len: V3_PATH_LEN,
                mtime: 8,
                size: 16,
                sector_size: 24,
                alignment: Some((28, 32)),
            },
        }
    }
}

/// Reads fixed-size integers at known offsets of a buffer already checked to be
/// long enough for the layout.
struct Fields<'a> {
    buf: &'a [u8],
    order: ByteOrder,
}

impl Fields<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[at..at + N]);
        out
    }

    fn u32(&self, at: usize) -> u32 {
        match self.order {
            ByteOrder::Big => u32::from_be_bytes(self.bytes(at)),
            ByteOrder::Little => u32::from_le_bytes(self.bytes(at)),
        }
    }

    fn u64(&self, at: usize) -> u64 {
        match self.order {
            ByteOrder::Big => u64::from_be_bytes(self.bytes(at)),
            ByteOrder::Little => u64::from_le_bytes(self.bytes(at)),
        }
    }
}

impl Header {
    /// A v3 header for a backing file of `size` bytes and mtime `mtime`, with
    /// sector size 512 and alignment 4096. `backing_file` is stored as given; the
    /// caller resolves it to an absolute path first.
    pub fn new_v3(backing_file: &Path, size: u64, mtime: u32) -> Result<Header, CowError> {
        let path_len = backing_file.as_os_str().as_bytes().len();
        if path_len == 0 {
            return Err(CowError::BackingPathEmpty { offset: 32 });
        }
        if path_len >= V3_PATH_LEN || backing_file.as_os_str().as_bytes().contains(&0) {
            return Err(CowError::BackingPathTooLong(path_len));
        }
        let header = Header {
            version: Version::V3,
            magic_order: ByteOrder::Big,
            backing_file: backing_file.to_path_buf(),
            mtime,
            size,
            sector_size: SECTOR_SIZE,
            alignment: V3_ALIGNMENT,
            cow_format: 0,
        };
        // Rejects sizes whose offsets would overflow.
        crate::Geometry::new(&header)?;
        Ok(header)
    }

    /// Parses and validates the header at the start of `buf`, which holds the
    /// first [`MAX_HEADER_SIZE`] bytes of the file (or all of it, if shorter).
    pub fn parse(buf: &[u8]) -> Result<Header, CowError> {
        let Some(magic) = buf.get(0..4) else {
            return Err(CowError::NotCow);
        };
        let magic: [u8; 4] = [magic[0], magic[1], magic[2], magic[3]];
        let magic_order = if u32::from_be_bytes(magic) == COW_MAGIC {
            ByteOrder::Big
        } else if u32::from_le_bytes(magic) == COW_MAGIC {
            ByteOrder::Little
        } else {
            return Err(CowError::NotCow);
        };
        let version_bytes = buf.get(4..8).ok_or(CowError::HeaderTruncated {
            version: 0,
            needed: 8,
            have: buf.len(),
        })?;
        let version_bytes = [
            version_bytes[0],
            version_bytes[1],
            version_bytes[2],
            version_bytes[3],
        ];
        let number = match magic_order {
            ByteOrder::Big => u32::from_be_bytes(version_bytes),
            ByteOrder::Little => u32::from_le_bytes(version_bytes),
        };
        let version = match number {
            1 => Version::V1,
            2 => Version::V2,
            3 => {
                // A real v3 header has the path (non-empty, so non-zero) at 32.
                match buf.get(32..36) {
                    Some(b) if b == [0, 0, 0, 0] => Version::V3Broken,
                    Some(_) => Version::V3,
                    None => {
                        return Err(CowError::HeaderTruncated {
                            version: 3,
                            needed: Version::V3.header_size(),
                            have: buf.len(),
                        });
                    }
                }
            }
            other => return Err(CowError::UnknownVersion(other)),
        };
        if buf.len() < version.header_size() {
            return Err(CowError::HeaderTruncated {
                version: number,
                needed: version.header_size(),
                have: buf.len(),
            });
        }
        let layout = Layout::of(version);
        // v1 integers are in the writer's order; v2 and v3 are big-endian.
        let order = if version == Version::V1 {
            magic_order
        } else {
            ByteOrder::Big
        };
        let fields = Fields { buf, order };
        let sector_size = fields.u32(layout.sector_size);
        if sector_size != SECTOR_SIZE {
            // v1 and v2 store a signed field: show it as such.
            let value = if layout.alignment.is_none() {
                i64::from(sector_size as i32)
            } else {
                i64::from(sector_size)
            };
            return Err(CowError::BadSectorSize {
                value,
                offset: layout.sector_size,
            });
        }
        let (alignment, cow_format) = match layout.alignment {
            Some((align_at, format_at)) => {
                let alignment = fields.u32(align_at);
                if alignment == 0 || !alignment.is_power_of_two() {
                    return Err(CowError::BadAlignment {
                        value: alignment,
                        offset: align_at,
                    });
                }
                let cow_format = fields.u32(format_at);
                if cow_format != 0 {
                    return Err(CowError::BadCowFormat {
                        value: cow_format,
                        offset: format_at,
                    });
                }
                (alignment, cow_format)
            }
            None => (sector_size, 0),
        };
        let field = &buf[layout.path..layout.path + layout.path_len];
        let Some(nul) = field.iter().position(|&b| b == 0) else {
            return Err(CowError::BackingPathUnterminated {
                offset: layout.path,
                len: layout.path_len,
            });
        };
        if nul == 0 {
            return Err(CowError::BackingPathEmpty {
                offset: layout.path,
            });
        }
        let header = Header {
            version,
            magic_order,
            backing_file: PathBuf::from(OsStr::from_bytes(&field[..nul])),
            mtime: fields.u32(layout.mtime),
            size: fields.u64(layout.size),
            sector_size,
            alignment,
            cow_format,
        };
        crate::Geometry::new(&header)?;
        Ok(header)
    }

    /// The v3 encoding of this header: 4128 bytes, big-endian, the path field
    /// zero-filled after the NUL. Only v3 headers can be written.
    pub fn encode(&self) -> Result<Vec<u8>, CowError> {
        if self.version != Version::V3 {
            return Err(CowError::CannotWriteVersion(self.version.number()));
        }
        let path = self.backing_file.as_os_str().as_bytes();
        if path.len() >= V3_PATH_LEN {
            return Err(CowError::BackingPathTooLong(path.len()));
        }
        let mut out = vec![0u8; Version::V3.header_size()];
        out[0..4].copy_from_slice(&COW_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&3u32.to_be_bytes());
        out[8..12].copy_from_slice(&self.mtime.to_be_bytes());
        out[12..20].copy_from_slice(&self.size.to_be_bytes());
        out[20..24].copy_from_slice(&self.sector_size.to_be_bytes());
        out[24..28].copy_from_slice(&self.alignment.to_be_bytes());
        out[28..32].copy_from_slice(&self.cow_format.to_be_bytes());
        out[32..32 + path.len()].copy_from_slice(path);
        Ok(out)
    }

    /// The header's size on disk in bytes.
    pub fn header_size(&self) -> usize {
        self.version.header_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> Header {
        Header::new_v3(Path::new("/images/base.img"), 1_000_000, 1_700_000_000).unwrap()
    }

    #[test]
    fn v3_round_trip_and_layout() {
        let h = v3();
        let bytes = h.encode().unwrap();
        assert_eq!(bytes.len(), 4128);
        assert_eq!(&bytes[0..8], &[0x4F, 0x4F, 0x4F, 0x4D, 0, 0, 0, 3]);
        assert_eq!(&bytes[12..20], &1_000_000u64.to_be_bytes());
        assert_eq!(&bytes[32..48], b"/images/base.img");
        assert!(bytes[48..].iter().all(|&b| b == 0));
        assert_eq!(Header::parse(&bytes).unwrap(), h);
    }

    #[test]
    fn garbage_after_the_nul_is_ignored() {
        let mut bytes = v3().encode().unwrap();
        bytes[49..4128].fill(0xAB);
        assert_eq!(
            Header::parse(&bytes).unwrap().backing_file,
            Path::new("/images/base.img")
        );
    }

    #[test]
    fn little_endian_magic_is_recognised() {
        let mut bytes = v3().encode().unwrap();
        bytes[0..4].copy_from_slice(&COW_MAGIC.to_le_bytes());
        bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        let h = Header::parse(&bytes).unwrap();
        assert_eq!(h.magic_order, ByteOrder::Little);
        assert_eq!(h.version, Version::V3);
        assert_eq!(h.size, 1_000_000);
    }

    #[test]
    fn each_defect_has_its_error() {
        let good = v3().encode().unwrap();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            Header::parse(&b).unwrap_err()
        };
        assert_eq!(with(&|b| b[0] = 0), CowError::NotCow);
        assert_eq!(Header::parse(&[]).unwrap_err(), CowError::NotCow);
        assert_eq!(
            with(&|b| b[4..8].copy_from_slice(&9u32.to_be_bytes())),
            CowError::UnknownVersion(9)
        );
        assert_eq!(
            with(&|b| b[24..28].copy_from_slice(&0u32.to_be_bytes())),
            CowError::BadAlignment {
                value: 0,
                offset: 24
            }
        );
        assert_eq!(
            with(&|b| b[24..28].copy_from_slice(&4095u32.to_be_bytes())),
            CowError::BadAlignment {
                value: 4095,
                offset: 24
            }
        );
        assert_eq!(
            with(&|b| b[20..24].copy_from_slice(&4096u32.to_be_bytes())),
            CowError::BadSectorSize {
                value: 4096,
                offset: 20
            }
        );
        assert_eq!(
            with(&|b| b[28..32].copy_from_slice(&1u32.to_be_bytes())),
            CowError::BadCowFormat {
                value: 1,
                offset: 28
            }
        );
        assert_eq!(
            with(&|b| b[32..4128].fill(b'a')),
            CowError::BackingPathUnterminated {
                offset: 32,
                len: 4096
            }
        );
        assert_eq!(
            with(&|b| b.truncate(4127)),
            CowError::HeaderTruncated {
                version: 3,
                needed: 4128,
                have: 4127
            }
        );
        assert_eq!(
            with(&|b| b[12..20].copy_from_slice(&u64::MAX.to_be_bytes())),
            CowError::SizeTooLarge(u64::MAX)
        );
    }

    /// A path that fills its field without a NUL is refused in every
    /// layout, with the field's offset and length; one byte of NUL is enough.
    #[test]
    fn an_unterminated_path_is_refused_in_every_layout() {
        for (version, offset, len) in [
            (Version::V1, 8, 256),
            (Version::V2, 8, 4096),
            (Version::V3Broken, 36, 4096),
            (Version::V3, 32, 4096),
        ] {
            let header = Header {
                version,
                magic_order: ByteOrder::Little,
                backing_file: PathBuf::from("/b"),
                mtime: 1,
                size: 4096,
                sector_size: 512,
                alignment: 512,
                cow_format: 0,
            };
            let mut bytes = crate::legacy::encode(&header).unwrap();
            bytes[offset..offset + len].fill(b'x');
            assert_eq!(
                Header::parse(&bytes),
                Err(CowError::BackingPathUnterminated { offset, len }),
                "{version:?}"
            );
            bytes[offset + len - 1] = 0;
            let parsed = Header::parse(&bytes).unwrap();
            assert_eq!(
                parsed.backing_file.as_os_str().len(),
                len - 1,
                "{version:?}"
            );
        }
    }

    #[test]
    fn new_v3_refuses_paths_that_do_not_fit() {
        assert_eq!(
            Header::new_v3(Path::new(""), 1, 1).unwrap_err(),
            CowError::BackingPathEmpty { offset: 32 }
        );
        let long = "/".repeat(4096);
        assert_eq!(
            Header::new_v3(Path::new(&long), 1, 1).unwrap_err(),
            CowError::BackingPathTooLong(4096)
        );
        let longest = format!("/{}", "a".repeat(4094));
        assert!(Header::new_v3(Path::new(&longest), 1, 1).is_ok());
    }
}
