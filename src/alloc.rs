//! The extension's global allocator: large buffers come straight from the kernel as transparent huge
//! pages and are kept warm for reuse; everything else comes from the process's own `malloc`.
//!
//! Why: inside Blender, `malloc` is Blender's jemalloc, which serves allocations of 8 MiB and more from a
//! dedicated arena that returns their pages to the kernel as soon as they are freed. A 64 MiB request
//! therefore met fresh memory at every step — the read buffer growing 8 → 16 → 32 → 64 MiB (each step a
//! copy into new pages), the parsed string, the reply — and the kernel faulted and zeroed it 4 KiB at a
//! time: about 85,000 page faults and 55–60 % of the service's time per 64 MiB request (`perf stat`,
//! `perf record` on Blender, docs/BENCHMARKS.md). Here a large block is its own anonymous mapping marked
//! `MADV_HUGEPAGE` (faulted 2 MiB at a time where the kernel allows it) that grows with `mremap`, which
//! moves page tables instead of copying bytes.
//!
//! Even faulted 2 MiB at a time, fresh memory had to be zeroed by the kernel: 41 % of the service's CPU
//! for back-to-back 64 MiB requests, while a 4 MiB request reused jemalloc's warm cache and paid nothing
//! of the kind. So freed large blocks are **kept for reuse**, as jemalloc keeps smaller ones: up to
//! 8 blocks and 512 MiB of mappings (`KEEP_BLOCKS`, `KEEP_BYTES`), marked `MADV_FREE` (the kernel may take their
//! pages back whenever it needs memory; until then a reuse costs no fault). Blocks are kept only while a
//! service runs in the process (its trimmer, below): a process that only uses the client keeps nothing.
//! A kept block that is not
//! reused within `KEEP_FOR` (10 s) is unmapped by [`run_trimmer`] — a thread of the service that sleeps
//! until then, and sleeps without a timeout while nothing is kept, so an idle service still never
//! wakes; [`release_kept`] (called when the service stops) unmaps them all. Blocks made zeroed (`vec![0; n]`) are always fresh
//! mappings, which the kernel zeroes.
//!
//! Each mapping starts with a one-page header holding its length, so a block may sit in a mapping
//! larger than it asked for: a reused 128 MiB mapping serves a read buffer growing 16 → 32 → 64 MiB
//! without a single `mremap`.
//!
//! Small blocks (below [`LARGE`]) and over-aligned ones still go to [`System`], where the allocator's own
//! caches serve them well. Off Linux everything goes to [`System`].
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of this size or more are mapped directly. It is jemalloc's own "oversize" threshold: below
/// it, Blender's `malloc` reuses warm cached memory (4 MiB requests back to back: 5.4 ms from jemalloc,
/// 8.5 ms from fresh huge pages with a 2 MiB threshold).
pub const LARGE: usize = 8 << 20;

#[cfg(target_os = "linux")]
pub use large::{kept_bytes, release_kept, run_trimmer, wake_trimmers};

/// Off Linux nothing is kept.
#[cfg(not(target_os = "linux"))]
pub fn kept_bytes() -> usize {
    0
}

/// Off Linux nothing is kept.
#[cfg(not(target_os = "linux"))]
pub fn release_kept() {}

/// Off Linux nothing is kept: returns at once.
#[cfg(not(target_os = "linux"))]
pub fn run_trimmer(_stop: &std::sync::atomic::AtomicBool) {}

/// Off Linux nothing is kept.
#[cfg(not(target_os = "linux"))]
pub fn wake_trimmers() {}

/// The allocator installed by this crate (`#[global_allocator]` in lib.rs).
pub struct Allocator;

#[cfg(target_os = "linux")]
mod large {
    use std::ptr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    /// Mappings are rounded to the huge page size, so that the kernel can place them on a huge page
    /// boundary and back all of them with huge pages. Untouched pages cost nothing.
    const GRANULE: usize = 2 << 20;
    /// Alignments a block always satisfies (blocks start on a page; pages are at least 4 KiB).
    pub const MAX_ALIGN: usize = 4096;
    /// Bytes before each block, holding its mapping's length. One page, so blocks stay page aligned.
    const HEADER: usize = 4096;
    /// At most this many freed blocks are kept for reuse…
    pub const KEEP_BLOCKS: usize = 8;
    /// …holding at most this many bytes of mappings. A 64 MiB request's blocks — a read buffer grown to
    /// 128 MiB, the parsed 64 MiB string, the string it replaces — come to about 260 MiB; what is kept
    /// in memory is only what those requests touched.
    pub const KEEP_BYTES: usize = 512 << 20;
    /// A kept block not reused for this long is unmapped by the trimmer (jemalloc's default
    /// `dirty_decay_ms` is the same 10 s).
    pub const KEEP_FOR: Duration = Duration::from_secs(10);

    #[derive(Clone, Copy)]
    struct Kept {
        base: usize,
        len: usize,
        since: Instant,
    }

    struct Cache {
        slots: [Option<Kept>; KEEP_BLOCKS],
        bytes: usize,
        /// Running [`run_trimmer`]s. Blocks are kept only while one runs (while a service runs in this
        /// process): a process that merely uses the client keeps nothing.
        trimmers: usize,
    }

    /// Freed mappings kept for reuse. A fixed array: the allocator must not allocate while holding it.
    static CACHE: Mutex<Cache> = Mutex::new(Cache {
        slots: [None; KEEP_BLOCKS],
        bytes: 0,
        trimmers: 0,
    });

    /// Signalled when the cache gets its first block, and to stop trimmers.
    static CHANGED: Condvar = Condvar::new();

    /// Blocks to unmap once the cache's lock is released (system calls stay outside the lock).
    type Evicted = [Option<(usize, usize)>; KEEP_BLOCKS + 1];

    fn with_cache<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
        let mut c = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut c)
    }

    fn unmap_all(evicted: &Evicted) {
        for &(base, len) in evicted.iter().flatten() {
            os_unmap(base, len);
        }
    }

    /// Note `block` for unmapping. Every evicted block comes from a distinct slot (or is the block being
    /// freed), so the list never overflows.
    fn evict(out: &mut Evicted, block: (usize, usize)) {
        if let Some(o) = out.iter_mut().find(|o| o.is_none()) {
            *o = Some(block);
        }
    }

    impl Cache {
        /// Evict blocks kept longer than [`KEEP_FOR`].
        fn expire(&mut self, now: Instant, out: &mut Evicted) {
            for slot in &mut self.slots {
                if let Some(k) = *slot {
                    if now.saturating_duration_since(k.since) >= KEEP_FOR {
                        *slot = None;
                        self.bytes -= k.len;
                        evict(out, (k.base, k.len));
                    }
                }
            }
        }

        /// Take a kept block for `need` bytes: its base and length. A block of a known size takes the
        /// one that fits it most tightly; a growing one (`growing`: a buffer crossing the threshold,
        /// which will likely double again) takes the largest, so that it grows in place. Either way,
        /// when nothing fits, the largest (to be grown).
        fn take(&mut self, need: usize, growing: bool) -> Option<(usize, usize)> {
            let kept = || {
                self.slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.map(|k| (i, k.len)))
            };
            let tightest = || {
                kept()
                    .filter(|&(_, len)| len >= need)
                    .min_by_key(|&(_, len)| len)
            };
            let largest = || kept().max_by_key(|&(_, len)| len);
            let (i, _) = if growing {
                largest()
            } else {
                tightest().or_else(largest)
            }?;
            let k = self.slots[i].take()?;
            self.bytes -= k.len;
            Some((k.base, k.len))
        }

        /// Keep `base..base+len`, evicting the oldest kept blocks to make room; false when it is too
        /// large to keep at all, or no trimmer runs.
        fn keep(&mut self, base: usize, len: usize, now: Instant, out: &mut Evicted) -> bool {
            if len > KEEP_BYTES || self.trimmers == 0 {
                return false;
            }
            loop {
                let free_slot = self.slots.iter().position(Option::is_none);
                if let (Some(i), true) = (free_slot, self.bytes + len <= KEEP_BYTES) {
                    self.slots[i] = Some(Kept {
                        base,
                        len,
                        since: now,
                    });
                    self.bytes += len;
                    return true;
                }
                let oldest = (0..KEEP_BLOCKS)
                    .filter(|&i| self.slots[i].is_some())
                    .min_by_key(|&i| self.slots[i].map(|k| k.since));
                let Some(k) = oldest.and_then(|i| self.slots[i].take()) else {
                    return false;
                };
                self.bytes -= k.len;
                evict(out, (k.base, k.len));
            }
        }
    }

    /// Unmap kept blocks as they pass [`KEEP_FOR`] unused, until `stop` is set (then call
    /// [`wake_trimmers`]). Sleeps without a timeout while nothing is kept. Blocks are kept only while a
    /// trimmer runs; when the last one returns, every kept block is unmapped.
    pub fn run_trimmer(stop: &AtomicBool) {
        let mut c = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        c.trimmers += 1;
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let mut out: Evicted = [None; KEEP_BLOCKS + 1];
            c.expire(now, &mut out);
            if out.iter().any(Option::is_some) {
                drop(c);
                unmap_all(&out);
                c = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let oldest = c.slots.iter().flatten().map(|k| k.since).min();
            c = match oldest {
                None => CHANGED.wait(c).unwrap_or_else(PoisonError::into_inner),
                Some(since) => {
                    let due = (since + KEEP_FOR).saturating_duration_since(now);
                    CHANGED
                        .wait_timeout(c, due)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        c.trimmers -= 1;
        let last = c.trimmers == 0;
        drop(c);
        if last {
            release_kept();
        }
    }

    /// Wake every [`run_trimmer`], so that one whose `stop` is set returns.
    pub fn wake_trimmers() {
        // Taking the lock orders this after a trimmer's check of `stop`, so the wake is not lost.
        drop(CACHE.lock().unwrap_or_else(PoisonError::into_inner));
        CHANGED.notify_all();
    }

    /// Bytes of mappings kept for reuse now.
    pub fn kept_bytes() -> usize {
        with_cache(|c| c.bytes)
    }

    /// Unmap every kept block (the service calls this when it stops).
    pub fn release_kept() {
        let mut out: Evicted = [None; KEEP_BLOCKS + 1];
        with_cache(|c| {
            for (slot, o) in c.slots.iter_mut().zip(out.iter_mut()) {
                if let Some(k) = slot.take() {
                    *o = Some((k.base, k.len));
                }
            }
            c.bytes = 0;
        });
        unmap_all(&out);
    }

    /// The mapping length for a block of `size` bytes: header included, rounded to [`GRANULE`].
    fn mapping_len(size: usize) -> Option<usize> {
        size.checked_add(HEADER + GRANULE - 1)
            .map(|n| n & !(GRANULE - 1))
    }

    /// A fresh zeroed mapping of `len` bytes, or null.
    fn os_map(len: usize) -> *mut u8 {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no existing
        // memory; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return ptr::null_mut();
        }
        // SAFETY: `p..p+len` is the mapping just made. Advice only; failure (THP disabled, old kernel)
        // leaves ordinary pages, which is fine.
        unsafe {
            libc::madvise(p, len, libc::MADV_HUGEPAGE);
        }
        p.cast()
    }

    fn os_unmap(base: usize, len: usize) {
        // SAFETY: every caller passes a whole mapping made by `os_map`/`mremap` here, no longer in use.
        unsafe {
            libc::munmap(base as *mut libc::c_void, len);
        }
    }

    /// Write the header of the mapping at `base` and return its block.
    ///
    /// # Safety
    /// `base..base+len` must be a live mapping made here, at least `HEADER` long.
    #[allow(clippy::cast_ptr_alignment)] // `base` is a mapping's start: page aligned.
    unsafe fn finish(base: *mut u8, len: usize) -> *mut u8 {
        // SAFETY: the header page is the mapping's first page, page aligned for a usize.
        unsafe {
            base.cast::<usize>().write(len);
            base.add(HEADER)
        }
    }

    /// The mapping holding block `p`: its base and length.
    ///
    /// # Safety
    /// `p` must be a live block returned by [`alloc`], [`alloc_zeroed`] or [`realloc`].
    #[allow(clippy::cast_ptr_alignment)] // blocks are page aligned, so is their header.
    unsafe fn mapping_of(p: *mut u8) -> (*mut u8, usize) {
        // SAFETY: per the contract, the header page precedes `p` in the same mapping.
        unsafe {
            let base = p.sub(HEADER);
            (base, base.cast::<usize>().read())
        }
    }

    /// Grow the mapping `base..base+len` to `new_len` (moving it if need be; pages kept), or null with
    /// the mapping left as it was.
    ///
    /// # Safety
    /// `base..base+len` must be one live mapping made here.
    unsafe fn grow(base: *mut u8, len: usize, new_len: usize) -> *mut u8 {
        // SAFETY: per the contract; MREMAP_MAYMOVE lets the kernel move its page tables (the bytes
        // are not copied). On failure the old mapping is untouched.
        let q = unsafe { libc::mremap(base.cast(), len, new_len, libc::MREMAP_MAYMOVE) };
        if q == libc::MAP_FAILED {
            ptr::null_mut()
        } else {
            q.cast()
        }
    }

    /// A block of at least `size` bytes (contents unspecified), or null. `growing`: see [`Cache::take`].
    pub fn alloc(size: usize, growing: bool) -> *mut u8 {
        let Some(need) = mapping_len(size) else {
            return ptr::null_mut();
        };
        let reused = with_cache(|c| c.take(need, growing));
        let (base, len) = match reused {
            Some((base, len)) if len >= need => (base as *mut u8, len),
            Some((base, len)) => {
                // SAFETY: a kept mapping, now owned here.
                let q = unsafe { grow(base as *mut u8, len, need) };
                if q.is_null() {
                    os_unmap(base, len);
                    (os_map(need), need)
                } else {
                    (q, need)
                }
            }
            None => (os_map(need), need),
        };
        if base.is_null() {
            return base;
        }
        // SAFETY: `base..base+len` is a live mapping owned here, longer than `HEADER`.
        unsafe { finish(base, len) }
    }

    /// A zeroed block of at least `size` bytes, or null: always a fresh mapping (zeroed by the kernel).
    pub fn alloc_zeroed(size: usize) -> *mut u8 {
        let Some(need) = mapping_len(size) else {
            return ptr::null_mut();
        };
        let base = os_map(need);
        if base.is_null() {
            return base;
        }
        // SAFETY: a fresh mapping of `need` bytes; the header page is not part of the block.
        unsafe { finish(base, need) }
    }

    /// Free block `p`: kept for reuse, or unmapped.
    ///
    /// # Safety
    /// `p` must be a live block made here, not used afterwards.
    pub unsafe fn dealloc(p: *mut u8) {
        // SAFETY: per the contract.
        let (base, len) = unsafe { mapping_of(p) };
        // Only what may be kept is advised (before it is kept: once kept, another thread may take it).
        if len <= KEEP_BYTES && with_cache(|c| c.trimmers > 0) {
            // SAFETY: the whole mapping is ours and its contents no longer matter. Advice only: on
            // failure (a kernel before 4.5) the pages simply stay.
            unsafe {
                libc::madvise(base.cast(), len, libc::MADV_FREE);
            }
        }
        let mut out: Evicted = [None; KEEP_BLOCKS + 1];
        let kept = with_cache(|c| {
            let was_empty = c.bytes == 0;
            let kept = c.keep(base as usize, len, Instant::now(), &mut out);
            if kept && was_empty {
                // Trimmers sleep without a timeout while nothing is kept: give them one.
                CHANGED.notify_all();
            }
            kept
        });
        unmap_all(&out);
        if !kept {
            os_unmap(base as usize, len);
        }
    }

    /// Resize block `p` of `old_size` bytes to `new_size` bytes (contents kept up to the smaller size),
    /// or null with the block left as it was.
    ///
    /// # Safety
    /// `p` must be a live block made here for `old_size` bytes.
    pub unsafe fn realloc(p: *mut u8, old_size: usize, new_size: usize) -> *mut u8 {
        let Some(need) = mapping_len(new_size) else {
            return ptr::null_mut();
        };
        // SAFETY: per the contract.
        let (base, len) = unsafe { mapping_of(p) };
        if need <= len {
            // Growing within the mapping (a reused, larger one), or shrinking by less than half: stay.
            if new_size >= old_size || need >= len / 2 {
                return p;
            }
            // Shrunk to less than half: give the tail back. Shrinking a mapping never moves it.
            // SAFETY: `base+need..base+len` is the tail of this block's own mapping, beyond `new_size`.
            unsafe {
                libc::munmap(base.add(need).cast(), len - need);
                return finish(base, need);
            }
        }
        // SAFETY: per the contract, `base..base+len` is this block's mapping.
        let q = unsafe { grow(base, len, need) };
        if q.is_null() {
            return q;
        }
        // SAFETY: the grown mapping, `need` bytes.
        unsafe { finish(q, need) }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const M: usize = 1 << 20;

        fn cache() -> Cache {
            Cache {
                slots: [None; KEEP_BLOCKS],
                bytes: 0,
                trimmers: 1,
            }
        }

        fn evicted(out: &Evicted) -> Vec<usize> {
            out.iter().flatten().map(|&(base, _)| base).collect()
        }

        #[test]
        fn take_prefers_the_tightest_fit_or_for_growing_buffers_the_largest() {
            let now = Instant::now();
            let mut c = cache();
            let mut out: Evicted = [None; KEEP_BLOCKS + 1];
            assert!(c.keep(0x1000, 64 * M, now, &mut out));
            assert!(c.keep(0x2000, 16 * M, now, &mut out));
            assert!(c.keep(0x3000, 128 * M, now, &mut out));
            assert_eq!(c.bytes, 208 * M);
            assert_eq!(c.take(10 * M, false), Some((0x2000, 16 * M)));
            // A growing buffer takes the largest.
            assert_eq!(c.take(10 * M, true), Some((0x3000, 128 * M)));
            assert!(c.keep(0x3000, 128 * M, now, &mut out));
            assert_eq!(c.take(10 * M, false), Some((0x1000, 64 * M)));
            // Nothing fits 200 MiB: the largest is taken, to be grown.
            assert!(c.keep(0x4000, 8 * M, now, &mut out));
            assert_eq!(c.take(200 * M, false), Some((0x3000, 128 * M)));
            assert_eq!(c.take(1, false), Some((0x4000, 8 * M)));
            assert_eq!(c.take(1, true), None);
            assert_eq!(c.bytes, 0);
            assert!(evicted(&out).is_empty());
        }

        #[test]
        fn keep_evicts_the_oldest_to_stay_within_its_bounds() {
            let t0 = Instant::now();
            let mut c = cache();
            let mut out: Evicted = [None; KEEP_BLOCKS + 1];
            // Too large to keep at all; nothing is kept without a trimmer.
            assert!(!c.keep(0x9000, KEEP_BYTES + 1, t0, &mut out));
            c.trimmers = 0;
            assert!(!c.keep(0x9000, 8 * M, t0, &mut out));
            c.trimmers = 1;
            // Byte bound: the oldest go first.
            let quarter = KEEP_BYTES / 4;
            for i in 0..4 {
                let at = t0 + Duration::from_millis(i as u64);
                assert!(c.keep(0x1000 * (i + 1), quarter, at, &mut out));
            }
            assert_eq!(c.bytes, KEEP_BYTES);
            assert!(c.keep(0x7000, quarter + 1, t0 + Duration::from_millis(9), &mut out));
            assert_eq!(evicted(&out), vec![0x1000, 0x2000]);
            assert_eq!(c.bytes, 3 * quarter + 1);
            // Slot bound.
            let mut c = cache();
            let mut out: Evicted = [None; KEEP_BLOCKS + 1];
            for i in 0..=KEEP_BLOCKS {
                let at = t0 + Duration::from_millis(i as u64);
                assert!(c.keep(0x1000 * (i + 1), 8 * M, at, &mut out));
            }
            assert_eq!(evicted(&out), vec![0x1000]);
            assert_eq!(c.bytes, KEEP_BLOCKS * 8 * M);
        }

        #[test]
        fn blocks_kept_too_long_expire() {
            let t0 = Instant::now();
            let mut c = cache();
            let mut out: Evicted = [None; KEEP_BLOCKS + 1];
            assert!(c.keep(0x1000, 8 * M, t0, &mut out));
            assert!(c.keep(0x2000, 8 * M, t0 + Duration::from_secs(5), &mut out));
            c.expire(
                t0 + KEEP_FOR.saturating_sub(Duration::from_millis(1)),
                &mut out,
            );
            assert!(evicted(&out).is_empty());
            c.expire(t0 + KEEP_FOR, &mut out);
            assert_eq!(evicted(&out), vec![0x1000]);
            assert_eq!(c.bytes, 8 * M);
            assert_eq!(c.take(1, false), Some((0x2000, 8 * M)));
        }
    }
}

#[cfg(target_os = "linux")]
fn is_large(size: usize, align: usize) -> bool {
    size >= LARGE && align <= large::MAX_ALIGN
}

#[cfg(not(target_os = "linux"))]
fn is_large(_size: usize, _align: usize) -> bool {
    false
}

// SAFETY: every block is served by exactly one of two allocators, chosen by `is_large(size, align)` of
// its layout; Rust passes the same layout (same size and align) back on `dealloc`/`realloc`, so a
// block always returns to the allocator that made it. `realloc` across the threshold copies between the
// two. Mapped blocks are page aligned, which satisfies every align `is_large` accepts.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if is_large(layout.size(), layout.align()) {
            return large::alloc(layout.size(), false);
        }
        // SAFETY: forwarded with the caller's guarantees (non-zero size).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if is_large(layout.size(), layout.align()) {
            return large::alloc_zeroed(layout.size());
        }
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        if is_large(layout.size(), layout.align()) {
            // SAFETY: a large layout means `large` made this block.
            unsafe { large::dealloc(ptr) };
            return;
        }
        // SAFETY: a small layout means `System` made this block.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let was_large = is_large(layout.size(), layout.align());
        let will_be_large = is_large(new_size, layout.align());
        match (was_large, will_be_large) {
            // SAFETY: a small block made by `System`, staying small.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            #[cfg(target_os = "linux")]
            // SAFETY: a block made by `large`.
            (true, true) => unsafe { large::realloc(ptr, layout.size(), new_size) },
            _ => {
                // Crossing the threshold: a new block from the other allocator, then copy.
                // SAFETY: `new_size` is non-zero and, rounded to `align`, does not overflow (the
                // `realloc` contract), so this layout is valid.
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                #[cfg(target_os = "linux")]
                let new = if will_be_large {
                    // A buffer growing past the threshold: give it room to keep growing.
                    large::alloc(new_size, true)
                } else {
                    // SAFETY: a valid non-zero layout.
                    unsafe { System.alloc(new_layout) }
                };
                #[cfg(not(target_os = "linux"))]
                // SAFETY: a valid non-zero layout.
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    // SAFETY: both blocks are live, distinct, and at least this long.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `/proc/self/smaps` entry of the mapping that holds `addr`.
    #[cfg(target_os = "linux")]
    fn smaps_entry(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let mut current: Option<String> = None;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    if let Some(done) = current.take() {
                        return done;
                    }
                    if (a..b).contains(&addr) {
                        current = Some(String::new());
                    }
                    continue;
                }
            }
            if let Some(c) = current.as_mut() {
                c.push_str(line);
                c.push('\n');
            }
        }
        current.unwrap_or_default()
    }

    #[test]
    fn vec_keeps_its_bytes_growing_and_shrinking_across_the_threshold() {
        let mut v: Vec<u8> = Vec::new();
        let mut expected_sum: u64 = 0;
        // Push byte by byte through small → large → larger, as a read buffer grows.
        for i in 0..(3 * LARGE + 12345) {
            let b = (i % 251) as u8;
            v.push(b);
            expected_sum += u64::from(b);
        }
        assert!(v.capacity() >= 3 * LARGE);
        let sum: u64 = v.iter().map(|&b| u64::from(b)).sum();
        assert_eq!(sum, expected_sum);
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        // Shrink to large, then to small: the prefix survives both.
        v.truncate(LARGE + 7);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        v.truncate(1000);
        v.shrink_to_fit();
        assert_eq!(v.len(), 1000);
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }

    #[test]
    fn zeroed_and_aligned_blocks() {
        let z = vec![0u8; 2 * LARGE];
        assert!(z.iter().all(|&b| b == 0));
        let big = vec![7u64; LARGE / 8 + 3];
        assert_eq!(big.as_ptr() as usize % 8, 0);
        assert!(big.iter().all(|&x| x == 7));

        // Page-aligned blocks are mapped; wider alignments go to the system allocator. Both honour
        // their alignment, through alloc, realloc across the threshold, and dealloc.
        for align in [4096, 65536] {
            let layout = Layout::from_size_align(LARGE, align).unwrap_or_else(|e| panic!("{e}"));
            // SAFETY: a valid non-zero layout; the block is written within its size, grown and shrunk
            // with the same layout's align, and freed once with its current size.
            unsafe {
                let p = Allocator.alloc(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0);
                p.write_bytes(3, LARGE);
                let q = Allocator.realloc(p, layout, 2 * LARGE);
                assert!(!q.is_null());
                assert_eq!(q as usize % align, 0);
                assert_eq!(*q.add(LARGE - 1), 3);
                let grown = Layout::from_size_align_unchecked(2 * LARGE, align);
                let r = Allocator.realloc(q, grown, 4096);
                assert!(!r.is_null());
                assert_eq!(r as usize % align, 0);
                assert_eq!(*r.add(4095), 3);
                Allocator.dealloc(r, Layout::from_size_align_unchecked(4096, align));
            }
        }
    }

    #[test]
    fn a_string_of_64_mib_round_trips() {
        let s = "é".repeat(32 << 20);
        let mut t = String::with_capacity(16);
        t.push_str(&s);
        assert_eq!(t.len(), 64 << 20);
        assert_eq!(s, t);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn large_blocks_are_their_own_mappings_marked_for_huge_pages() {
        let v = vec![1u8; LARGE];
        let entry = smaps_entry(v.as_ptr() as usize);
        assert!(!entry.is_empty(), "no mapping holds the block");
        let size_kb: usize = entry
            .lines()
            .find_map(|l| l.strip_prefix("Size:"))
            .and_then(|l| l.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        // At least the block (the kernel may merge it with a neighbouring block mapped alike).
        assert!(
            size_kb * 1024 >= LARGE,
            "the block is not a mapping:\n{entry}"
        );
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            // `hg` is the VmFlags mark of MADV_HUGEPAGE.
            let flags = entry
                .lines()
                .find(|l| l.starts_with("VmFlags:"))
                .unwrap_or("");
            assert!(
                flags.split_whitespace().any(|f| f == "hg"),
                "no MADV_HUGEPAGE: {flags}"
            );
        }
        drop(v);

        // A small block stays with malloc: its mapping (the heap) is not marked.
        let small = vec![1u8; 4096];
        let entry = smaps_entry(small.as_ptr() as usize);
        let flags = entry
            .lines()
            .find(|l| l.starts_with("VmFlags:"))
            .unwrap_or("");
        assert!(!flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }
}
