//! What a server offers: named exports, each a [`Device`], with the
//! transmission flags, block sizes and metadata contexts NBD clients see.

use std::sync::Arc;

use crate::device::Device;

use super::codec::flag as tflag;

/// The smallest I/O a client may send: any byte offset and length works.
pub const MIN_BLOCK: u32 = 1;
/// The size clients should use for good speed (the page size).
pub const PREFERRED_BLOCK: u32 = 4096;
/// The largest READ or WRITE payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Context id of `base:allocation` (holes and zeros).
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Context id of `qemu:allocation-depth` (which layer holds the data).
pub const ALLOCATION_DEPTH_ID: u32 = 2;
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// One export: a name clients ask for and the device behind it.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<Device>,
}

impl Export {
    /// The transmission flags of this export; `structured` says whether the
    /// client negotiated structured replies (which `SEND_DF` needs).
    pub fn flags(&self, structured: bool) -> u16 {
        let mut flags =
            tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::CAN_MULTI_CONN | tflag::SEND_CACHE;
        if self.device.read_only() {
            flags |= tflag::READ_ONLY;
        } else {
            flags |= tflag::SEND_FUA
                | tflag::SEND_TRIM
                | tflag::SEND_WRITE_ZEROES
                | tflag::SEND_FAST_ZERO;
        }
        if structured {
            flags |= tflag::SEND_DF;
        }
        flags
    }

    pub fn size(&self) -> u64 {
        self.device.capacity()
    }
}

/// The exports of one server; the empty name reaches the first.
#[derive(Debug, Clone)]
pub struct Exports(Arc<Vec<Arc<Export>>>);

impl Exports {
    /// `exports` must not be empty.
    pub fn new(exports: Vec<Arc<Export>>) -> Exports {
        Exports(Arc::new(exports))
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.0.first();
        }
        self.0.iter().find(|e| e.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.0.iter()
    }
}

/// The metadata contexts a connection selected for BLOCK_STATUS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contexts {
    pub allocation: bool,
    pub depth: bool,
}

impl Contexts {
    pub fn any(&self) -> bool {
        self.allocation || self.depth
    }

    /// The contexts a query names: exact names, or (when `wildcards`, as
    /// `LIST_META_CONTEXT` allows) a bare namespace. Unknown ones select none.
    pub fn matching(query: &str, wildcards: bool) -> Contexts {
        match query {
            BASE_ALLOCATION => Contexts {
                allocation: true,
                depth: false,
            },
            ALLOCATION_DEPTH => Contexts {
                allocation: false,
                depth: true,
            },
            "base:" if wildcards => Contexts {
                allocation: true,
                depth: false,
            },
            "qemu:" if wildcards => Contexts {
                allocation: false,
                depth: true,
            },
            _ => Contexts::default(),
        }
    }

    pub fn union(self, other: Contexts) -> Contexts {
        Contexts {
            allocation: self.allocation || other.allocation,
            depth: self.depth || other.depth,
        }
    }

    /// `(id, name)` of each selected context, in id order.
    pub fn list(self) -> impl Iterator<Item = (u32, &'static str)> {
        [
            (self.allocation, BASE_ALLOCATION_ID, BASE_ALLOCATION),
            (self.depth, ALLOCATION_DEPTH_ID, ALLOCATION_DEPTH),
        ]
        .into_iter()
        .filter(|(on, _, _)| *on)
        .map(|(_, id, name)| (id, name))
    }
}
