//! Whether a file can take direct I/O, and with what alignment
//! (`statx(STATX_DIOALIGN)`). The kernel does not reliably reject misaligned
//! direct I/O (ext4 quietly falls back for reads), so the device checks
//! alignment itself from these numbers.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Direct I/O alignment of a file: buffers in memory and file offsets/lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DioAlign {
    pub mem: u32,
    pub offset: u32,
}

/// The file's direct I/O alignment, or `None` when the file system does not
/// support direct I/O on it (or the kernel does not say).
pub fn dio_align(file: &File) -> Option<DioAlign> {
    // SAFETY: statx only writes into `stx`, a plain struct of integers for
    // which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: a valid fd, an empty NUL-terminated path with AT_EMPTY_PATH, and
    // a pointer to a live, writable statx struct.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(DioAlign {
        mem: stx.stx_dio_mem_align,
        offset: stx.stx_dio_offset_align,
    })
}
