//! The extension's global allocator: large buffers come straight from the kernel as transparent huge
//! pages, everything else from the process's own `malloc`.
//!
//! Why: inside Blender, `malloc` is Blender's jemalloc, which serves allocations of 8 MiB and more from a
//! dedicated arena that returns their pages to the kernel as soon as they are freed. A 64 MiB request
//! therefore met fresh memory at every step — the read buffer growing 8 → 16 → 32 → 64 MiB (each step a
//! copy into new pages), the parsed string, the reply — and the kernel faulted and zeroed it 4 KiB at a
//! time: about 85,000 page faults and 55–60 % of the service's time per 64 MiB request (`perf stat`,
//! `perf record` on Blender, docs/BENCHMARKS.md). Here a large block is its own anonymous mapping marked
//! `MADV_HUGEPAGE` (faulted 2 MiB at a time where the kernel allows it) and grows with `mremap`, which
//! moves page tables instead of copying bytes: the same request now takes about 600 faults. Freed large
//! blocks are unmapped at once: nothing is kept after a request, as before.
//!
//! Small blocks (below [`LARGE`]) and over-aligned ones still go to [`System`], where the allocator's own
//! caches serve them well. Off Linux everything goes to [`System`].
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of this size or more are mapped directly. It is jemalloc's own "oversize" threshold: below
/// it, Blender's `malloc` reuses warm cached memory, which a fresh mapping cannot beat (4 MiB requests
/// back to back: 5.4 ms from jemalloc, 8.5 ms from fresh huge pages with a 2 MiB threshold).
pub const LARGE: usize = 8 << 20;

/// The allocator installed by this crate (`#[global_allocator]` in lib.rs).
pub struct Allocator;

#[cfg(target_os = "linux")]
mod large {
    use std::ptr;

    /// Mappings are rounded to the huge page size, so that the kernel can place them on a huge page
    /// boundary and back all of them with huge pages. Untouched tail pages cost nothing.
    const GRANULE: usize = 2 << 20;
    /// Alignments a mapping always satisfies (mappings start on a page; pages are at least 4 KiB).
    pub const MAX_ALIGN: usize = 4096;

    fn mapping_len(size: usize) -> Option<usize> {
        size.checked_add(GRANULE - 1).map(|n| n & !(GRANULE - 1))
    }

    /// A fresh zeroed mapping of at least `size` bytes, or null.
    pub fn map(size: usize) -> *mut u8 {
        let Some(len) = mapping_len(size) else {
            return ptr::null_mut();
        };
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

    /// Unmap a block made by [`map`] or [`remap`] for `size` bytes.
    ///
    /// # Safety
    /// `p` must be such a block, with the `size` it was made for, and not used afterwards.
    pub unsafe fn unmap(p: *mut u8, size: usize) {
        if let Some(len) = mapping_len(size) {
            // SAFETY: per the contract, `p..p+len` is exactly one mapping made here.
            unsafe {
                libc::munmap(p.cast(), len);
            }
        }
    }

    /// Grow or shrink a block made by [`map`] (contents kept, new bytes zeroed), or null with the block
    /// left as it was.
    ///
    /// # Safety
    /// `p` must be a block made by [`map`]/[`remap`] for `old_size` bytes.
    pub unsafe fn remap(p: *mut u8, old_size: usize, new_size: usize) -> *mut u8 {
        let (Some(old_len), Some(new_len)) = (mapping_len(old_size), mapping_len(new_size)) else {
            return ptr::null_mut();
        };
        if old_len == new_len {
            return p;
        }
        // SAFETY: `p..p+old_len` is one mapping made here; MREMAP_MAYMOVE lets the kernel move its
        // page tables (the bytes are not copied). On failure the old mapping is untouched.
        let q = unsafe { libc::mremap(p.cast(), old_len, new_len, libc::MREMAP_MAYMOVE) };
        if q == libc::MAP_FAILED {
            return ptr::null_mut();
        }
        q.cast()
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
            return large::map(layout.size());
        }
        // SAFETY: forwarded with the caller's guarantees (non-zero size).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if is_large(layout.size(), layout.align()) {
            // Fresh anonymous mappings are zero-filled by the kernel.
            return large::map(layout.size());
        }
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        if is_large(layout.size(), layout.align()) {
            // SAFETY: a large layout means `alloc` mapped this block for this size.
            unsafe { large::unmap(ptr, layout.size()) };
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
            // SAFETY: a mapped block made for `layout.size()`.
            (true, true) => unsafe { large::remap(ptr, layout.size(), new_size) },
            _ => {
                // Crossing the threshold: a new block from the other allocator, then copy.
                // SAFETY: `new_size` is non-zero and, rounded to `align`, does not overflow (the
                // `realloc` contract), so this layout is valid.
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
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
