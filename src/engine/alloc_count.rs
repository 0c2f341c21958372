//! A global allocator that counts allocations while counting is switched on,
//! for the test that the device's read/write path allocates nothing per
//! request. It lives here because it needs `unsafe`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The system allocator, counting calls while [`CountingAlloc::start`] is in
/// effect. Install with `#[global_allocator]` in a test binary.
pub struct CountingAlloc {
    counting: AtomicBool,
    count: AtomicU64,
}

impl CountingAlloc {
    pub const fn new() -> CountingAlloc {
        CountingAlloc {
            counting: AtomicBool::new(false),
            count: AtomicU64::new(0),
        }
    }

    /// Resets the count and starts counting (on every thread).
    pub fn start(&self) {
        self.count.store(0, Ordering::SeqCst);
        self.counting.store(true, Ordering::SeqCst);
    }

    /// Stops counting and returns the allocations since `start`.
    pub fn stop(&self) -> u64 {
        self.counting.store(false, Ordering::SeqCst);
        self.count.load(Ordering::SeqCst)
    }

    fn note(&self) {
        if self.counting.load(Ordering::Relaxed) {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Default for CountingAlloc {
    fn default() -> CountingAlloc {
        CountingAlloc::new()
    }
}

// SAFETY: every call is passed on unchanged to the system allocator, which
// upholds GlobalAlloc's contract; counting touches only atomics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note();
        // SAFETY: as for `alloc`; `ptr` came from this allocator (the system's).
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the system's) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}
