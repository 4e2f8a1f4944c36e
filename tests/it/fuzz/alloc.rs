//! The test binary's allocator: the system's, recording the largest single allocation each
//! thread asks for, so the fuzz tests can fail a reader that sizes a buffer from an unchecked
//! length field (one that asks for more than the machine has aborts the binary instead, which
//! fails the run just as surely).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct PeakTracking;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown find the slot gone.
    let _ = PEAK.try_with(|p| {
        if size > p.get() {
            p.set(size)
        }
    });
}

// SAFETY: every call forwards to `System` with the caller's arguments; recording a size has no
// effect on the memory handed out.
unsafe impl GlobalAlloc for PeakTracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: PeakTracking = PeakTracking;

/// Starts a new measurement on this thread.
pub fn reset_peak() {
    PEAK.with(|p| p.set(0));
}

/// The largest single allocation on this thread since [`reset_peak`].
pub fn peak() -> usize {
    PEAK.with(|p| p.get())
}
