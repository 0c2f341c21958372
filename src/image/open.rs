//! Opening an image for I/O: an overlay with its backing file, or a raw image.
//!
//! The overlay is opened read-write under an exclusive OFD lock (shared when
//! read-only), the backing file read-only under a shared lock, and the pair is
//! refused unless the backing file's size and whole-second mtime match the
//! header, as UML does. The bitmap is read into RAM, where it routes reads.
//! Direct I/O (`cache=none`) is used for a file only where `statx` says the file
//! system takes it at sector alignment and, for an overlay, where the format's
//! alignment keeps bitmap pages and data pages apart (v3's 4096).
//!
//! The backing file goes through the trust checks of [`super::vet`] and
//! [`super::open_vetted`]: only a regular file is read, with a backing
//! directory only one inside it, and the file opened is the one checked.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ubd_cow::{Geometry, Header, MAX_HEADER_SIZE};

use super::{BackingState, ImageError, LockKind, lock, read_full_at};
use crate::engine::dio::dio_align;

/// How the host's page cache is used, with the names qemu users know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cache {
    /// Direct I/O (O_DIRECT) where the file system supports it.
    #[default]
    None,
    /// Buffered I/O through the host page cache.
    Writeback,
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Use this backing file instead of the one the header names.
    pub backing: Option<PathBuf>,
    /// Read a backing file only if its fully resolved path is inside this
    /// directory (the header's path and `backing` alike).
    pub backing_dir: Option<PathBuf>,
    pub cache: Cache,
    /// How long to retry a lock another process holds (a killed server's
    /// io_uring teardown releases its locks a little after it is gone).
    pub lock_wait: Duration,
}

/// One file of an opened image.
#[derive(Debug, Clone)]
pub struct ImageFile {
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// Bytes in the file when opened.
    pub len: u64,
}

/// An overlay's layout and its bitmap, as the device needs them.
#[derive(Debug)]
pub struct Overlay {
    pub header: Header,
    pub geometry: Geometry,
    /// The bitmap as on disk when opened.
    pub bitmap: Vec<u8>,
    /// A second, buffered descriptor of the overlay for bitmap writes (the
    /// data descriptor may be O_DIRECT).
    pub meta: Arc<File>,
    pub backing: ImageFile,
}

/// An image opened for I/O.
#[derive(Debug)]
pub struct OpenImage {
    /// The overlay or the raw image: the file writes go to.
    pub main: ImageFile,
    /// Present for an overlay.
    pub overlay: Option<Overlay>,
    /// Bytes the device has: the backing size rounded up to 512 for an
    /// overlay, the file's length for a raw image.
    pub capacity: u64,
    pub read_only: bool,
    /// The descriptor that holds the image's lock (shared when read-only,
    /// exclusive otherwise): the lock lasts as long as it is open.
    pub lock: Arc<File>,
}

fn open_file(path: &Path, write: bool, cache: Cache) -> Result<(File, bool), ImageError> {
    let open = |direct: bool| super::open_image(path, write, direct);
    let file = open(false).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        op: "cannot open",
        source,
    })?;
    // Direct I/O only where the file system takes it at sector alignment.
    let direct_ok =
        cache == Cache::None && dio_align(&file).is_some_and(|a| a.offset <= 512 && a.mem <= 4096);
    if direct_ok && let Ok(direct) = open(true) {
        return Ok((direct, true));
    }
    Ok((file, false))
}

fn len_of(file: &File, path: &Path) -> Result<u64, ImageError> {
    super::backing::file_size(file).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        op: "cannot read the size of",
        source,
    })
}

/// Opens the backing file `named` of the overlay at `overlay`, read-only
/// under a shared lock, once it passes the trust checks and matches the
/// header's size and mtime (checked again on the open file, so a file swapped
/// in meanwhile is refused too). Returns the resolved path, the file and
/// whether it is in direct I/O.
fn open_backing(
    overlay: &Path,
    header: &Header,
    named: &Path,
    opts: &OpenOptions,
) -> Result<(PathBuf, File, bool), ImageError> {
    let dir = opts.backing_dir.as_deref();
    let examined = super::examine(overlay, header, named, dir)?;
    let mismatch = |state: BackingState| {
        state
            .problem(header, named)
            .map(|problem| ImageError::BackingMismatch {
                path: overlay.to_path_buf(),
                problem,
            })
    };
    if let Some(e) = mismatch(examined.state) {
        return Err(e);
    }
    let Some(resolved) = examined.resolved else {
        // A file that matches has resolved.
        return Err(ImageError::BackingMismatch {
            path: overlay.to_path_buf(),
            problem: format!("backing file {} cannot be resolved", named.display()),
        });
    };
    let file = super::open_vetted(overlay, named, &resolved, dir, false, false)?;
    let io_err = |op, source| ImageError::Io {
        path: resolved.clone(),
        op,
        source,
    };
    super::warn_if_container(&file, &resolved, Some(overlay));
    let meta = file.metadata().map_err(|e| io_err("cannot stat", e))?;
    // Direct I/O only where the file system takes it at sector alignment,
    // on the same file.
    let direct_ok = opts.cache == Cache::None
        && dio_align(&file).is_some_and(|a| a.offset <= 512 && a.mem <= 4096);
    let (file, direct) =
        match direct_ok.then(|| super::open_vetted(overlay, named, &resolved, dir, false, true)) {
            Some(Ok(d)) if d.metadata().is_ok_and(|m| same_inode(&m, &meta)) => (d, true),
            _ => (file, false),
        };
    lock(&file, &resolved, LockKind::Shared, opts.lock_wait)?;
    // The file opened must still be the one that matched.
    let meta = file.metadata().map_err(|e| io_err("cannot stat", e))?;
    let on_disk = super::Stamp {
        size: meta.len(),
        mtime: meta.mtime(),
    };
    if let Some(e) = mismatch(BackingState::compare(header, on_disk)) {
        return Err(e);
    }
    Ok((resolved, file, direct))
}

fn same_inode(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

/// Opens `path` (an overlay or a raw image) for I/O.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<OpenImage, ImageError> {
    let write = !opts.read_only;
    let lock_kind = if write {
        LockKind::Exclusive
    } else {
        LockKind::Shared
    };
    // Read the header through a plain descriptor first.
    let (probe, _) = open_file(path, write, Cache::Writeback)?;
    lock(&probe, path, lock_kind, opts.lock_wait)?;
    let mut head = vec![0u8; MAX_HEADER_SIZE];
    let n = read_full_at(&probe, &mut head, 0).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        op: "cannot read the header",
        source,
    })?;
    let format_err = |source| ImageError::Format {
        path: path.to_path_buf(),
        source,
    };
    let header = match Header::parse(&head[..n]) {
        Ok(h) => Some(h),
        Err(ubd_cow::CowError::NotCow) => None,
        Err(e) => return Err(format_err(e)),
    };
    let Some(header) = header else {
        if let Some(format) = super::container_format(&head[..n]) {
            tracing::warn!("{}", super::container_warning(path, format));
        }
        let (file, direct) = open_file(path, write, opts.cache)?;
        let len = len_of(&file, path)?;
        // Direct I/O needs whole sectors: a raw image with a ragged end is
        // served buffered.
        let probe = Arc::new(probe);
        let (file, direct) = if direct && len % 512 != 0 {
            (probe.clone(), false)
        } else {
            (Arc::new(file), direct)
        };
        return Ok(OpenImage {
            main: ImageFile {
                path: path.to_path_buf(),
                file,
                direct,
                len,
            },
            overlay: None,
            capacity: len,
            read_only: opts.read_only,
            lock: probe,
        });
    };
    let geometry = Geometry::new(&header).map_err(format_err)?;
    let len = len_of(&probe, path)?;
    geometry.check_file_len(len).map_err(format_err)?;

    let named = opts
        .backing
        .clone()
        .unwrap_or_else(|| header.backing_file.clone());
    let (backing_path, backing_file, backing_direct) = open_backing(path, &header, &named, opts)?;
    let backing_len = len_of(&backing_file, &backing_path)?;

    let mut bitmap = super::bitmap_buffer(path, geometry.bitmap_len)?;
    let got = read_full_at(&probe, &mut bitmap, geometry.bitmap_offset).map_err(|source| {
        ImageError::Io {
            path: path.to_path_buf(),
            op: "cannot read the bitmap",
            source,
        }
    })?;
    if got < bitmap.len() {
        return Err(format_err(ubd_cow::CowError::FileTooShort {
            len,
            data_offset: geometry.data_offset,
        }));
    }
    // Direct I/O on the overlay only where bitmap and data pages are apart.
    let (main, direct) = if header.alignment >= 4096 {
        open_file(path, write, opts.cache)?
    } else {
        open_file(path, write, Cache::Writeback)?
    };
    if write {
        // Give the bitmap its blocks now (they read as zeros, as the holes
        // did): a FLUSH then never needs new space on a full file system,
        // nor the file system's metadata for it on first touch. A file
        // system that cannot allocate ahead simply keeps the holes.
        let _ = nix::fcntl::fallocate(
            &probe,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            geometry.bitmap_offset as i64,
            geometry.bitmap_len.max(1) as i64,
        );
    }
    let capacity = geometry.capacity();
    // The probe descriptor holds the OFD lock: it stays open for as long as
    // the image is, as the bitmap writer.
    let probe = Arc::new(probe);
    Ok(OpenImage {
        main: ImageFile {
            path: path.to_path_buf(),
            file: Arc::new(main),
            direct,
            len,
        },
        overlay: Some(Overlay {
            header,
            geometry,
            bitmap,
            meta: probe.clone(),
            backing: ImageFile {
                path: backing_path,
                file: Arc::new(backing_file),
                direct: backing_direct,
                len: backing_len,
            },
        }),
        capacity,
        read_only: opts.read_only,
        lock: probe,
    })
}
