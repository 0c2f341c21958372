//! The User-Mode Linux COW overlay format, and nothing else.
//!
//! An overlay ("COW file") records which 512-byte sectors of a read-only backing
//! image have been written and holds their new contents. This crate owns the
//! on-disk layout: [`Header`] (read v1, v2, "broken" v3 and v3; write v3 only),
//! [`Geometry`] (where the bitmap and each sector live) and [`Bitmap`] (bit
//! operations and runs of present or absent sectors).
//!
//! It is pure: no I/O, no threads. Every input, however malformed, yields a
//! value or a [`CowError`], never a panic; the fuzz target in `fuzz/` holds it
//! to that.

mod bitmap;
mod error;
mod geometry;
mod header;
#[cfg(any(test, feature = "test-util"))]
pub mod legacy;

pub use bitmap::{Bitmap, Run, Runs};
pub use error::CowError;
pub use geometry::Geometry;
pub use header::{ByteOrder, Header, MAX_HEADER_SIZE, V3_PATH_LEN, Version};

/// The COW magic number, `"OOOM"` read big-endian.
pub const COW_MAGIC: u32 = 0x4F4F_4F4D;

/// The only sector size the format is used with.
pub const SECTOR_SIZE: u32 = 512;

/// The alignment new v3 files are written with: the page size, as `uml_mkcow` and
/// the UML kernel use.
pub const V3_ALIGNMENT: u32 = 4096;
