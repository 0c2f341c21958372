//! Making new images: an empty overlay over a backing file, or a sparse raw image.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use ubd_cow::{Geometry, Header};

use super::{ImageError, LockKind, backing, lock};

/// Opens `path` for a new image. Without `force` the file must not exist. With
/// `force` an existing file is locked (so an overlay in use is never clobbered),
/// checked not to be `backing`, and truncated to nothing before anything is
/// written. Returns the file and whether it was newly made.
fn open_target(
    path: &Path,
    force: bool,
    backing: Option<&Path>,
) -> Result<(File, bool), ImageError> {
    let io_err = |op, source| ImageError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => return Ok((file, true)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if !force {
                return Err(ImageError::Exists {
                    path: path.to_path_buf(),
                });
            }
        }
        Err(e) => return Err(io_err("cannot create", e)),
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err("cannot open", e))?;
    if let Some(backing) = backing {
        let ours = file.metadata().map_err(|e| io_err("cannot stat", e))?;
        if let Ok(theirs) = fs::metadata(backing)
            && (ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino())
        {
            return Err(ImageError::SameFile {
                cow: path.to_path_buf(),
                backing: backing.to_path_buf(),
            });
        }
    }
    // Briefly retried: a process that just closed an io_uring ring over the
    // file releases its lock a little later.
    lock(&file, path, LockKind::Exclusive, Duration::from_millis(500))?;
    file.set_len(0).map_err(|e| io_err("cannot truncate", e))?;
    Ok((file, false))
}

/// Runs `fill` on a freshly opened target and removes the file again if a new
/// one was made and filling it failed.
fn fill_target(
    path: &Path,
    force: bool,
    backing: Option<&Path>,
    fill: impl FnOnce(&File) -> io::Result<()>,
) -> Result<(), ImageError> {
    let (file, created) = open_target(path, force, backing)?;
    fill(&file).map_err(|source| {
        if created {
            let _ = fs::remove_file(path);
        }
        ImageError::Io {
            path: path.to_path_buf(),
            op: "cannot write",
            source,
        }
    })
}

/// Creates an empty v3 overlay at `cow` over `backing`: the header, an all-zero
/// bitmap and a sparse data area, `data_offset + size` bytes in all, synced.
pub fn create_overlay(cow: &Path, backing: &Path, force: bool) -> Result<Header, ImageError> {
    let resolved = backing::resolve(backing)?;
    // Only a regular file can be a backing file.
    backing::vet(cow, backing, None)?;
    if let Ok(file) = File::open(&resolved) {
        super::warn_if_container(&file, &resolved, Some(cow));
    }
    let stamp = backing::stamp(&resolved)?;
    let mtime = u32::try_from(stamp.mtime).map_err(|_| ImageError::MtimeOutOfRange {
        path: resolved.clone(),
        mtime: stamp.mtime,
    })?;
    let format_err = |source| ImageError::Format {
        path: resolved.clone(),
        source,
    };
    let header = Header::new_v3(&resolved, stamp.size, mtime).map_err(format_err)?;
    let bytes = header.encode().map_err(format_err)?;
    let len = Geometry::new(&header).map_err(format_err)?.full_len();
    fill_target(cow, force, Some(&resolved), |file| {
        file.write_all_at(&bytes, 0)?;
        file.set_len(len)?;
        file.sync_all()
    })?;
    Ok(header)
}

/// Creates a sparse raw image of `size` bytes at `path`, synced.
pub fn create_raw(path: &Path, size: u64, force: bool) -> Result<(), ImageError> {
    fill_target(path, force, None, |file| {
        file.set_len(size)?;
        file.sync_all()
    })
}
