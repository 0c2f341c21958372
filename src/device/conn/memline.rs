//! The worker's FIFO line of connections waiting for memory (invariant 4):
//! only its head may use the pool's reserve, and what the head needs is
//! tried again whenever memory comes back, so nothing overtakes it.

use std::collections::VecDeque;

/// The worker's FIFO line of connections waiting for memory.
#[derive(Default)]
pub(in crate::device) struct MemLine {
    queue: VecDeque<u32>,
    /// Chunks the head asked for last.
    pub(super) need: usize,
}

impl MemLine {
    pub(super) fn join(&mut self, conn: u32, n: usize) {
        if !self.queue.contains(&conn) {
            self.queue.push_back(conn);
        }
        if self.queue.front() == Some(&conn) {
            self.need = n;
        }
    }

    pub(super) fn leave(&mut self, conn: u32) {
        if self.queue.front() == Some(&conn) {
            // The next head has not said what it needs yet.
            self.need = 0;
        }
        self.queue.retain(|&c| c != conn);
    }

    pub(in crate::device) fn head(&self) -> Option<u32> {
        self.queue.front().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::MemLine;

    /// When the head of the line leaves, what it needed leaves with it: the
    /// next head is tried as soon as any memory is free (invariant 4).
    #[test]
    fn the_line_forgets_the_need_of_a_head_that_leaves() {
        let mut line = MemLine::default();
        line.join(1, 8);
        line.join(2, 1);
        assert_eq!((line.head(), line.need), (Some(1), 8));
        line.leave(2);
        assert_eq!((line.head(), line.need), (Some(1), 8));
        line.leave(1);
        assert_eq!((line.head(), line.need), (None, 0));
        line.join(3, 4);
        line.join(4, 2);
        line.leave(3);
        assert_eq!((line.head(), line.need), (Some(4), 0));
    }
}
