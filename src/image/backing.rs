//! The backing file of an overlay: resolving its path as UML does, checking
//! that the file on disk is still the one the overlay was made over, and the
//! trust boundary every reader of a backing file goes through.
//!
//! An overlay from someone else can name any path. Before a backing file is
//! read, [`vet`] resolves the name fully (symlinks and `..`), refuses anything
//! but a regular file (a device node, a FIFO or a socket named by a lying
//! header), and with a backing directory, anything whose resolved path is not
//! inside it. [`open_vetted`] then opens the resolved path without following a
//! final symlink and without blocking on a FIFO, and checks the open file
//! again (fstat, and where it really is), so a swap between the check and the
//! open cannot sneak another file in.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use thiserror::Error;
use ubd_cow::Header;

use super::ImageError;

/// Why a backing file is not read. The overlay that names it is in the
/// [`ImageError::BackingRefused`] that carries this.
#[derive(Debug, Error)]
pub enum Refusal {
    /// Not a regular file: a device node, a FIFO, a socket or a directory.
    #[error(
        "backing file {} is a {kind}, not a regular file: refusing to read it",
        shown(named, resolved)
    )]
    NotRegular {
        named: PathBuf,
        resolved: PathBuf,
        kind: &'static str,
    },
    /// The overlay names itself (or a hard link to itself) as its backing file.
    #[error(
        "backing file {} is the overlay itself: refusing to read it",
        shown(named, resolved)
    )]
    IsOverlay { named: PathBuf, resolved: PathBuf },
    /// The resolved path is not inside the backing directory.
    #[error(
        "backing file {} is outside the backing directory {} (--backing-dir): refusing to read it",
        shown(named, resolved), dir.display()
    )]
    OutsideDir {
        named: PathBuf,
        resolved: PathBuf,
        dir: PathBuf,
    },
}

/// `named`, and where it resolves to when that differs.
fn shown(named: &Path, resolved: &Path) -> String {
    if named == resolved {
        named.display().to_string()
    } else {
        format!("{} (resolves to {})", named.display(), resolved.display())
    }
}

/// What a file of this type is called in messages.
pub(super) fn kind_of(file_type: fs::FileType) -> &'static str {
    if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// The backing directory, canonicalized.
fn canonical_dir(dir: &Path) -> Result<PathBuf, ImageError> {
    fs::canonicalize(dir).map_err(|source| ImageError::Io {
        path: dir.to_path_buf(),
        op: "cannot resolve the backing directory",
        source,
    })
}

/// The file `named` (the backing file of `overlay`) resolves to, with every
/// symlink and `..` resolved, once it has passed the trust checks: it is a
/// regular file and, with `dir`, lies inside `dir` (itself canonicalized).
/// A name that does not resolve (a missing file) is an [`ImageError::Io`]
/// naming it; the checks fail with [`ImageError::BackingRefused`].
pub fn vet(overlay: &Path, named: &Path, dir: Option<&Path>) -> Result<PathBuf, ImageError> {
    let dir = dir.map(canonical_dir).transpose()?;
    vet_in(overlay, named, dir.as_deref())
}

/// [`vet`] with `dir` canonicalized already. Errors other than refusals are
/// about `named`.
fn vet_in(overlay: &Path, named: &Path, dir: Option<&Path>) -> Result<PathBuf, ImageError> {
    let resolved = fs::canonicalize(named).map_err(|source| ImageError::Io {
        path: named.to_path_buf(),
        op: "cannot resolve the path",
        source,
    })?;
    let refuse = |refusal| ImageError::BackingRefused {
        overlay: overlay.to_path_buf(),
        refusal,
    };
    if let Some(dir) = dir
        && !resolved.starts_with(dir)
    {
        return Err(refuse(Refusal::OutsideDir {
            named: named.to_path_buf(),
            resolved,
            dir: dir.to_path_buf(),
        }));
    }
    let meta = fs::metadata(&resolved).map_err(|source| ImageError::Io {
        path: resolved.clone(),
        op: "cannot stat",
        source,
    })?;
    if !meta.is_file() {
        return Err(refuse(Refusal::NotRegular {
            named: named.to_path_buf(),
            kind: kind_of(meta.file_type()),
            resolved,
        }));
    }
    Ok(resolved)
}

/// Opens `resolved`, a path [`vet`] returned for `named`, read-only (or
/// read-write for `write`), with O_DIRECT for `direct`. The final name is not
/// followed if it has become a symlink (O_NOFOLLOW), a FIFO put there cannot
/// make the open hang (O_NONBLOCK, cleared again once the file is known to be
/// regular), and the open file must be a regular file and, with `dir`, still
/// be inside `dir` (where it really is, from /proc/self/fd).
pub fn open_vetted(
    overlay: &Path,
    named: &Path,
    resolved: &Path,
    dir: Option<&Path>,
    write: bool,
    direct: bool,
) -> Result<File, ImageError> {
    let io_err = |op, source| ImageError::Io {
        path: resolved.to_path_buf(),
        op,
        source,
    };
    let refuse = |refusal| ImageError::BackingRefused {
        overlay: overlay.to_path_buf(),
        refusal,
    };
    let mut flags = libc::O_NOFOLLOW;
    if direct {
        flags |= libc::O_DIRECT;
    }
    let file =
        super::open_nonblocking(resolved, write, flags).map_err(|e| io_err("cannot open", e))?;
    let meta = file.metadata().map_err(|e| io_err("cannot stat", e))?;
    if !meta.is_file() {
        return Err(refuse(Refusal::NotRegular {
            named: named.to_path_buf(),
            resolved: resolved.to_path_buf(),
            kind: kind_of(meta.file_type()),
        }));
    }
    super::blocking_again(&file).map_err(|e| io_err("cannot set the file status flags of", e))?;
    if let Some(dir) = dir {
        let dir = canonical_dir(dir)?;
        let at = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| io_err("cannot tell where the open file is", e))?;
        if !at.starts_with(&dir) {
            return Err(refuse(Refusal::OutsideDir {
                named: named.to_path_buf(),
                resolved: at,
                dir,
            }));
        }
    }
    Ok(file)
}

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

/// Whether `a` and `b` are one file (symlinks followed, hard links alike;
/// false when either cannot be looked at).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// The backing file an overlay names, what it resolves to, and how it
/// compares with the header's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Examined {
    /// The path as named: the header's, or the one given instead.
    pub named: PathBuf,
    /// The file that would be read, fully resolved; `None` when the name
    /// does not resolve (the file is missing).
    pub resolved: Option<PathBuf>,
    pub state: BackingState,
}

/// Examines `named`, the backing file of the overlay at `overlay` with
/// `header`, under the trust checks of [`vet`]: a refused file is an error; a
/// missing or unreadable one, or one whose size or mtime differ, is a
/// [`BackingState`] to report.
pub fn examine(
    overlay: &Path,
    header: &Header,
    named: &Path,
    dir: Option<&Path>,
) -> Result<Examined, ImageError> {
    let dir = dir.map(canonical_dir).transpose()?;
    let (resolved, state) = match vet_in(overlay, named, dir.as_deref()) {
        Ok(resolved) => {
            if same_file(overlay, &resolved) {
                return Err(ImageError::BackingRefused {
                    overlay: overlay.to_path_buf(),
                    refusal: Refusal::IsOverlay {
                        named: named.to_path_buf(),
                        resolved,
                    },
                });
            }
            let mut state = BackingState::of(header, &resolved);
            // A file that matches is no use if it cannot be read (no read
            // permission): say so now, not when a reader opens it.
            if state == BackingState::Matches {
                match open_vetted(overlay, named, &resolved, dir.as_deref(), false, false) {
                    Ok(_) => {}
                    Err(e @ ImageError::Io { .. }) => {
                        state = BackingState::Unreadable(crate::error_chain(&e));
                    }
                    Err(e) => return Err(e),
                }
            }
            (Some(resolved), state)
        }
        Err(ImageError::Io { path, op, source }) => {
            let why = format!("{}: {op}: {source}", path.display());
            (None, BackingState::Unreadable(why))
        }
        Err(e) => return Err(e),
    };
    Ok(Examined {
        named: named.to_path_buf(),
        resolved,
        state,
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
            Ok(s) => BackingState::compare(header, s),
        }
    }

    /// Compares a file's size and mtime with the header's record.
    pub fn compare(header: &Header, on_disk: Stamp) -> BackingState {
        if on_disk.size != header.size {
            BackingState::SizeDiffers {
                on_disk: on_disk.size,
            }
        } else if on_disk.mtime != i64::from(header.mtime) {
            BackingState::MtimeDiffers {
                on_disk: on_disk.mtime,
            }
        } else {
            BackingState::Matches
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

    fn refusal(e: ImageError) -> Refusal {
        match e {
            ImageError::BackingRefused { refusal, .. } => refusal,
            e => panic!("not a refusal: {}", crate::error_chain(&e)),
        }
    }

    /// What was checked is what is opened: a symlink, a FIFO or a directory
    /// swapped in after [`vet`] is refused by [`open_vetted`], which never
    /// hangs on the FIFO.
    #[test]
    fn a_file_swapped_in_after_the_check_is_refused_at_open() {
        let ov = Path::new("ov.cow");
        let dir = tempfile::tempdir().unwrap();
        let trusted = dir.path().join("trusted");
        let outside = dir.path().join("outside");
        fs::create_dir_all(trusted.join("sub")).unwrap();
        fs::create_dir(&outside).unwrap();
        let base = trusted.join("sub/base.img");
        fs::write(&base, b"data").unwrap();
        fs::write(outside.join("base.img"), b"secret").unwrap();
        let resolved = vet(ov, &base, Some(&trusted)).unwrap();
        assert_eq!(resolved, fs::canonicalize(&base).unwrap());
        let open = || open_vetted(ov, &base, &resolved, Some(&trusted), false, false);
        let file = open().unwrap();
        let mut text = String::new();
        io::Read::read_to_string(&mut &file, &mut text).unwrap();
        assert_eq!(text, "data");
        // Opened without blocking, but left blocking for io_uring.
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_NONBLOCK, 0);

        // A directory on the way becomes a symlink out of the trusted one.
        fs::rename(trusted.join("sub"), trusted.join("old")).unwrap();
        std::os::unix::fs::symlink(&outside, trusted.join("sub")).unwrap();
        match refusal(open().unwrap_err()) {
            Refusal::OutsideDir { resolved, .. } => {
                assert_eq!(
                    resolved,
                    fs::canonicalize(outside.join("base.img")).unwrap()
                );
            }
            r => panic!("{r}"),
        }
        fs::remove_file(trusted.join("sub")).unwrap();
        fs::rename(trusted.join("old"), trusted.join("sub")).unwrap();

        // The file becomes a symlink to a device: not followed.
        fs::remove_file(&base).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &base).unwrap();
        let e = open().unwrap_err();
        assert!(
            matches!(&e, ImageError::Io { op: "cannot open", source, .. }
                if source.raw_os_error() == Some(libc::ELOOP)),
            "{}",
            crate::error_chain(&e)
        );

        // The file becomes a FIFO with no writer: the open returns at once.
        fs::remove_file(&base).unwrap();
        nix::unistd::mkfifo(&base, nix::sys::stat::Mode::S_IRWXU).unwrap();
        match refusal(open().unwrap_err()) {
            Refusal::NotRegular { kind, .. } => assert_eq!(kind, "FIFO"),
            r => panic!("{r}"),
        }
    }

    #[test]
    fn vet_resolves_fully_and_checks_the_directory() {
        let ov = Path::new("ov.cow");
        let dir = tempfile::tempdir().unwrap();
        let trusted = dir.path().join("trusted");
        fs::create_dir(&trusted).unwrap();
        fs::write(dir.path().join("base.img"), b"x").unwrap();
        fs::write(trusted.join("in.img"), b"x").unwrap();
        std::os::unix::fs::symlink("in.img", trusted.join("alias.img")).unwrap();
        std::os::unix::fs::symlink("../base.img", trusted.join("escape.img")).unwrap();
        let canon = fs::canonicalize(&trusted).unwrap();
        assert_eq!(
            vet(ov, &trusted.join("alias.img"), Some(&trusted)).unwrap(),
            canon.join("in.img")
        );
        for named in [
            trusted.join("escape.img"),
            trusted.join("../base.img"),
            dir.path().join("base.img"),
        ] {
            match refusal(vet(ov, &named, Some(&trusted)).unwrap_err()) {
                Refusal::OutsideDir { resolved, dir, .. } => {
                    assert_eq!(resolved, canon.parent().unwrap().join("base.img"));
                    assert_eq!(dir, canon);
                }
                r => panic!("{r}"),
            }
        }
        // Without a directory, only the file's type counts.
        assert!(vet(ov, &trusted.join("escape.img"), None).is_ok());
        // A missing directory is an error naming it.
        let e = vet(ov, &trusted.join("in.img"), Some(&dir.path().join("nope"))).unwrap_err();
        assert!(
            crate::error_chain(&e).contains("nope: cannot resolve the backing directory"),
            "{}",
            crate::error_chain(&e)
        );
    }
}
