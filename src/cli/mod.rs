//! The `ubd` command line: one module per verb.

pub mod bench;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod demo;
pub mod info;
pub mod map;
pub mod progress;
pub mod rebase;
pub mod serve;
pub mod units;

use std::path::{Path, PathBuf};

use clap::ValueEnum;

/// How a verb reports: for people or for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    #[default]
    Human,
    Json,
}

/// What a verb returns: its exit code, or an error that becomes one line on
/// stderr and exit code 1.
pub type Outcome = Result<u8, Box<dyn std::error::Error>>;

/// `--backing-dir DIR`, for every verb that reads an overlay's backing file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BackingDir {
    /// Read a backing file only if its fully resolved path (symlinks and
    /// `..` resolved) is inside DIR: the one an overlay names and --backing
    /// alike. For overlays from someone else.
    #[arg(long = "backing-dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl BackingDir {
    pub fn get(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// An error opening a device for a verb that takes `--pool-size`: one
/// about its buffer pool names the option.
pub fn pool_size_error(
    e: ubd::device::DeviceError,
    pool_size: usize,
) -> Box<dyn std::error::Error> {
    match e {
        ubd::device::DeviceError::Pool(p) => format!(
            "--pool-size {}: {}",
            units::format_size(pool_size as u64),
            ubd::error_chain(&p)
        )
        .into(),
        e => e.into(),
    }
}

/// `--pool-size`: a size of at least one buffer chunk, the smallest pool a
/// device runs on.
pub fn parse_pool_size(text: &str) -> Result<u64, String> {
    let size = units::parse_size(text)?;
    let min = ubd::device::DeviceOptions::default().chunk_bytes() as u64;
    if size < min {
        return Err(format!(
            "a pool is at least {} (one buffer chunk)",
            units::format_size(min)
        ));
    }
    Ok(size)
}

/// Host page cache use, with the names qemu users know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum CacheArg {
    /// Direct I/O (O_DIRECT) where the file system supports it.
    #[default]
    None,
    /// Through the host page cache.
    Writeback,
}

impl CacheArg {
    pub fn mode(self) -> ubd::image::Cache {
        match self {
            CacheArg::None => ubd::image::Cache::None,
            CacheArg::Writeback => ubd::image::Cache::Writeback,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CacheArg::None => "none",
            CacheArg::Writeback => "writeback",
        }
    }
}
