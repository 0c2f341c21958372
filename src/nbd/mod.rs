//! NBD, the Network Block Device protocol, as `ubd serve` speaks it.
//!
//! The reference is `doc/proto.md` of the NetworkBlockDevice/nbd project; the
//! checklist of what we owe a client is `docs/nbd.md`. The layers, bottom up:
//!
//! - [`codec`]: the wire format only. Pure functions over byte slices and
//!   caller-provided `Vec<u8>`s: no sockets, no threads, no device, never a
//!   panic on any input. Everything above it reads whole headers off the wire
//!   and hands the bytes here.
//! - [`stream`]: a client's socket and the buffered reader over it.
//! - [`export`]: what is offered: named exports (each a device), their flags,
//!   block sizes and metadata contexts.
//! - [`handshake`]: the fixed-newstyle option haggling.
//! - [`transmission`] and [`replies`]: one connection's requests and their
//!   replies, run on the device's worker thread as a `device::Protocol`: the
//!   worker moves the socket's bytes through its io_uring ring with the disk
//!   I/O, and this module says what they mean.
//! - [`tls`]: `STARTTLS`: a bridge thread runs the TLS session and passes
//!   the plaintext through a socket pair, over which the handshake and the
//!   transmission phase go on unchanged.
//!   [`x509`] reads a certificate's validity, for the warning at start
//!   about one that clients will refuse.
//! - [`server`]: listeners, a thread per connection for the handshake (which
//!   then waits for the connection's end), and shutdown.
//! - [`uri`]: the NBD URIs printed for the exports.
//!
//! Nothing below this module knows NBD exists (see `docs/design.md`).

pub mod codec;
pub mod export;
pub mod handshake;
pub mod replies;
pub mod server;
pub mod stream;
pub mod tls;
pub mod transmission;
pub mod uri;
pub mod x509;
