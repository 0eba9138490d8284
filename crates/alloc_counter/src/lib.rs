//! A global allocator that counts allocations, so tests and benchmarks can prove a path
//! allocation-free instead of assuming it.
//!
//! Install it in a test or bench binary. Each allocation is counted twice: process-wide
//! ([`allocations`]) and for the thread that made it ([`thread_allocations`]). A test that
//! proves its own thread's path allocation-free counts per thread, so other tests in the
//! binary, the test harness or a runtime's threads cannot disturb it:
//!
//! ```
//! #[global_allocator]
//! static ALLOC: alloc_counter::CountingAlloc = alloc_counter::CountingAlloc;
//!
//! let (v, allocated) = alloc_counter::count_on_this_thread(|| vec![1u8; 10]);
//! assert_eq!(allocated, 1);
//! # drop(v);
//! ```

// Implementing `GlobalAlloc` is unsafe by definition; this crate only forwards to the system
// allocator and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's allocations. A `const`-initialised `Cell<u64>` needs no lazy
    /// initialisation and no destructor, so touching it from the allocator never allocates
    /// or recurses.
    static THREAD_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Counts one allocation of `size` bytes, process-wide and for this thread.
fn note(size: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    LARGEST.fetch_max(size, Ordering::Relaxed);
    // `try_with`: during a thread's teardown its locals may be gone; that allocation then
    // counts only process-wide.
    let _ = THREAD_ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

/// The system allocator, counting every allocation and reallocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

// SAFETY: every method forwards unchanged to the system allocator, which upholds the
// `GlobalAlloc` contract; counting has no effect on the memory returned.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations (and reallocations) so far, process-wide, when [`CountingAlloc`] is the
/// global allocator.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Runs `f` and returns its result with the number of allocations made meanwhile (by any
/// thread). Prefer [`count_on_this_thread`] unless the work runs on other threads.
pub fn count<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = allocations();
    let result = f();
    (result, allocations() - before)
}

/// Allocations (and reallocations) made so far by the calling thread, when
/// [`CountingAlloc`] is the global allocator. Other threads cannot change it.
pub fn thread_allocations() -> u64 {
    THREAD_ALLOCATIONS.with(Cell::get)
}

/// Runs `f` and returns its result with the number of allocations the calling thread made
/// meanwhile (what other threads allocate is not counted).
pub fn count_on_this_thread<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = thread_allocations();
    let result = f();
    (result, thread_allocations() - before)
}

/// The size in bytes of the largest allocation (or reallocation) since the last
/// [`reset_largest`], process-wide, when [`CountingAlloc`] is the global allocator: for tests
/// that prove no allocation grows with an input.
pub fn largest_allocation() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

/// Forgets the largest allocation seen so far.
pub fn reset_largest() {
    LARGEST.store(0, Ordering::Relaxed);
}
