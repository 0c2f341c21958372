//! Every way a COW file can be wrong, one variant each.

use thiserror::Error;

/// Why a file is not a usable COW overlay. Offsets are byte offsets in the file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CowError {
    /// Neither byte order of the magic number is at offset 0. Such a file is
    /// treated as a raw image where that makes sense, as UML does.
    #[error("not a UML COW file: no COW magic at offset 0")]
    NotCow,
    /// The magic is there but the version field is not 1, 2 or 3.
    #[error("unknown COW version {0} (offset 4); known versions are 1, 2 and 3")]
    UnknownVersion(u32),
    /// The file ends before the header of its version does.
    #[error("COW v{version} header needs {needed} bytes but the file has only {have}")]
    HeaderTruncated {
        version: u32,
        needed: usize,
        have: usize,
    },
    /// The sector size is not 512.
    #[error("sector size {value} at offset {offset} is not 512")]
    BadSectorSize { value: i64, offset: usize },
    /// The alignment is zero or not a power of two.
    #[error("alignment {value} at offset {offset} is zero or not a power of two")]
    BadAlignment { value: u32, offset: usize },
    /// The bitmap format is not 0, the only one ever defined.
    #[error("bitmap format {value} at offset {offset} is unknown (only 0 is defined)")]
    BadCowFormat { value: u32, offset: usize },
    /// The backing file name has no NUL within its field.
    #[error(
        "backing file path at offset {offset} is not NUL-terminated within its {len}-byte field"
    )]
    BackingPathUnterminated { offset: usize, len: usize },
    /// The backing file name is empty.
    #[error("backing file path at offset {offset} is empty")]
    BackingPathEmpty { offset: usize },
    /// A backing file name that does not fit a v3 header.
    #[error("backing file path is {0} bytes long; a v3 header holds at most 4095")]
    BackingPathTooLong(usize),
    /// Only v3 headers are ever written.
    #[error("only v3 headers are written; this one is v{0}")]
    CannotWriteVersion(u32),
    /// The backing size makes the file's offsets overflow a signed 64-bit offset.
    #[error("backing size {0} is too large: the overlay's offsets would overflow")]
    SizeTooLarge(u64),
    /// The file ends before its data area starts.
    #[error("file is {len} bytes, shorter than its data offset {data_offset}")]
    FileTooShort { len: u64, data_offset: u64 },
}
