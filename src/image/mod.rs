//! Image files on disk: telling an overlay from a raw image, reading an
//! overlay's header and bitmap, checking its backing file, creating new images,
//! and the OFD locks that keep two users off one overlay.
//!
//! Keeps the user-visible contract that the backing file is only ever opened
//! read-only here, and that `create` never leaves an old bitmap under a new
//! header.

mod backing;
mod create;
mod lock;
mod open;
pub mod qcow2;

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use thiserror::Error;
use ubd_cow::{Bitmap, CowError, Geometry, Header, MAX_HEADER_SIZE};

pub use backing::{
    BackingState, Examined, Refusal, Stamp, examine, open_vetted, resolve, same_file, stamp, vet,
};
pub use create::{create_overlay, create_raw};
pub use lock::{LockKind, lock};
pub use open::{Cache, ImageFile, OpenImage, OpenOptions, Overlay, open};

/// What can go wrong with an image file. Every variant names the file.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{}: {op}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: CowError,
    },
    #[error("{} already exists (pass --force to replace it)", path.display())]
    Exists { path: PathBuf },
    #[error("{} is in use: {}", path.display(), match holder {
        Some(pid) => format!("process {pid} holds a lock on it"),
        None => "another process holds a lock on it".to_string(),
    })]
    Locked { path: PathBuf, holder: Option<i32> },
    #[error("refusing to create {} over itself: it is the backing file {}", cow.display(), backing.display())]
    SameFile { cow: PathBuf, backing: PathBuf },
    #[error("{}: {problem}", path.display())]
    BackingMismatch { path: PathBuf, problem: String },
    #[error("{}: mtime {mtime} does not fit the COW format's 32-bit field (touch the file to give it a current mtime)", path.display())]
    MtimeOutOfRange { path: PathBuf, mtime: i64 },
    /// The backing file an overlay names fails a trust check.
    #[error("{}", overlay.display())]
    BackingRefused {
        overlay: PathBuf,
        #[source]
        refusal: Refusal,
    },
}

/// A zeroed buffer for `path`'s bitmap of `len` bytes, or a clear error when
/// the header claims a bitmap too large to hold (a lying or huge header): more
/// than half this machine's memory, or more than an allocation can get.
pub fn bitmap_buffer(path: &Path, len: u64) -> Result<Vec<u8>, ImageError> {
    let limit = nix::sys::sysinfo::sysinfo().map_or(u64::MAX, |s| s.ram_total() / 2);
    bitmap_buffer_within(path, len, limit)
}

fn bitmap_buffer_within(path: &Path, len: u64, limit: u64) -> Result<Vec<u8>, ImageError> {
    let too_big = |why: String| ImageError::Io {
        path: path.to_path_buf(),
        op: "cannot hold the bitmap in memory",
        source: io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("the header claims a {len}-byte bitmap{why}"),
        ),
    };
    if len > limit {
        return Err(too_big(format!(
            ", more than half this machine's memory ({limit} bytes)"
        )));
    }
    let len = usize::try_from(len).map_err(|_| too_big(String::new()))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| too_big(String::new()))?;
    buf.resize(len, 0);
    Ok(buf)
}

/// Where the next data at or after `at` starts in `file` (SEEK_DATA), at most
/// `limit`; `limit` when only a hole follows. Without SEEK_DATA support every
/// byte counts as data, so `at` comes back.
pub fn next_data(file: &File, at: u64, limit: u64) -> u64 {
    let Ok(pos) = i64::try_from(at) else {
        return at;
    };
    match nix::unistd::lseek(file, pos, nix::unistd::Whence::SeekData) {
        Ok(d) => (d as u64).clamp(at, limit.max(at)),
        Err(nix::errno::Errno::ENXIO) => limit.max(at),
        Err(_) => at,
    }
}

/// Opens `path` read-only or read-write with `flags` added, without
/// blocking: a FIFO would make the open hang. The caller checks what it
/// opened, then calls [`blocking_again`].
pub(crate) fn open_nonblocking(path: &Path, write: bool, flags: i32) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// Clears the O_NONBLOCK [`open_nonblocking`] set: io_uring would return
/// EAGAIN instead of waiting on such a file.
pub(crate) fn blocking_again(file: &File) -> io::Result<()> {
    let status = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?) & !OFlag::O_NONBLOCK;
    fcntl(file, FcntlArg::F_SETFL(status))?;
    Ok(())
}

/// Opens the image file `path` (the overlay or raw image a verb was given),
/// read-only or read-write, with O_DIRECT for `direct`, and refuses anything
/// but a regular file or a block device: a directory, character device or
/// socket holds no disk (and a FIFO is opened without blocking).
pub(crate) fn open_image(path: &Path, write: bool, direct: bool) -> io::Result<File> {
    let file = open_nonblocking(path, write, if direct { libc::O_DIRECT } else { 0 })?;
    let file_type = file.metadata()?.file_type();
    if !file_type.is_file() && !file_type.is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "it is a {}, not a regular file or block device",
                backing::kind_of(file_type)
            ),
        ));
    }
    blocking_again(&file)?;
    Ok(file)
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns the
/// number of bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// An image file as found on disk.
#[derive(Debug)]
pub enum Image {
    Cow(CowImage),
    Raw(RawImage),
}

/// A file without COW magic: a raw disk image.
#[derive(Debug)]
pub struct RawImage {
    pub path: PathBuf,
    /// Length in bytes: the device's capacity.
    pub len: u64,
    /// Bytes allocated on disk.
    pub allocated: u64,
    /// The image format whose header the file starts with, if any (see
    /// [`container_format`]): ubd still reads it as a raw disk.
    pub container: Option<&'static str>,
}

/// The disk image format whose header `head` (a file's first bytes) starts
/// with, for those that hold a disk rather than being one: qcow, qcow2,
/// QED, VMDK, VHDX, VHD and VDI, and a UML COW overlay where a backing file
/// goes. ubd reads those as a raw disk, which is right for such a file only if a guest
/// wrote that header itself; more likely it was given the wrong file. A file
/// system or LUKS header at offset 0 is the content of a raw disk, not
/// another format, and is not named here.
pub fn container_format(head: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    // A UML COW overlay given as another's backing file: overlays do not
    // chain (UML reads a backing file as a raw disk too).
    if at(0, &ubd_cow::COW_MAGIC.to_be_bytes()) || at(0, &ubd_cow::COW_MAGIC.to_le_bytes()) {
        return Some(UML_COW);
    }
    if at(0, b"QFI\xfb") {
        let version = head
            .get(4..8)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return Some(if version == Some(1) { "qcow" } else { "qcow2" });
    }
    let formats: [(usize, &[u8], &'static str); 7] = [
        (0, b"QED\0", "QED"),
        (0, b"KDMV", "VMDK"),
        (0, b"COWD", "VMDK"),
        (0, b"# Disk DescriptorFile", "VMDK"),
        (0, b"vhdxfile", "VHDX"),
        (0, b"conectix", "VHD"),
        // VDI: its signature after a 64-byte text line.
        (0x40, &[0x7f, 0x10, 0xda, 0xbe], "VDI"),
    ];
    formats
        .iter()
        .find(|(offset, magic, _)| at(*offset, magic))
        .map(|(_, _, name)| *name)
}

/// What [`container_format`] calls a UML COW overlay.
const UML_COW: &str = "UML COW";

/// The warning for a file ubd reads as a raw disk that starts with the
/// header of `format` (see [`container_format`]).
pub fn container_warning(path: &Path, format: &str) -> String {
    if format == UML_COW {
        return format!(
            "{}: is a UML COW overlay, but ubd reads a backing file as a raw disk \
             (overlays do not chain: its header and bitmap included); \
             `ubd convert` makes a raw image of the disk it holds",
            path.display()
        );
    }
    format!(
        "{}: starts with a {format} header, but ubd reads it as a raw disk image \
         (its {format} header and tables included); if it is a {format} image, \
         `qemu-img convert -O raw` makes a raw image of the disk it holds",
        path.display()
    )
}

/// Logs [`container_warning`] if `file` (at `path`; the backing file of
/// `overlay`, if given) starts with another disk image format's header.
/// A file it cannot read gets no warning: its readers say why.
pub fn warn_if_container(file: &File, path: &Path, overlay: Option<&Path>) {
    let mut head = [0u8; 512];
    let Ok(n) = read_full_at(file, &mut head, 0) else {
        return;
    };
    if let Some(format) = container_format(&head[..n]) {
        match overlay {
            Some(o) => tracing::warn!(
                "{}: the backing file {}",
                o.display(),
                container_warning(path, format)
            ),
            None => tracing::warn!("{}", container_warning(path, format)),
        }
    }
}

/// A UML COW overlay, opened read-only for inspection.
#[derive(Debug)]
pub struct CowImage {
    pub path: PathBuf,
    pub header: Header,
    pub geometry: Geometry,
    /// The file's length in bytes.
    pub file_len: u64,
    /// Bytes allocated on disk.
    pub allocated: u64,
    file: File,
}

/// What a pass over an overlay's bitmap found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapScan {
    /// Sectors marked present.
    pub present: u64,
    /// Bits set past the last sector.
    pub stray: u64,
}

impl Image {
    /// Opens `path` read-only and tells an overlay from a raw image. A file
    /// with COW magic but a bad header is an error, not a raw image.
    pub fn probe(path: &Path) -> Result<Image, ImageError> {
        let io_err = |op, source| ImageError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let file = open_image(path, false, false).map_err(|e| io_err("cannot open", e))?;
        let meta = file.metadata().map_err(|e| io_err("cannot stat", e))?;
        let mut buf = vec![0u8; MAX_HEADER_SIZE];
        let n =
            read_full_at(&file, &mut buf, 0).map_err(|e| io_err("cannot read the header", e))?;
        let allocated = meta.blocks() * 512;
        match Header::parse(&buf[..n]) {
            Ok(header) => {
                let geometry = Geometry::new(&header).map_err(|source| ImageError::Format {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(Image::Cow(CowImage {
                    path: path.to_path_buf(),
                    header,
                    geometry,
                    file_len: meta.len(),
                    allocated,
                    file,
                }))
            }
            Err(CowError::NotCow) => Ok(Image::Raw(RawImage {
                path: path.to_path_buf(),
                len: backing::stamp(path)?.size,
                allocated,
                container: container_format(&buf[..n]),
            })),
            Err(source) => Err(ImageError::Format {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

impl CowImage {
    /// The backing file to use: `override_path` if given (as UML's second
    /// name), else the header's path.
    pub fn backing_path<'a>(&'a self, override_path: Option<&'a Path>) -> &'a Path {
        override_path.unwrap_or(&self.header.backing_file)
    }

    /// The backing file to read (`override_path`, else the header's) and how
    /// it compares with the header, under the trust checks of [`vet`] with
    /// `dir` as the backing directory: a refused file is an error.
    pub fn backing(
        &self,
        override_path: Option<&Path>,
        dir: Option<&Path>,
    ) -> Result<Examined, ImageError> {
        examine(
            &self.path,
            &self.header,
            self.backing_path(override_path),
            dir,
        )
    }

    /// Checks that the file holds at least its header and bitmap.
    pub fn check_len(&self) -> Result<(), ImageError> {
        self.geometry
            .check_file_len(self.file_len)
            .map_err(|source| ImageError::Format {
                path: self.path.clone(),
                source,
            })
    }

    /// Reads the whole bitmap, a chunk at a time, and counts what it holds.
    pub fn scan_bitmap(&self) -> Result<BitmapScan, ImageError> {
        self.scan_bitmap_with(|_| {})
    }

    /// Like [`CowImage::scan_bitmap`], telling `done` how many bitmap bytes
    /// each chunk held (for a progress bar).
    pub fn scan_bitmap_with(&self, mut done: impl FnMut(u64)) -> Result<BitmapScan, ImageError> {
        self.check_len()?;
        const CHUNK: u64 = 1 << 20;
        let g = &self.geometry;
        let mut buf = vec![0u8; CHUNK.min(g.bitmap_len) as usize];
        let mut scan = BitmapScan {
            present: 0,
            stray: 0,
        };
        let mut at = 0;
        while at < g.bitmap_len {
            // Holes in the bitmap hold no bits: skip them (a sparse file
            // whose header claims a huge bitmap is read in moments).
            let end = g.bitmap_offset + g.bitmap_len;
            let skip_to = next_data(&self.file, g.bitmap_offset + at, end) - g.bitmap_offset;
            if skip_to > at {
                done(skip_to - at);
                at = skip_to;
                continue;
            }
            let len = (g.bitmap_len - at).min(CHUNK) as usize;
            let chunk = &mut buf[..len];
            let n = read_full_at(&self.file, chunk, g.bitmap_offset + at).map_err(|source| {
                ImageError::Io {
                    path: self.path.clone(),
                    op: "cannot read the bitmap",
                    source,
                }
            })?;
            if n < len {
                return Err(ImageError::Format {
                    path: self.path.clone(),
                    source: CowError::FileTooShort {
                        len: g.bitmap_offset + at + n as u64,
                        data_offset: g.data_offset,
                    },
                });
            }
            let bits = g.mapped_sectors().saturating_sub(at * 8);
            let bitmap = Bitmap::new(&chunk[..], bits);
            scan.present += bitmap.count_present();
            scan.stray += bitmap.stray_bits();
            at += len as u64;
            done(len as u64);
        }
        Ok(scan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bitmap_over_the_limit_is_refused_before_any_allocation() {
        let path = Path::new("lying.cow");
        assert_eq!(bitmap_buffer_within(path, 4096, 4096).unwrap().len(), 4096);
        let err = bitmap_buffer_within(path, 4097, 4096).unwrap_err();
        let line = crate::error_chain(&err);
        assert!(
            line.starts_with("lying.cow: cannot hold the bitmap in memory")
                && line.contains("4097-byte bitmap")
                && line.contains("(4096 bytes)"),
            "{line}"
        );
        // Past what an allocation can get, whatever the limit.
        let err = bitmap_buffer_within(path, u64::MAX, u64::MAX).unwrap_err();
        assert!(crate::error_chain(&err).contains("cannot hold the bitmap"));
        // The real limit is half the memory: a claim of all of it is refused.
        let ram = nix::sys::sysinfo::sysinfo().unwrap().ram_total();
        assert!(bitmap_buffer(path, ram).is_err());
    }
}

#[cfg(test)]
mod container_tests {
    use super::container_format;

    #[test]
    fn disk_image_formats_are_named_and_disk_contents_are_not() {
        let with = |offset: usize, magic: &[u8]| {
            let mut head = vec![0u8; 4096];
            head[offset..offset + magic.len()].copy_from_slice(magic);
            head
        };
        let mut qcow2 = with(0, b"QFI\xfb");
        qcow2[7] = 3;
        assert_eq!(container_format(&qcow2), Some("qcow2"));
        let mut qcow = with(0, b"QFI\xfb");
        qcow[7] = 1;
        assert_eq!(container_format(&qcow), Some("qcow"));
        assert_eq!(container_format(&with(0, b"KDMV")), Some("VMDK"));
        assert_eq!(container_format(&with(0, b"vhdxfile")), Some("VHDX"));
        assert_eq!(container_format(&with(0, b"conectix")), Some("VHD"));
        assert_eq!(
            container_format(&with(0x40, &[0x7f, 0x10, 0xda, 0xbe])),
            Some("VDI")
        );
        assert_eq!(container_format(&with(0, b"QED\0")), Some("QED"));
        // Contents of a raw disk: nothing, LUKS, an ext4 superblock.
        assert_eq!(container_format(&with(0, b"OOOM")), Some("UML COW"));
        assert_eq!(container_format(&with(0, b"MOOO")), Some("UML COW"));
        assert_eq!(container_format(&[0u8; 512]), None);
        assert_eq!(container_format(&with(0, b"LUKS\xba\xbe")), None);
        assert_eq!(container_format(&with(0x438, &[0x53, 0xef])), None);
        // Short files.
        assert_eq!(container_format(b"QF"), None);
        assert_eq!(container_format(b""), None);
    }
}
