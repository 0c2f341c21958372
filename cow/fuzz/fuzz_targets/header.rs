//! Header parsing must never panic: any bytes give a header or an error, and a
//! header that parses has a geometry, a v3 header re-encodes to bytes that parse
//! back to it, and a bitmap over it iterates without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ubd_cow::{Bitmap, Geometry, Header, Version};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::parse(data) else {
        return;
    };
    let geometry = Geometry::new(&header).expect("a parsed header has a geometry");
    let _ = geometry.check_file_len(data.len() as u64);
    if header.version == Version::V3 {
        let bytes = header.encode().expect("a parsed v3 header encodes");
        assert_eq!(Header::parse(&bytes).as_ref(), Ok(&header));
    }
    // Use what follows the header as a bitmap, as a reader of the file would.
    let rest = data.get(header.header_size()..).unwrap_or_default();
    let bitmap = Bitmap::new(rest, geometry.mapped_sectors());
    let present = bitmap.count_present();
    let from_runs: u64 = bitmap
        .runs(0..geometry.sectors.min(1 << 20))
        .filter(|r| r.present)
        .map(|r| r.len)
        .sum();
    assert!(from_runs <= present);
    let _ = bitmap.stray_bits();
});
