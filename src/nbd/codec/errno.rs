//! The errno values NBD puts on the wire, and the mapping from host errors.
//!
//! NBD fixes its own numbers (the Linux ones); a reply never carries a raw
//! host errno. [`from_host`] folds every host error into one of these.

/// Operation not permitted (writes to a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error; also every host error with no better match.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid request (bad command, flag, or range).
pub const EINVAL: u32 = 22;
/// No space left (writes past the end, quota, file too big).
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported (e.g. `FAST_ZERO` that would be slow).
pub const ENOTSUP: u32 = 95;
/// The server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The NBD errno for a host errno: `EDQUOT` and `EFBIG` become [`ENOSPC`],
/// `EROFS` and `EACCES` become [`EPERM`], `EOPNOTSUPP` becomes [`ENOTSUP`],
/// and anything unknown (including 0 and negative values) becomes [`EIO`].
pub fn from_host(host: i32) -> u32 {
    match host {
        libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// The NBD errno for a host I/O error: its raw errno through [`from_host`],
/// or [`EIO`] when it has none.
pub fn from_io_error(err: &std::io::Error) -> u32 {
    err.raw_os_error().map_or(EIO, from_host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_are_the_protocol_ones() {
        assert_eq!(
            [
                EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN
            ],
            [1, 5, 12, 22, 28, 75, 95, 108]
        );
    }

    #[test]
    fn host_errors_map() {
        assert_eq!(from_host(libc::EDQUOT), ENOSPC);
        assert_eq!(from_host(libc::EFBIG), ENOSPC);
        assert_eq!(from_host(libc::ENOSPC), ENOSPC);
        assert_eq!(from_host(libc::EROFS), EPERM);
        assert_eq!(from_host(libc::EIO), EIO);
        assert_eq!(from_host(libc::EINVAL), EINVAL);
        assert_eq!(from_host(libc::ESHUTDOWN), ESHUTDOWN);
        assert_eq!(from_host(libc::EOPNOTSUPP), ENOTSUP);
        assert_eq!(from_host(libc::ENOENT), EIO);
        assert_eq!(from_host(0), EIO);
        assert_eq!(from_host(-1), EIO);
        assert_eq!(from_host(i32::MAX), EIO);
        let err = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert_eq!(from_io_error(&err), ENOSPC);
        let err = std::io::Error::other("no errno");
        assert_eq!(from_io_error(&err), EIO);
    }
}
