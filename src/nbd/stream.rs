//! A client's connection (Unix or TCP socket) and the buffered reader the
//! handshake and the transmission phase share.
//!
//! [`Input`] reads the socket in large pieces, so that a client that pipelines
//! requests costs one `recv` for many headers; a payload larger than what is
//! buffered is read straight into its destination (a pool buffer), not
//! through the buffer.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// One accepted connection.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// A second handle on the same socket (for the reply writer).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        match self {
            Stream::Unix(s) => s.read_timeout(),
            Stream::Tcp(s) => s.read_timeout(),
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Who is on the other end, for logs.
    pub fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix".to_string(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp".to_string(), |a| a.to_string()),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes read from the socket per `recv`, at most.
const INPUT_BUF: usize = 64 * 1024;

/// What a read found instead of the bytes it wanted.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection before the first byte.
    Closed,
    /// The connection ended after `got` of the `want` bytes.
    Truncated {
        got: usize,
        want: usize,
    },
    Io(io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Closed => write!(f, "the client closed the connection"),
            ReadError::Truncated { got, want } => {
                write!(f, "the connection ended after {got} of {want} bytes")
            }
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A buffered reader over a connection.
pub struct Input {
    stream: Stream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The thread between the client and `stream`, after a TLS upgrade.
    bridge: Option<std::thread::JoinHandle<()>>,
}

impl Input {
    pub fn new(stream: Stream) -> Input {
        Input {
            stream,
            buf: vec![0; INPUT_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            bridge: None,
        }
    }

    /// Bytes read from the socket and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The connection (to write the handshake's replies, or to clone).
    pub fn stream(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// The bytes read from the socket and not yet consumed; the buffer is
    /// empty afterwards.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf[self.start..self.end].to_vec();
        self.start = 0;
        self.end = 0;
        rest
    }

    /// Reads from `stream` from now on: the plaintext end of a TLS
    /// upgrade, which `bridge` feeds. The old connection is closed unless a
    /// clone of it lives on.
    pub fn replace_stream(&mut self, stream: Stream, bridge: std::thread::JoinHandle<()>) {
        self.start = 0;
        self.end = 0;
        self.stream = stream;
        self.bridge = Some(bridge);
    }

    /// Whether the connection went over to TLS (a bridge feeds `stream`).
    pub fn is_tls(&self) -> bool {
        self.bridge.is_some()
    }

    /// The socket, the bytes read from it and not yet consumed, and the
    /// TLS bridge behind it (to be joined once the socket is closed).
    pub fn into_parts(mut self) -> (OwnedFd, Vec<u8>, Option<std::thread::JoinHandle<()>>) {
        let rest = self.take_buffered();
        let bridge = self.bridge.take();
        let fd = match self.stream {
            Stream::Unix(s) => OwnedFd::from(s),
            Stream::Tcp(s) => OwnedFd::from(s),
        };
        (fd, rest, bridge)
    }

    /// Closes the connection and waits for its TLS bridge, if any, to end.
    pub fn close(self) {
        let (fd, _, bridge) = self.into_parts();
        drop(fd);
        if let Some(bridge) = bridge {
            let _ = bridge.join();
        }
    }

    fn recv(stream: &mut Stream, dst: &mut [u8]) -> io::Result<usize> {
        loop {
            match stream.read(dst) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Fills `dst` completely: first from the buffer, then from the socket
    /// (straight into `dst` when the rest is large).
    pub fn read_exact(&mut self, dst: &mut [u8]) -> Result<(), ReadError> {
        self.read_exact_counted(dst, 0, dst.len())
    }

    /// `read_exact` for part of a larger message: `before` bytes of `total`
    /// were read already (for the error's numbers).
    pub fn read_exact_counted(
        &mut self,
        dst: &mut [u8],
        before: usize,
        total: usize,
    ) -> Result<(), ReadError> {
        let mut done = 0;
        while done < dst.len() {
            if self.start < self.end {
                let n = (self.end - self.start).min(dst.len() - done);
                dst[done..done + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                done += n;
                continue;
            }
            let rest = dst.len() - done;
            let n = if rest >= INPUT_BUF / 2 {
                Self::recv(&mut self.stream, &mut dst[done..]).map_err(ReadError::Io)?
            } else {
                self.start = 0;
                self.end = 0;
                let got = Self::recv(&mut self.stream, &mut self.buf).map_err(ReadError::Io)?;
                self.end = got;
                if got > 0 {
                    continue;
                }
                0
            };
            if n == 0 {
                let got = before + done;
                return Err(if got == 0 {
                    ReadError::Closed
                } else {
                    ReadError::Truncated { got, want: total }
                });
            }
            done += n;
        }
        Ok(())
    }

    /// Reads and drops `n` bytes.
    pub fn skip(&mut self, n: u64) -> Result<(), ReadError> {
        let mut scratch = [0u8; 4096];
        let mut left = n;
        while left > 0 {
            let take = left.min(scratch.len() as u64) as usize;
            let before = (n - left) as usize;
            self.read_exact_counted(&mut scratch[..take], before.max(1), n as usize)?;
            left -= take as u64;
        }
        Ok(())
    }
}
