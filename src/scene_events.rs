//! `scene_generation`: a number that grows whenever objects, materials or collections are added or removed
//! in this Blender (or a file is loaded), reported by `get_status` on the network thread so that
//! `bld-remote mcp` can send `notifications/resources/list_changed` without asking Blender's main thread.
//!
//! The add-on's handlers (`bld_remote/datablocks.py`: Blender's `depsgraph_update_post` and `load_post`, and
//! after each `execute_code`) call [`note_datablock_counts`] with three lengths; it compares them with the
//! last ones here, with atomics only. [`live_info`] is the `get_status` hook (read on network threads,
//! never taking the GIL). The statics outlive a service restart, so the number never goes back.

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;
use serde_json::{Map, Value};

use bld_remote_core::config::LiveInfo;

static GENERATION: AtomicU64 = AtomicU64::new(0);
/// The last counts seen: objects, materials, collections (`u64::MAX` before the first).
static COUNTS: [AtomicU64; 3] = [
    AtomicU64::new(u64::MAX),
    AtomicU64::new(u64::MAX),
    AtomicU64::new(u64::MAX),
];

/// Record the numbers of objects, materials and collections; returns whether they differ from the last
/// ones (`scene_generation` then grows by one). The first call only records them.
#[pyfunction]
pub fn note_datablock_counts(objects: u64, materials: u64, collections: u64) -> bool {
    let mut changed = false;
    let mut first = false;
    for (slot, n) in COUNTS.iter().zip([objects, materials, collections]) {
        let old = slot.swap(n, Ordering::Relaxed);
        first |= old == u64::MAX;
        changed |= old != n;
    }
    if changed && !first {
        GENERATION.fetch_add(1, Ordering::Relaxed);
    }
    changed && !first
}

/// Make `scene_generation` grow (a file was loaded: everything may be new, even with the same counts).
#[pyfunction]
pub fn bump_scene_generation() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The number now.
#[pyfunction]
pub fn scene_generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// The `get_status` hook: adds `scene_generation`.
pub fn live_info() -> LiveInfo {
    LiveInfo(Some(std::sync::Arc::new(|m: &mut Map<String, Value>| {
        m.insert(
            "scene_generation".into(),
            Value::from(GENERATION.load(Ordering::Relaxed)),
        );
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_in_some_count_grows_the_generation() {
        let g = scene_generation();
        note_datablock_counts(3, 1, 0);
        let after_first = scene_generation();
        assert!(after_first <= g + 1);
        assert!(!note_datablock_counts(3, 1, 0));
        assert_eq!(scene_generation(), after_first);
        assert!(note_datablock_counts(4, 1, 0));
        assert!(note_datablock_counts(4, 1, 1));
        assert_eq!(scene_generation(), after_first + 2);
        bump_scene_generation();
        assert_eq!(scene_generation(), after_first + 3);
        let mut m = Map::new();
        live_info().fill(&mut m);
        assert_eq!(
            m.get("scene_generation"),
            Some(&Value::from(after_first + 3))
        );
    }
}
