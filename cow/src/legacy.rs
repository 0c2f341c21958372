//! Writers for the header layouts nothing writes any more (v1, v2, broken v3), so
//! tests can build such files. Only with the `test-util` feature.

use std::os::unix::ffi::OsStrExt;

use crate::header::Layout;
use crate::{ByteOrder, COW_MAGIC, CowError, Header, Version};

/// Encodes `header` in its own `version` and `magic_order` layout, as the old
/// writers did: magic and version in `magic_order`, v1 fields in `magic_order`,
/// the fields of later versions big-endian. (For a big-endian v3 header this is
/// the same as [`Header::encode`].)
pub fn encode(header: &Header) -> Result<Vec<u8>, CowError> {
    let version = header.version;
    let layout = Layout::of(version);
    let path = header.backing_file.as_os_str().as_bytes();
    if path.len() >= layout.path_len {
        return Err(CowError::BackingPathTooLong(path.len()));
    }
    let order = if version == Version::V1 {
        header.magic_order
    } else {
        ByteOrder::Big
    };
    let mut out = vec![0u8; version.header_size()];
    let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
    let u32b = |v: u32| match order {
        ByteOrder::Big => v.to_be_bytes(),
        ByteOrder::Little => v.to_le_bytes(),
    };
    let magic = match header.magic_order {
        ByteOrder::Big => COW_MAGIC.to_be_bytes(),
        ByteOrder::Little => COW_MAGIC.to_le_bytes(),
    };
    let number = match header.magic_order {
        ByteOrder::Big => version.number().to_be_bytes(),
        ByteOrder::Little => version.number().to_le_bytes(),
    };
    put(0, &magic);
    put(4, &number);
    put(layout.path, path);
    put(layout.mtime, &u32b(header.mtime));
    let size = match order {
        ByteOrder::Big => header.size.to_be_bytes(),
        ByteOrder::Little => header.size.to_le_bytes(),
    };
    put(layout.size, &size);
    put(layout.sector_size, &u32b(header.sector_size));
    if let Some((align_at, format_at)) = layout.alignment {
        put(align_at, &u32b(header.alignment));
        put(format_at, &u32b(header.cow_format));
    }
    Ok(out)
}
