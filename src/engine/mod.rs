//! All of `ubd`'s `unsafe`: the io_uring ring and its op table, the buffer pool
//! (mempool), the ticket sequencer, the fork of `serve --fork`, and one
//! socket ioctl. Every
//! unsafe block says which invariant of the design (docs/design.md) it relies
//! on and who upholds it.

pub mod aligned;
pub mod alloc_count;
pub mod bufpool;
pub mod bufset;
pub mod daemon;
pub mod dio;
pub mod inherit;
pub mod record;
pub mod ring;
pub mod sendbuf;
pub mod sequencer;
pub mod sockq;
