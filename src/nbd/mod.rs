//! NBD, the Network Block Device protocol, as `ubd serve` speaks it.
//!
//! The reference is `doc/proto.md` of the NetworkBlockDevice/nbd project; the
//! checklist of what we owe a client is `docs/nbd.md`. The layers, bottom up:
//!
//! - [`codec`]: the wire format only. Pure functions over byte slices and
//!   caller-provided `Vec<u8>`s: no sockets, no threads, no device, never a
//!   panic on any input. Everything above it reads whole headers off the wire
//!   and hands the bytes here.
//!
//! Nothing below this module knows NBD exists (see `docs/design.md`).

pub mod codec;
