//! Who hears that a device's worker failed: the ring failed under it, or it
//! panicked. Such a device ends every request and connection with an error
//! and takes no more, so whoever serves it (a server, say) should stop
//! rather than accept clients it can only turn away.

use std::sync::{Mutex, PoisonError};

type Hook = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub(super) struct FailureWatch {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Why the worker failed, once it has.
    why: Option<String>,
    hooks: Vec<Hook>,
}

impl FailureWatch {
    /// Runs `hook` once the worker has failed: at once if it has.
    pub(super) fn on_failure(&self, hook: Hook) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.why.is_some() {
            drop(st);
            hook();
        } else {
            st.hooks.push(hook);
        }
    }

    pub(super) fn failure(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .why
            .clone()
    }

    /// Marks the worker failed and runs the hooks (on the worker's thread,
    /// after it let go of every request and connection).
    fn fire(&self, why: String) {
        let hooks = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.why = Some(why);
            std::mem::take(&mut st.hooks)
        };
        for hook in hooks {
            hook();
        }
    }
}

/// Held by the worker's thread: fires the watch if the thread ends by a
/// panic or its loop returns an error (set `failed` to why).
pub(super) struct FailGuard<'a> {
    pub(super) watch: &'a FailureWatch,
    pub(super) failed: Option<String>,
}

impl Drop for FailGuard<'_> {
    fn drop(&mut self) {
        if let Some(why) = self.failed.take() {
            self.watch.fire(why);
        } else if std::thread::panicking() {
            self.watch.fire("its worker thread panicked".into());
        }
    }
}
