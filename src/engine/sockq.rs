//! What a stream socket holds that its peer has not read yet.

use std::io;
use std::os::fd::RawFd;

/// Bytes written to the stream socket `fd` that the peer has not read yet
/// (`SIOCOUTQ`; for TCP, those not yet acknowledged).
pub fn unread_output(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one c_int through its argument,
    // which points at `n`, alive for the call. An fd that is not an open
    // socket only makes the call fail (EBADF, ENOTTY); no memory is touched
    // through it.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn counts_what_the_peer_has_not_read() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        assert_eq!(unread_output(a.as_raw_fd()).unwrap(), 0);
        a.write_all(&[7u8; 1000]).unwrap();
        assert!(unread_output(a.as_raw_fd()).unwrap() >= 1000);
        let mut got = [0u8; 1000];
        b.read_exact(&mut got).unwrap();
        assert_eq!(unread_output(a.as_raw_fd()).unwrap(), 0);
        assert!(unread_output(-1).is_err());
    }
}
