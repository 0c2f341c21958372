//! The NBD wire codec: pure functions between bytes and protocol values.
//!
//! No sockets, threads or device here. Decoders take byte slices the caller
//! has read off the wire (whole headers, or an option's whole data) and
//! return typed values or typed errors; they never panic and never allocate
//! from a length the peer chose. Encoders append to a caller-provided
//! `Vec<u8>` and allocate nothing when it has the capacity.
//!
//! - [`consts`]: every protocol number (magics, flags, option, reply, info,
//!   command and chunk types).
//! - [`errno`]: the errno values NBD sends and the host mapping.
//! - [`option`]: client flags, option headers (capped at
//!   [`MAX_OPTION_LEN`]) and each option's data.
//! - [`client`]: whole options in the client's direction (tests, seeds).
//! - [`option_reply`]: the greeting and the server's option replies.
//! - [`request`]: compact and extended transmission requests.
//! - [`reply`]: simple replies and structured / extended chunks.
//!
//! The handshake and transmission state machines, which decide *which*
//! message to send, live above this module.

pub mod client;
pub mod consts;
pub mod errno;
pub mod option;
pub mod option_reply;
pub mod reply;
pub mod request;
mod wire;

#[cfg(test)]
mod proptests;

pub use consts::*;
pub use option::{
    ClientOption, InfoRequest, InfoRequests, MAX_OPTION_LEN, MetaContextRequest, OPTION_HEADER_LEN,
    OptionError, OptionHeader, OptionHeaderError, Queries, decode_client_flags, parse_option,
};
pub use option_reply::EncodeError;
pub use reply::{ChunkHead, ChunkStyle, Extent, ReplyError};
pub use request::{EXTENDED_REQUEST_LEN, REQUEST_LEN, Request, RequestError};
pub use wire::MAX_STRING_LEN;
