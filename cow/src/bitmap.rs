//! The sector bitmap: bit N (least significant bit first in byte N / 8) says
//! whether sector N is present in the COW file.
//!
//! [`Bitmap`] works over any byte storage (a `Vec<u8>`, a slice, a mapped file),
//! so the device can keep it in RAM or map it. Sectors at or past the bitmap's bit
//! count (the v1/v2 short bitmap, or a range past the device) read as absent.

use std::ops::Range;

/// A view of a COW bitmap with `bits` meaningful bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap<B> {
    bytes: B,
    bits: u64,
}

/// A maximal run of sectors that are all present or all absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First sector of the run.
    pub start: u64,
    /// Number of sectors, at least 1.
    pub len: u64,
    /// Whether the sectors are in the COW file.
    pub present: bool,
}

impl Run {
    /// One past the run's last sector.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

impl<B: AsRef<[u8]>> Bitmap<B> {
    /// A bitmap over `bytes` with `bits` sectors; `bits` is clamped to the
    /// number of bits the bytes hold.
    pub fn new(bytes: B, bits: u64) -> Bitmap<B> {
        let capacity = (bytes.as_ref().len() as u64).saturating_mul(8);
        Bitmap {
            bits: bits.min(capacity),
            bytes,
        }
    }

    /// Number of sectors the bitmap has a bit for.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// The raw bytes, as they are on disk.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// Gives the storage back.
    pub fn into_inner(self) -> B {
        self.bytes
    }

    /// Whether sector `n` is present; false for sectors without a bit.
    pub fn get(&self, n: u64) -> bool {
        n < self.bits && self.bytes.as_ref()[(n / 8) as usize] & (1 << (n % 8)) != 0
    }

    /// How many sectors in `range` are present.
    pub fn count(&self, range: Range<u64>) -> u64 {
        let end = range.end.min(self.bits);
        let mut n = range.start;
        let mut total = 0;
        while n < end && n % 8 != 0 {
            total += u64::from(self.get(n));
            n += 1;
        }
        let whole_end = end / 8 * 8;
        if n < whole_end {
            let bytes = &self.bytes.as_ref()[(n / 8) as usize..(whole_end / 8) as usize];
            let mut words = bytes.chunks_exact(8);
            for word in &mut words {
                let mut w = [0u8; 8];
                w.copy_from_slice(word);
                total += u64::from(u64::from_le_bytes(w).count_ones());
            }
            total += words
                .remainder()
                .iter()
                .map(|b| u64::from(b.count_ones()))
                .sum::<u64>();
            n = whole_end;
        }
        while n < end {
            total += u64::from(self.get(n));
            n += 1;
        }
        total
    }

    /// How many sectors the bitmap marks present in all.
    pub fn count_present(&self) -> u64 {
        self.count(0..self.bits)
    }

    /// Bits set in the storage past the last sector: a sign of corruption, since
    /// no sector exists for them.
    pub fn stray_bits(&self) -> u64 {
        let bytes = self.bytes.as_ref();
        let mut stray = 0;
        let first = (self.bits / 8) as usize;
        for (i, byte) in bytes.iter().enumerate().skip(first) {
            let base = i as u64 * 8;
            // Keep only the bits at positions >= self.bits.
            let keep = if base >= self.bits {
                0xFFu8
            } else {
                0xFFu8 << (self.bits - base)
            };
            stray += u64::from((byte & keep).count_ones());
        }
        stray
    }

    /// The first sector in `from..end` whose state differs from `present`, or
    /// `end` if there is none.
    pub fn next_change(&self, from: u64, end: u64, present: bool) -> u64 {
        let mapped_end = end.min(self.bits);
        let mut n = from;
        let found = 'scan: {
            while n < mapped_end && n % 8 != 0 {
                if self.get(n) != present {
                    break 'scan Some(n);
                }
                n += 1;
            }
            let bytes = self.bytes.as_ref();
            let same: u8 = if present { 0xFF } else { 0x00 };
            let whole_end = mapped_end / 8 * 8;
            while n + 64 <= whole_end {
                let i = (n / 8) as usize;
                if bytes[i..i + 8].iter().any(|&b| b != same) {
                    break;
                }
                n += 64;
            }
            while n < whole_end {
                let byte = bytes[(n / 8) as usize] ^ same;
                if byte != 0 {
                    break 'scan Some(n + u64::from(byte.trailing_zeros()));
                }
                n += 8;
            }
            while n < mapped_end {
                if self.get(n) != present {
                    break 'scan Some(n);
                }
                n += 1;
            }
            None
        };
        match found {
            Some(n) => n,
            // Sectors without a bit are absent.
            None if present => mapped_end.max(from).min(end),
            None => end.max(from),
        }
    }

    /// The runs of present and absent sectors covering `range`, in order.
    pub fn runs(&self, range: Range<u64>) -> Runs<'_, B> {
        Runs {
            bitmap: self,
            next: range.start,
            end: range.end,
        }
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Bitmap<B> {
    /// Marks sector `n` present. Sectors without a bit are left alone.
    pub fn set(&mut self, n: u64) {
        self.set_range(n..n.saturating_add(1), true);
    }

    /// Marks sector `n` absent. Sectors without a bit are left alone.
    pub fn clear(&mut self, n: u64) {
        self.set_range(n..n.saturating_add(1), false);
    }

    /// Marks every sector of `range` present or absent. Sectors without a bit
    /// are left alone.
    pub fn set_range(&mut self, range: Range<u64>, present: bool) {
        let end = range.end.min(self.bits);
        let mut n = range.start;
        let bytes = self.bytes.as_mut();
        while n < end && n % 8 != 0 {
            put(bytes, n, present);
            n += 1;
        }
        let whole_end = end / 8 * 8;
        if n < whole_end {
            let fill = if present { 0xFF } else { 0x00 };
            bytes[(n / 8) as usize..(whole_end / 8) as usize].fill(fill);
            n = whole_end;
        }
        while n < end {
            put(bytes, n, present);
            n += 1;
        }
    }
}

fn put(bytes: &mut [u8], n: u64, present: bool) {
    let byte = &mut bytes[(n / 8) as usize];
    if present {
        *byte |= 1 << (n % 8);
    } else {
        *byte &= !(1 << (n % 8));
    }
}

/// Iterator over the runs of a range; see [`Bitmap::runs`].
#[derive(Debug)]
pub struct Runs<'a, B> {
    bitmap: &'a Bitmap<B>,
    next: u64,
    end: u64,
}

impl<B: AsRef<[u8]>> Iterator for Runs<'_, B> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.next >= self.end {
            return None;
        }
        let start = self.next;
        let present = self.bitmap.get(start);
        let end = self.bitmap.next_change(start + 1, self.end, present);
        self.next = end;
        Some(Run {
            start,
            len: end - start,
            present,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model_runs(model: &[bool], range: Range<u64>) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        for n in range {
            let present = model.get(n as usize).copied().unwrap_or(false);
            match runs.last_mut() {
                Some(r) if r.present == present => r.len += 1,
                _ => runs.push(Run {
                    start: n,
                    len: 1,
                    present,
                }),
            }
        }
        runs
    }

    #[test]
    fn lsb_first() {
        let mut b = Bitmap::new(vec![0u8; 2], 16);
        b.set(0);
        b.set(9);
        assert_eq!(b.as_bytes(), &[0x01, 0x02]);
        assert!(b.get(9) && !b.get(8));
        b.clear(0);
        assert_eq!(b.as_bytes(), &[0x00, 0x02]);
    }

    #[test]
    fn sectors_without_bits_are_absent_and_never_set() {
        let mut b = Bitmap::new(vec![0xFFu8; 2], 12);
        assert!(b.get(11) && !b.get(12) && !b.get(100));
        assert_eq!(b.count_present(), 12);
        assert_eq!(b.stray_bits(), 4);
        b.set_range(0..100, false);
        assert_eq!(b.as_bytes(), &[0x00, 0xF0]);
        assert_eq!(b.stray_bits(), 4);
        b.set(13);
        assert_eq!(b.as_bytes(), &[0x00, 0xF0]);
        let runs: Vec<Run> = b.runs(0..20).collect();
        assert_eq!(
            runs,
            vec![Run {
                start: 0,
                len: 20,
                present: false
            }]
        );
    }

    proptest! {
        #[test]
        fn matches_a_model(
            bits in 0u64..700,
            ops in prop::collection::vec((0u64..720, 0u64..300, any::<bool>()), 0..20),
            query in (0u64..720, 0u64..720),
        ) {
            let bytes = vec![0u8; bits.div_ceil(8) as usize];
            let mut b = Bitmap::new(bytes, bits);
            let mut model = vec![false; bits as usize];
            for (start, len, present) in ops {
                b.set_range(start..start + len, present);
                for n in start..(start + len).min(bits) {
                    model[n as usize] = present;
                }
            }
            for n in 0..bits + 10 {
                prop_assert_eq!(b.get(n), model.get(n as usize).copied().unwrap_or(false));
            }
            let (a, z) = (query.0.min(query.1), query.0.max(query.1));
            let expect = model_runs(&model, a..z);
            let runs: Vec<Run> = b.runs(a..z).collect();
            prop_assert_eq!(&runs, &expect);
            let count = model.iter().take(z.min(bits) as usize).skip(a as usize).filter(|&&p| p).count();
            prop_assert_eq!(b.count(a..z), count as u64);
            prop_assert_eq!(b.stray_bits(), 0);
        }
    }
}
