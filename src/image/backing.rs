//! The backing file of an overlay: resolving its path as UML does, and checking
//! that the file on disk is still the one the overlay was made over.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use ubd_cow::Header;

use super::ImageError;

/// An absolute form of `path` with its directories resolved (symlinks in them
/// followed, `.` and `..` gone) and its final name kept, as `uml_mkcow` and the
/// UML kernel store backing paths.
pub fn resolve(path: &Path) -> Result<PathBuf, ImageError> {
    let io_err = |source| ImageError::Io {
        path: path.to_path_buf(),
        op: "cannot resolve the path",
        source,
    };
    match path.file_name() {
        // Ends in `..` or `/`, or is `.`: no final name to keep.
        None => fs::canonicalize(path).map_err(io_err),
        Some(name) if path.components().next_back() == Some(Component::Normal(name)) => {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            Ok(fs::canonicalize(parent).map_err(io_err)?.join(name))
        }
        Some(_) => fs::canonicalize(path).map_err(io_err),
    }
}

/// The size of an open regular file or block device (where its end is).
pub(crate) fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        return f.seek(SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// Size and whole-second mtime of a backing file, as the COW header records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stamp {
    pub size: u64,
    pub mtime: i64,
}

/// Reads the size and mtime of `path`. Follows symlinks, as UML does. A block
/// device's size is where its end is.
pub fn stamp(path: &Path) -> Result<Stamp, ImageError> {
    let io_err = |op, source| ImageError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let meta = fs::metadata(path).map_err(|e| io_err("cannot stat", e))?;
    let file_type = meta.file_type();
    let size = if file_type.is_file() {
        meta.len()
    } else if file_type.is_block_device() {
        File::open(path)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .map_err(|e| io_err("cannot read the size of", e))?
    } else {
        return Err(io_err(
            "is not a regular file or block device",
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    };
    Ok(Stamp {
        size,
        mtime: meta.mtime(),
    })
}

/// How the backing file on disk compares with what the header recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingState {
    /// Size and mtime match: the pair can be used.
    Matches,
    /// The file cannot be opened or examined.
    Unreadable(String),
    /// The size differs.
    SizeDiffers { on_disk: u64 },
    /// The size matches but the mtime differs (the file was modified or touched).
    MtimeDiffers { on_disk: i64 },
}

impl BackingState {
    /// Compares the file at `path` with the header's record.
    pub fn of(header: &Header, path: &Path) -> BackingState {
        match stamp(path) {
            Err(e) => BackingState::Unreadable(crate::error_chain(&e)),
            Ok(s) if s.size != header.size => BackingState::SizeDiffers { on_disk: s.size },
            Ok(s) if s.mtime != i64::from(header.mtime) => {
                BackingState::MtimeDiffers { on_disk: s.mtime }
            }
            Ok(_) => BackingState::Matches,
        }
    }

    /// One line saying what is wrong, or `None` when the file matches.
    pub fn problem(&self, header: &Header, path: &Path) -> Option<String> {
        let path = path.display();
        match self {
            BackingState::Matches => None,
            BackingState::Unreadable(why) => Some(format!("backing file {why}")),
            BackingState::SizeDiffers { on_disk } => Some(format!(
                "backing file {path} is {on_disk} bytes, but the overlay was made for {} bytes",
                header.size
            )),
            BackingState::MtimeDiffers { on_disk } => Some(format!(
                "backing file {path} has mtime {on_disk}, but the overlay was made for mtime {} \
                 (the file was modified or touched since)",
                header.mtime
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_keeps_the_final_name_and_resolves_directories() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::write(real.join("base.img"), b"x").unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink("base.img", real.join("alias.img")).unwrap();
        let canon = fs::canonicalize(&real).unwrap();
        assert_eq!(
            resolve(&dir.path().join("link/../link/alias.img")).unwrap(),
            canon.join("alias.img")
        );
        assert_eq!(
            resolve(&dir.path().join("link/./base.img")).unwrap(),
            canon.join("base.img")
        );
    }
}
