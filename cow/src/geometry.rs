//! Where things live in a COW file: the bitmap, the data area, sector N.
//!
//! ```text
//! v3:     bitmap_offset = round_up(header_size, alignment)
//!         bitmap_len    = ceil(ceil(size / 512) / 8)
//!         data_offset   = round_up(bitmap_offset + bitmap_len, alignment)
//! v1, v2: alignment     = sectorsize
//!         bitmap_offset = header_size
//!         bitmap_len    = floor((size + 511) / (8 * 512))   (one byte short when the
//!                                                            sector count is not a multiple of 8)
//!         data_offset   = round_up(bitmap_offset + bitmap_len, sectorsize)
//! ```
//!
//! A present sector N lives at `data_offset + 512 * N` in the COW file, an absent
//! one at `512 * N` in the backing file.

use crate::{CowError, Header, SECTOR_SIZE, Version};

const SECTOR: u64 = SECTOR_SIZE as u64;

/// The layout of one COW file, computed from its header with checked arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The backing file's size in bytes, as the header records it.
    pub size: u64,
    /// Sectors of the device: `ceil(size / 512)`.
    pub sectors: u64,
    /// Byte offset of the bitmap in the COW file.
    pub bitmap_offset: u64,
    /// Length of the bitmap in bytes.
    pub bitmap_len: u64,
    /// Byte offset of sector 0's data in the COW file.
    pub data_offset: u64,
}

fn round_up(value: u64, to: u64) -> Option<u64> {
    value.checked_next_multiple_of(to)
}

impl Geometry {
    /// Computes the geometry of `header`, or [`CowError::SizeTooLarge`] when an
    /// offset of the file would not fit a signed 64-bit file offset.
    pub fn new(header: &Header) -> Result<Geometry, CowError> {
        let too_large = CowError::SizeTooLarge(header.size);
        let size = header.size;
        let sectors = size.div_ceil(SECTOR);
        let header_size = header.version.header_size() as u64;
        let (bitmap_offset, bitmap_len, align) = match header.version {
            Version::V1 | Version::V2 => {
                // UML's formula, one byte short when sectors % 8 != 0.
                let len = sectors / 8;
                (header_size, len, SECTOR)
            }
            Version::V3 | Version::V3Broken => {
                let align = u64::from(header.alignment);
                let offset = round_up(header_size, align).ok_or(too_large.clone())?;
                (offset, sectors.div_ceil(8), align)
            }
        };
        let data_offset = bitmap_offset
            .checked_add(bitmap_len)
            .and_then(|end| round_up(end, align))
            .ok_or(too_large.clone())?;
        let end = sectors
            .checked_mul(SECTOR)
            .and_then(|bytes| bytes.checked_add(data_offset))
            .ok_or(too_large.clone())?;
        if end > i64::MAX as u64 {
            return Err(too_large);
        }
        Ok(Geometry {
            size,
            sectors,
            bitmap_offset,
            bitmap_len,
            data_offset,
        })
    }

    /// The device's capacity in bytes: the size rounded up to a whole sector. The
    /// tail past `size` reads as zeros.
    pub fn capacity(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// Sectors that have a bit in the bitmap. Equals `sectors` for v3; v1 and v2
    /// bitmaps are one byte short when `sectors` is not a multiple of 8, and the
    /// last few sectors then always come from the backing file.
    pub fn mapped_sectors(&self) -> u64 {
        self.sectors.min(self.bitmap_len * 8)
    }

    /// Offset of sector `n`'s data in the COW file, if the device has sector `n`.
    pub fn cow_offset(&self, n: u64) -> Option<u64> {
        (n < self.sectors).then(|| self.data_offset + n * SECTOR)
    }

    /// Offset of sector `n` in the backing file, if the device has sector `n`.
    pub fn backing_offset(&self, n: u64) -> Option<u64> {
        (n < self.sectors).then(|| n * SECTOR)
    }

    /// The length of a freshly made COW file: `data_offset + size`.
    pub fn full_len(&self) -> u64 {
        self.data_offset + self.size
    }

    /// Checks that a file of `len` bytes holds at least the header and bitmap.
    pub fn check_file_len(&self, len: u64) -> Result<(), CowError> {
        if len < self.data_offset {
            return Err(CowError::FileTooShort {
                len,
                data_offset: self.data_offset,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn v3(size: u64) -> Geometry {
        Geometry::new(&Header::new_v3(Path::new("/b"), size, 0).unwrap()).unwrap()
    }

    /// Values measured on files made by `uml_mkcow` (cow-format.md).
    #[test]
    fn matches_uml_mkcow() {
        for (size, bitmap_len, data_offset, file_len) in [
            (1_000_000u64, 245u64, 12_288u64, 1_012_288u64),
            (64 << 20, 16_384, 24_576, 67_133_440),
            (1 << 30, 262_144, 270_336, 1_074_012_160),
            (10 << 30, 2_621_440, 2_629_632, 10_740_047_872),
        ] {
            let g = v3(size);
            assert_eq!(g.bitmap_offset, 8192);
            assert_eq!(g.bitmap_len, bitmap_len, "size {size}");
            assert_eq!(g.data_offset, data_offset, "size {size}");
            assert_eq!(g.full_len(), file_len, "size {size}");
        }
    }

    #[test]
    fn sector_offsets() {
        let g = v3(1_000_000);
        assert_eq!(g.sectors, 1954);
        assert_eq!(g.capacity(), 1954 * 512);
        assert_eq!(g.cow_offset(0), Some(12_288));
        assert_eq!(g.cow_offset(1953), Some(12_288 + 1953 * 512));
        assert_eq!(g.cow_offset(1954), None);
        assert_eq!(g.backing_offset(3), Some(1536));
        assert_eq!(
            g.check_file_len(12_287),
            Err(CowError::FileTooShort {
                len: 12_287,
                data_offset: 12_288
            })
        );
        assert_eq!(g.check_file_len(12_288), Ok(()));
    }

    #[test]
    fn overflow_is_an_error() {
        let mut h = Header::new_v3(Path::new("/b"), 1, 0).unwrap();
        h.size = i64::MAX as u64;
        assert_eq!(Geometry::new(&h), Err(CowError::SizeTooLarge(h.size)));
        h.size = 1 << 40;
        h.alignment = 1 << 31;
        assert!(Geometry::new(&h).is_ok());
    }
}
