//! An allocator wrapper that counts live bytes, to measure memory of a structure by the
//! difference before and after building it.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};

/// Wraps `A`, keeping a count of bytes currently allocated.
pub struct Counting<A> {
    inner: A,
    live: AtomicIsize,
}

impl<A> Counting<A> {
    pub const fn new(inner: A) -> Self {
        Self {
            inner,
            live: AtomicIsize::new(0),
        }
    }

    /// Bytes allocated and not yet freed, process-wide.
    pub fn live(&self) -> isize {
        self.live.load(Ordering::Relaxed)
    }
}

// SAFETY: every method forwards to the wrapped allocator unchanged; the counter is only
// arithmetic on the requested sizes.
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout, as the trait requires.
        let p = unsafe { self.inner.alloc(layout) };
        if !p.is_null() {
            self.live
                .fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with `layout`, as the caller guarantees.
        unsafe { self.inner.dealloc(ptr, layout) };
        self.live
            .fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { self.inner.alloc_zeroed(layout) };
        if !p.is_null() {
            self.live
                .fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` and `layout` come from this allocator, as the caller guarantees.
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.live.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}
