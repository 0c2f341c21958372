//! Writing a new qcow2 image (version 3, 64 KiB clusters, 16-bit refcounts,
//! optionally over a raw backing file), as `ubd convert -O qcow2` does: one
//! pass in order of guest offset, appending each cluster that holds data,
//! then the tables.
//!
//! The file's layout, every cluster in use (refcount 1) and none shared:
//!
//! ```text
//! header | L1 table | L2 table, its data clusters, ... | refcount table | refcount blocks
//! ```
//!
//! An L2 table is kept in memory only while its 512 MiB of guest space is
//! written, so memory stays at one table whatever the image's size. The
//! header goes last: until then the file is not a qcow2 image at all.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::ImageError;

/// log2 of the cluster size.
const CLUSTER_BITS: u32 = 16;
/// Bytes in a cluster.
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Entries in an L2 table (one cluster of u64s).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Entries in a refcount block (one cluster of u16s: refcount_order 4).
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
/// The largest L1 table qemu opens (`QCOW_MAX_L1_SIZE`, 32 MiB).
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// An L1 or L2 entry's flag: the cluster's refcount is exactly 1.
const COPIED: u64 = 1 << 63;
/// An L2 entry's flag: the cluster reads as zeros (whatever the backing
/// file holds there).
const ZERO: u64 = 1;
/// The version 3 header's length, with no optional fields.
const HEADER_LEN: u32 = 104;
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// The longest backing file name qemu reads.
const MAX_BACKING_NAME: usize = 1023;

/// A qcow2 image being written; see the module's description.
pub struct Qcow2Writer<'a> {
    file: &'a File,
    path: PathBuf,
    /// Guest size in bytes, a multiple of 512.
    size: u64,
    /// The raw backing file's name, as the header records it.
    backing: Option<String>,
    l1: Vec<u64>,
    /// The next free cluster of the file.
    next: u64,
    /// The L2 table being filled: its L1 index, its cluster, its entries.
    l2: Option<(u64, u64, Vec<u64>)>,
    /// The last guest cluster written, so that order can be checked.
    last: Option<u64>,
    data_clusters: u64,
}

impl<'a> Qcow2Writer<'a> {
    /// Starts an image of `size` guest bytes (rounded up to a whole sector,
    /// as qemu counts sectors) in `file`, which must be empty; over the raw
    /// image `backing` if given (clusters not written read from it).
    pub fn new(
        file: &'a File,
        path: &Path,
        size: u64,
        backing: Option<&Path>,
    ) -> Result<Self, ImageError> {
        let invalid = |op, why: String| ImageError::Io {
            path: path.to_path_buf(),
            op,
            source: io::Error::new(io::ErrorKind::InvalidInput, why),
        };
        let backing = match backing.map(|b| b.to_str()) {
            None => None,
            Some(Some(name)) if !name.is_empty() && name.len() <= MAX_BACKING_NAME => {
                Some(name.to_string())
            }
            Some(_) => {
                return Err(invalid(
                    "cannot name its backing file",
                    format!("qcow2 backing file names are UTF-8 of 1 to {MAX_BACKING_NAME} bytes"),
                ));
            }
        };
        let size = guest_size(size);
        let l1_entries = size.div_ceil(CLUSTER * L2_ENTRIES);
        if l1_entries > MAX_L1_ENTRIES {
            return Err(invalid(
                "cannot be written as qcow2",
                format!(
                    "{size} bytes need an L1 table of {l1_entries} entries, more than \
                     qemu opens ({MAX_L1_ENTRIES}) with 64 KiB clusters"
                ),
            ));
        }
        // An image of no bytes has no L1 table (and no cluster for one:
        // qemu-img check would find it leaked).
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
        Ok(Qcow2Writer {
            file,
            path: path.to_path_buf(),
            size,
            backing,
            l1: vec![0; l1_entries as usize],
            next: 1 + l1_clusters,
            l2: None,
            last: None,
            data_clusters: 0,
        })
    }

    /// Bytes of data clusters written so far.
    pub fn data_written(&self) -> u64 {
        self.data_clusters * CLUSTER
    }

    fn io(&self, op: &'static str) -> impl Fn(io::Error) -> ImageError + '_ {
        move |source| ImageError::Io {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// Writes guest cluster `index` (guest bytes from `index * CLUSTER`):
    /// `data` is at most a cluster, zero-padded to one. Clusters must come in
    /// increasing order; a cluster never written reads as zeros, or from the
    /// backing file.
    pub fn write_cluster(&mut self, index: u64, data: &[u8]) -> Result<(), ImageError> {
        self.make_room(index, data.len())?;
        let at = self.alloc();
        self.file
            .write_all_at(data, at)
            .map_err(self.io("cannot write"))?;
        if (data.len() as u64) < CLUSTER {
            let pad = vec![0u8; (CLUSTER - data.len() as u64) as usize];
            self.file
                .write_all_at(&pad, at + data.len() as u64)
                .map_err(self.io("cannot write"))?;
        }
        self.set_entry(index, at | COPIED);
        self.data_clusters += 1;
        Ok(())
    }

    /// Marks guest cluster `index` as reading zeros, whatever the backing
    /// file holds there; no data is written. Order as for
    /// [`Qcow2Writer::write_cluster`].
    pub fn zero_cluster(&mut self, index: u64) -> Result<(), ImageError> {
        self.make_room(index, 0)?;
        self.set_entry(index, ZERO);
        Ok(())
    }

    /// Sets guest cluster `index`'s entry in the current L2 table.
    fn set_entry(&mut self, index: u64, entry: u64) {
        if let Some((_, _, entries)) = self.l2.as_mut() {
            entries[(index % L2_ENTRIES) as usize] = entry;
        }
    }

    /// Checks the order and place of guest cluster `index` (with `len` bytes)
    /// and makes its L2 table the current one.
    fn make_room(&mut self, index: u64, len: usize) -> Result<(), ImageError> {
        let in_order = self.last.is_none_or(|last| index > last);
        let fits = index.checked_mul(CLUSTER).is_some_and(|at| at < self.size);
        if !in_order || !fits || len as u64 > CLUSTER {
            return Err(self.io("cannot write a cluster")(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "guest cluster {index} ({len} bytes) out of order or past the image's \
                     {} bytes",
                    self.size
                ),
            )));
        }
        self.last = Some(index);
        let l1_index = index / L2_ENTRIES;
        if self.l2.as_ref().is_some_and(|(i, _, _)| *i != l1_index) {
            self.flush_l2()?;
        }
        if self.l2.is_none() {
            let at = self.alloc();
            self.l1[l1_index as usize] = at | COPIED;
            self.l2 = Some((l1_index, at, vec![0; L2_ENTRIES as usize]));
        }
        Ok(())
    }

    /// The file offset of a new cluster at the end.
    fn alloc(&mut self) -> u64 {
        let at = self.next * CLUSTER;
        self.next += 1;
        at
    }

    fn flush_l2(&mut self) -> Result<(), ImageError> {
        if let Some((_, at, entries)) = self.l2.take() {
            self.file
                .write_all_at(&be_u64s(&entries), at)
                .map_err(self.io("cannot write an L2 table to"))?;
        }
        Ok(())
    }

    /// Writes the last L2 table, the refcounts, the L1 table and the header.
    /// The caller syncs the file.
    pub fn finish(mut self) -> Result<(), ImageError> {
        self.flush_l2()?;
        let (table, blocks) = refcount_layout(self.next);
        let table_at = self.next * CLUSTER;
        let used = self.next + table + blocks;
        // Every cluster up to the end is in use once.
        let mut entries = vec![0u64; (table * CLUSTER / 8) as usize];
        for b in 0..blocks {
            let first = b * REFCOUNTS_PER_BLOCK;
            let ones = (used - first).min(REFCOUNTS_PER_BLOCK);
            let mut block = vec![0u8; CLUSTER as usize];
            for e in block.chunks_exact_mut(2).take(ones as usize) {
                e.copy_from_slice(&1u16.to_be_bytes());
            }
            let at = (self.next + table + b) * CLUSTER;
            self.file
                .write_all_at(&block, at)
                .map_err(self.io("cannot write a refcount block to"))?;
            entries[b as usize] = at;
        }
        self.file
            .write_all_at(&be_u64s(&entries), table_at)
            .map_err(self.io("cannot write the refcount table to"))?;
        self.file
            .write_all_at(&be_u64s(&self.l1), CLUSTER)
            .map_err(self.io("cannot write the L1 table to"))?;
        // The tables reach the disk before a header points at them.
        self.file.sync_data().map_err(self.io("cannot sync"))?;
        // No table: offset 0, as qemu-img create writes it.
        let l1_at = if self.l1.is_empty() { 0 } else { CLUSTER };
        let header = header(
            self.size,
            (self.l1.len() as u32, l1_at),
            table_at,
            table as u32,
            self.backing.as_deref(),
        );
        self.file
            .write_all_at(&header, 0)
            .map_err(self.io("cannot write the header to"))?;
        Ok(())
    }
}

/// The guest size of an image of `bytes`: whole 512-byte sectors, as qemu
/// counts sizes (it would drop a partial last sector).
pub fn guest_size(bytes: u64) -> u64 {
    bytes.next_multiple_of(512)
}

/// Clusters of refcount table and of refcount blocks that cover `clusters`
/// clusters in use and themselves.
fn refcount_layout(clusters: u64) -> (u64, u64) {
    let (mut table, mut blocks) = (1, 1);
    loop {
        let all = clusters + table + blocks;
        let b = all.div_ceil(REFCOUNTS_PER_BLOCK);
        let t = (b * 8).div_ceil(CLUSTER).max(1);
        if (t, b) == (table, blocks) {
            return (table, blocks);
        }
        (table, blocks) = (t, b);
    }
}

fn be_u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// The version 3 header, its extensions (the backing file's format, raw,
/// if it has one) and the backing file's name.
fn header(
    size: u64,
    (l1_size, l1_at): (u32, u64),
    refcount_table: u64,
    refcount_clusters: u32,
    backing: Option<&str>,
) -> Vec<u8> {
    // The extensions: type, length, data padded to 8 bytes; then type 0.
    let mut ext = Vec::new();
    if backing.is_some() {
        ext.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        ext.extend_from_slice(&3u32.to_be_bytes());
        ext.extend_from_slice(b"raw\0\0\0\0\0");
    }
    ext.extend_from_slice(&[0; 8]);
    let name = backing.unwrap_or("").as_bytes();
    let name_at = if name.is_empty() {
        0
    } else {
        u64::from(HEADER_LEN) + ext.len() as u64
    };
    let mut h = Vec::with_capacity(HEADER_LEN as usize + ext.len() + name.len());
    h.extend_from_slice(b"QFI\xfb");
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    h.extend_from_slice(&name_at.to_be_bytes());
    h.extend_from_slice(&(name.len() as u32).to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    h.extend_from_slice(&l1_size.to_be_bytes());
    h.extend_from_slice(&l1_at.to_be_bytes()); // the L1 table's offset
    h.extend_from_slice(&refcount_table.to_be_bytes());
    h.extend_from_slice(&refcount_clusters.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16 bits
    h.extend_from_slice(&HEADER_LEN.to_be_bytes());
    debug_assert_eq!(h.len(), HEADER_LEN as usize);
    h.extend_from_slice(&ext);
    h.extend_from_slice(name);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refcounts_cover_themselves() {
        // One block covers 32768 clusters, itself and the table included.
        assert_eq!(refcount_layout(3), (1, 1));
        assert_eq!(refcount_layout(32766), (1, 1));
        assert_eq!(refcount_layout(32767), (1, 2));
        // A table cluster holds 8192 blocks' offsets.
        let clusters = 8192 * 32768 - 8192;
        let (t, b) = refcount_layout(clusters);
        assert!(b * REFCOUNTS_PER_BLOCK >= clusters + t + b);
        assert!(t * 8192 >= b);
        assert_eq!(t, 2);
    }

    #[test]
    fn clusters_come_in_order_and_inside_the_image() {
        let f = tempfile::tempfile().unwrap();
        let path = Path::new("test.qcow2");
        let mut w = Qcow2Writer::new(&f, path, 3 * CLUSTER - 100, None).unwrap();
        // Rounded up to a whole sector.
        assert_eq!(w.size, 3 * CLUSTER);
        w.write_cluster(1, &[1; 10]).unwrap();
        assert!(w.write_cluster(1, &[1; 10]).is_err());
        assert!(w.write_cluster(0, &[1; 10]).is_err());
        assert!(w.write_cluster(3, &[1; 10]).is_err());
        assert!(w.write_cluster(2, &[1; CLUSTER as usize + 1]).is_err());
        w.write_cluster(2, &[2; 100]).unwrap();
        assert_eq!(w.data_written(), 2 * CLUSTER);
        w.finish().unwrap();
    }

    #[test]
    fn a_size_qemu_cannot_open_is_refused() {
        let f = tempfile::tempfile().unwrap();
        let max = MAX_L1_ENTRIES * L2_ENTRIES * CLUSTER;
        assert!(Qcow2Writer::new(&f, Path::new("a"), max, None).is_ok());
        let e = Qcow2Writer::new(&f, Path::new("a"), max + 1, None)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("a: cannot be written as qcow2"),
            "{e}"
        );
    }
}
