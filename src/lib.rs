//! `ubd`: a user-mode block driver. A virtual disk made of a read-only backing
//! image and a copy-on-write overlay in User-Mode Linux's COW format.
//!
//! Modules: [`image`] handles image files on disk (probing, headers, locks,
//! creation). The on-disk format itself lives in the `ubd-cow` crate.

pub mod device;
pub mod engine;
pub mod image;
pub mod nbd;

/// An error and its sources as one line: `outer: inner: innermost`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        line.push_str(": ");
        line.push_str(&e.to_string());
        source = e.source();
    }
    line
}
