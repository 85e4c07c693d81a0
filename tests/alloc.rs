//! The extension's allocator keeps freed large blocks warm for reuse (src/alloc.rs). These tests have a
//! process of their own and run one at a time: nothing else allocates large blocks meanwhile, so the
//! counts are exact.
#![cfg(target_os = "linux")]

use bld_remote::alloc::{kept_bytes, release_kept, run_trimmer, wake_trimmers, LARGE};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Held by each test: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
use std::time::{Duration, Instant};

/// Minor page faults of this process so far.
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; minflt is field 10 of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .nth(7)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}

/// Write every page of `v` (as a request's bytes would be), returning the minor faults it took.
fn touch(v: &mut [u8], byte: u8) -> u64 {
    let before = minor_faults();
    for chunk in v.chunks_mut(4096) {
        chunk[0] = byte;
    }
    minor_faults() - before
}

/// A running trimmer (as a service has), stopped and joined when dropped.
struct Trimmer(Option<std::thread::JoinHandle<()>>, Arc<AtomicBool>);

impl Trimmer {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let t = Trimmer(Some(std::thread::spawn(move || run_trimmer(&flag))), stop);
        // Until it has registered, frees are not kept.
        std::thread::sleep(Duration::from_millis(50));
        t
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        self.1.store(true, Ordering::SeqCst);
        wake_trimmers();
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// Allocate, write and free a block of 2 × LARGE bytes (`black_box`: the compiler may not elide it).
fn free_a_large_block() {
    drop(std::hint::black_box(vec![1u8; 2 * LARGE]));
}

#[test]
fn without_a_service_nothing_is_kept() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    free_a_large_block();
    assert_eq!(kept_bytes(), 0);
    // A trimmer's end releases what was kept.
    let t = Trimmer::start();
    free_a_large_block();
    assert!(kept_bytes() >= 2 * LARGE);
    drop(t);
    assert_eq!(kept_bytes(), 0);
}

#[test]
fn freed_large_blocks_are_reused_warm_and_released() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let _trimmer = Trimmer::start();
    release_kept();
    assert_eq!(kept_bytes(), 0);
    let size = 4 * LARGE;
    let mut first: Vec<u8> = Vec::with_capacity(size);
    first.resize(size, 1);
    let address = first.as_ptr() as usize;
    drop(first);
    let kept = kept_bytes();
    assert!(
        kept >= size,
        "a freed {size}-byte block is not kept: {kept}"
    );

    // The next block of that size is the same warm mapping: writing it takes (next to) no fault.
    let mut again: Vec<u8> = Vec::with_capacity(size);
    assert_eq!(again.as_ptr() as usize, address);
    assert_eq!(kept_bytes(), 0);
    again.resize(size, 2);
    let warm = touch(&mut again, 3);
    // A smaller block reuses it too, and growing within the mapping does not move it.
    drop(again);
    let mut smaller: Vec<u8> = Vec::with_capacity(LARGE);
    assert_eq!(smaller.as_ptr() as usize, address);
    smaller.reserve_exact(LARGE + LARGE / 2);
    assert_eq!(smaller.as_ptr() as usize, address);
    // Within the kept mapping (its header page and rounding aside).
    let within = size - (1 << 20);
    smaller.reserve_exact(within);
    assert_eq!(smaller.as_ptr() as usize, address);
    let before = minor_faults();
    smaller.resize(within, 5);
    let grown = minor_faults() - before;
    assert_eq!(smaller.as_ptr() as usize, address);
    assert!(
        grown * 4 <= warm.max(1) * 4 + 1,
        "growing in a kept mapping took {grown} faults"
    );
    // Shrunk to less than half, the tail goes back to the system; the block stays where it is.
    smaller.truncate(LARGE);
    smaller.fill(1);
    smaller.shrink_to_fit();
    assert_eq!(smaller.as_ptr() as usize, address);
    assert!(smaller.iter().all(|&b| b == 1));
    drop(smaller);

    // Released, the next block is fresh memory, faulted in as it is written.
    release_kept();
    assert_eq!(kept_bytes(), 0);
    let mut fresh: Vec<u8> = vec![0; size];
    let cold = touch(&mut fresh, 4);
    assert!(fresh.iter().step_by(4096).all(|&b| b == 4));
    drop(fresh);
    eprintln!("page faults writing {size} bytes: kept block {warm}, fresh block {cold}");
    assert!(
        warm * 4 <= cold.max(4),
        "reusing a kept block took {warm} faults, a fresh one {cold}"
    );
    // Zeroed blocks are always fresh: all zero even where a kept block held other bytes.
    let mut dirty: Vec<u8> = Vec::with_capacity(size);
    dirty.resize(size, 9);
    drop(dirty);
    let zeroed: Vec<u8> = vec![0; size];
    assert!(zeroed.iter().all(|&b| b == 0));
    drop(zeroed);
    release_kept();
    assert_eq!(kept_bytes(), 0);
}

#[test]
fn a_trimmer_unmaps_kept_blocks_once_unused_and_stops_when_asked() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    release_kept();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let trimmer = std::thread::spawn(move || run_trimmer(&flag));
    // Nothing kept: the trimmer sleeps. Then a block is freed and kept.
    std::thread::sleep(Duration::from_millis(100));
    let freed = Instant::now();
    free_a_large_block();
    assert!(kept_bytes() >= 2 * LARGE);
    // Unmapped 10 s (KEEP_FOR) after it was freed, without any other allocation meanwhile.
    while kept_bytes() > 0 && freed.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = freed.elapsed();
    assert_eq!(kept_bytes(), 0, "still kept after {after:?}");
    assert!(
        after >= Duration::from_secs(10),
        "unmapped after only {after:?}"
    );
    stop.store(true, Ordering::SeqCst);
    wake_trimmers();
    let asked = Instant::now();
    assert!(trimmer.join().is_ok());
    assert!(asked.elapsed() < Duration::from_secs(2));
}
