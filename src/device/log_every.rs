//! Failure lines in the log at most once a second, counting the ones left
//! out: a client can repeat a failing request as fast as it likes.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// A log line at most once a second, counting the ones left out.
#[derive(Default)]
pub(super) struct LogEvery {
    last: Cell<Option<Instant>>,
    quiet: Cell<u64>,
}

impl LogEvery {
    /// `Some(lines left out since the last)` if a line may go out now.
    pub(super) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        if self.within_a_second(now) {
            self.quiet.set(self.quiet.get() + 1);
            return None;
        }
        self.last.set(Some(now));
        Some(self.quiet.replace(0))
    }

    /// Whether the last line went out less than a second before `now`.
    fn within_a_second(&self, now: Instant) -> bool {
        self.last
            .get()
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
    }

    /// Whether lines were left out and not counted in a line yet.
    pub(super) fn left_out(&self) -> bool {
        self.quiet.get() > 0
    }

    /// `Some(lines left out)` once lines were left out and a second has
    /// passed since the last line: a burst followed by quiet still gets its
    /// count out. `now == None` (the worker stopping): at once.
    pub(super) fn overdue_at(&self, now: Option<Instant>) -> Option<u64> {
        if !self.left_out() {
            return None;
        }
        if let Some(now) = now {
            if self.within_a_second(now) {
                return None;
            }
            self.last.set(Some(now));
        }
        Some(self.quiet.replace(0))
    }

    /// The note a line carries for the ones left out before it.
    pub(super) fn more(quiet: u64) -> String {
        if quiet == 0 {
            String::new()
        } else {
            format!(" ({quiet} more failures not logged)")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::LogEvery;

    #[test]
    fn log_every_lets_one_line_a_second_through_and_counts_the_rest() {
        let log = LogEvery::default();
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        assert_eq!(log.allow_at(at(0)), Some(0));
        assert_eq!(log.allow_at(at(10)), None);
        assert_eq!(log.allow_at(at(999)), None);
        // The next line says how many were left out.
        assert_eq!(log.allow_at(at(1000)), Some(2));
        assert_eq!(LogEvery::more(2), " (2 more failures not logged)");
        assert_eq!(log.allow_at(at(5000)), Some(0));
        assert_eq!(LogEvery::more(0), "");
    }

    #[test]
    fn log_every_reports_a_burst_followed_by_quiet() {
        let log = LogEvery::default();
        let t = Instant::now();
        let at = |ms| Some(t + Duration::from_millis(ms));
        // Nothing left out: nothing to report.
        assert_eq!(log.overdue_at(at(0)), None);
        assert_eq!(log.allow_at(at(0).unwrap()), Some(0));
        assert_eq!(log.allow_at(at(10).unwrap()), None);
        assert_eq!(log.allow_at(at(20).unwrap()), None);
        // Within the second the count waits; after it, it goes out once.
        assert_eq!(log.overdue_at(at(500)), None);
        assert_eq!(log.overdue_at(at(1000)), Some(2));
        assert_eq!(log.overdue_at(at(3000)), None);
        // That report counts as a line: the next failure within its
        // second is left out, and a stopping worker reports it at once.
        assert_eq!(log.allow_at(at(1500).unwrap()), None);
        assert_eq!(log.overdue_at(None), Some(1));
        assert_eq!(log.overdue_at(None), None);
    }
}
