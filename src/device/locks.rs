//! Sector range locks with a FIFO line (invariant 2).
//!
//! A request that changes sectors (a write, a partial-sector merge, TRIM,
//! WRITE_ZEROES) holds its sector range from before its first op until its
//! last op has completed. A request whose range overlaps a held range, or the
//! range of an earlier request still waiting in line, waits; so overlapping
//! writes run one at a time in arrival order, and a sector never ends up mixed
//! from two writes. Capacity is fixed at creation: no allocation per request.

use std::collections::VecDeque;
use std::ops::Range;

/// Held and waiting sector ranges, keyed by request slot.
#[derive(Debug)]
pub struct RangeLocks {
    held: Vec<(Range<u64>, u32)>,
    waiting: VecDeque<(Range<u64>, u32)>,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl RangeLocks {
    /// Room for `capacity` requests without reallocating.
    pub fn new(capacity: usize) -> RangeLocks {
        RangeLocks {
            held: Vec::with_capacity(capacity),
            waiting: VecDeque::with_capacity(capacity),
        }
    }

    /// Takes `range` for request `slot` if nothing held or waiting overlaps it
    /// and returns true; otherwise puts the request in line and returns false.
    pub fn acquire(&mut self, slot: u32, range: Range<u64>) -> bool {
        let blocked = self.held.iter().any(|(r, _)| overlaps(r, &range))
            || self.waiting.iter().any(|(r, _)| overlaps(r, &range));
        if blocked {
            self.waiting.push_back((range, slot));
            false
        } else {
            self.held.push((range, slot));
            true
        }
    }

    /// Releases request `slot`'s range and calls `granted` for each waiting
    /// request that now holds its range, in arrival order.
    pub fn release(&mut self, slot: u32, mut granted: impl FnMut(u32)) {
        if let Some(i) = self.held.iter().position(|&(_, s)| s == slot) {
            self.held.swap_remove(i);
        }
        let mut i = 0;
        while i < self.waiting.len() {
            let range = &self.waiting[i].0;
            let blocked = self.held.iter().any(|(r, _)| overlaps(r, range))
                || self.waiting.iter().take(i).any(|(r, _)| overlaps(r, range));
            if blocked {
                i += 1;
                continue;
            }
            if let Some((range, s)) = self.waiting.remove(i) {
                self.held.push((range, s));
                granted(s);
            }
        }
    }

    /// No request holds or waits for a range.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.held.is_empty() && self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_wait_in_arrival_order() {
        let mut l = RangeLocks::new(8);
        assert!(l.acquire(1, 0..8));
        assert!(l.acquire(2, 8..16));
        assert!(!l.acquire(3, 4..10));
        // 4 does not overlap anything held, but overlaps 3, which waits.
        assert!(!l.acquire(4, 9..12));
        assert!(l.acquire(5, 100..101));
        let mut got = Vec::new();
        l.release(1, |s| got.push(s));
        assert!(got.is_empty(), "3 still overlaps 2");
        l.release(2, |s| got.push(s));
        assert_eq!(got, vec![3]);
        l.release(3, |s| got.push(s));
        assert_eq!(got, vec![3, 4]);
        l.release(4, |_| {});
        l.release(5, |_| {});
        assert!(l.is_empty());
    }

    #[test]
    fn disjoint_waiters_all_start_at_once() {
        let mut l = RangeLocks::new(8);
        assert!(l.acquire(1, 0..100));
        assert!(!l.acquire(2, 0..10));
        assert!(!l.acquire(3, 50..60));
        let mut got = Vec::new();
        l.release(1, |s| got.push(s));
        assert_eq!(got, vec![2, 3]);
    }
}
