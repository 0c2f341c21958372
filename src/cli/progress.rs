//! Progress bars for long verbs (commit, convert, compare), shown only when
//! stderr is a terminal, and Ctrl-C turned into a flag the verbs check so they
//! can stop at a consistent point.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static HANDLER: OnceLock<bool> = OnceLock::new();

/// Catches SIGINT and SIGTERM from now on: they set a flag instead of killing
/// the process. Returns false if the handler could not be installed.
pub fn catch_interrupts() -> bool {
    *HANDLER
        .get_or_init(|| ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst)).is_ok())
}

/// Whether Ctrl-C (or SIGTERM) arrived since `catch_interrupts`.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A byte-counting progress bar on stderr; drawn only on a terminal.
pub struct Progress(ProgressBar);

impl Progress {
    pub fn new(total_bytes: u64, what: &str) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        Progress(bar)
    }

    /// `bytes` more are done.
    pub fn inc(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
