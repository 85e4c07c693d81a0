//! The persist store: values kept in the service (not in Blender data) under string keys, shared by every
//! client for as long as the service runs (`put_persist_data`, `get_persist_data`, `remove_persist_data`;
//! later also an in-Blender API over the same store). Bounded: a value's size, the total bytes and the
//! number of keys are limited, each with a clear error, and values are shared, never copied: a value is
//! stored as an `Arc<Value>` and a `get` hands out another reference to it, which the reply is serialised
//! from with the store's lock already released.
//!
//! Sizes are the bytes of a value's compact JSON encoding (what `get_persist_data` writes into a reply),
//! counted exactly without encoding it ([`encoded_len`]); a key costs its UTF-8 length. Pure data; runs on
//! connection threads (reader) and whichever thread calls it, under one short-held lock.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;

use crate::protocol::needs_escape;

/// Default limit on one value: 64 MiB of JSON, the size of the largest request the service reads by default.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 64 * 1024 * 1024;
/// Default limit on all values and keys together: 256 MiB.
pub const DEFAULT_MAX_TOTAL_BYTES: usize = 256 * 1024 * 1024;
/// Default limit on the number of keys.
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// Longest key, in UTF-8 bytes (a fixed limit: keys are names, not data).
pub const MAX_KEY_BYTES: usize = 1024;

/// The store's bounds (config knobs `persist_max_value_bytes`, `persist_max_total_bytes`,
/// `persist_max_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_value_bytes: usize,
    pub max_total_bytes: usize,
    pub max_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

/// Why a `put` was refused. The store is unchanged after any of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutError {
    KeyTooLong {
        bytes: usize,
        limit: usize,
    },
    ValueTooLarge {
        bytes: usize,
        limit: usize,
    },
    TooManyKeys {
        limit: usize,
    },
    Full {
        used: usize,
        needed: usize,
        limit: usize,
    },
}

impl std::fmt::Display for PutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::KeyTooLong { bytes, limit } => write!(
                f,
                "persist key too long: {bytes} bytes, the limit is {limit} bytes"
            ),
            Self::ValueTooLarge { bytes, limit } => write!(
                f,
                "persist value too large: {bytes} bytes of JSON, the limit is {limit} bytes \
                 (persist_max_value_bytes)"
            ),
            Self::TooManyKeys { limit } => write!(
                f,
                "persist store full: it holds {limit} keys, the limit (persist_max_keys); remove some first"
            ),
            Self::Full {
                used,
                needed,
                limit,
            } => write!(
                f,
                "persist store full: {used} bytes stored, this value needs {needed} more, the limit is \
                 {limit} bytes (persist_max_total_bytes); remove some first"
            ),
        }
    }
}

impl std::error::Error for PutError {}

#[derive(Debug)]
struct Entry {
    value: Arc<Value>,
    /// The key's bytes plus the value's encoded bytes: what the entry counts against the total.
    cost: usize,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Entry>,
    total: usize,
}

/// The store: a map from key to shared value, within [`Limits`].
#[derive(Debug)]
pub struct PersistStore {
    limits: Limits,
    inner: Mutex<Inner>,
}

impl PersistStore {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Store `value` under `key` (replacing what was there), or refuse it and change nothing. The value is
    /// moved in, not copied; its size is measured before the lock is taken.
    pub fn put(&self, key: String, value: Value) -> Result<(), PutError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(PutError::KeyTooLong {
                bytes: key.len(),
                limit: MAX_KEY_BYTES,
            });
        }
        let bytes = encoded_len(&value);
        if bytes > self.limits.max_value_bytes {
            return Err(PutError::ValueTooLarge {
                bytes,
                limit: self.limits.max_value_bytes,
            });
        }
        let cost = key.len().saturating_add(bytes);
        let value = Arc::new(value);
        let old = {
            let mut inner = self.inner.lock();
            let replaced = inner.map.get(&key).map_or(0, |e| e.cost);
            if replaced == 0 && inner.map.len() >= self.limits.max_keys {
                return Err(PutError::TooManyKeys {
                    limit: self.limits.max_keys,
                });
            }
            let after = inner.total - replaced + cost;
            if after > self.limits.max_total_bytes {
                return Err(PutError::Full {
                    used: inner.total - replaced,
                    needed: cost,
                    limit: self.limits.max_total_bytes,
                });
            }
            inner.total = after;
            inner.map.insert(key, Entry { value, cost })
        };
        // A replaced value is freed here, outside the lock (it may be large).
        drop(old);
        Ok(())
    }

    /// The value under `key`: a shared reference, never a copy.
    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.inner.lock().map.get(key).map(|e| Arc::clone(&e.value))
    }

    /// Remove `key`; whether it was there.
    pub fn remove(&self, key: &str) -> bool {
        let old = {
            let mut inner = self.inner.lock();
            let old = inner.map.remove(key);
            if let Some(e) = &old {
                inner.total -= e.cost;
            }
            old
        };
        old.is_some()
    }

    /// The stored keys, in no particular order.
    pub fn keys(&self) -> Vec<String> {
        self.inner.lock().map.keys().cloned().collect()
    }

    /// `(keys, bytes)` stored now, for `get_status`.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.map.len(), inner.total)
    }
}

/// The exact length of `value`'s compact JSON encoding (as `protocol::write_json` and `serde_json` write
/// it), without building it.
pub fn encoded_len(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::Number(n) => n.to_string().len(),
        Value::String(s) => str_len(s),
        Value::Array(items) => {
            2 + items.len().saturating_sub(1) + items.iter().map(encoded_len).sum::<usize>()
        }
        Value::Object(m) => {
            2 + m.len().saturating_sub(1)
                + m.iter()
                    .map(|(k, v)| str_len(k) + 1 + encoded_len(v))
                    .sum::<usize>()
        }
    }
}

/// Length of `s` as a JSON string, quotes included, escaped as `serde_json` escapes.
fn str_len(s: &str) -> usize {
    if !needs_escape(s) {
        return s.len() + 2;
    }
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn small(max_value_bytes: usize, max_total_bytes: usize, max_keys: usize) -> PersistStore {
        PersistStore::new(Limits {
            max_value_bytes,
            max_total_bytes,
            max_keys,
        })
    }

    #[test]
    fn encoded_len_is_exact() {
        for v in [
            json!(null),
            json!(true),
            json!(false),
            json!(-12.5),
            json!(18_446_744_073_709_551_615_u64),
            json!("plain"),
            json!("q\"b\\n\n\t\r\u{8}\u{c}\u{1}\u{1f}é😀"),
            json!([]),
            json!({}),
            json!([1, [2, {"a\n": [null, "x"]}], {}]),
            json!({"k": {"l": [1.5e300, -0.0, "z"]}, "": ""}),
        ] {
            assert_eq!(
                encoded_len(&v),
                serde_json::to_vec(&v).unwrap().len(),
                "{v}"
            );
        }
    }

    #[test]
    fn put_get_remove_share_values() {
        let s = PersistStore::new(Limits::default());
        s.put("a".into(), json!({"x": [1, 2]})).unwrap();
        let one = s.get("a").unwrap();
        let two = s.get("a").unwrap();
        assert!(Arc::ptr_eq(&one, &two), "a get shares the stored value");
        assert_eq!(*one, json!({"x": [1, 2]}));
        assert_eq!(s.keys(), vec!["a".to_string()]);
        assert!(s.remove("a"));
        assert!(!s.remove("a"));
        assert!(s.get("a").is_none());
        assert_eq!(s.usage(), (0, 0));
        // The reference handed out outlives the removal.
        assert_eq!(one["x"][1], 2);
    }

    #[test]
    fn each_limit_refuses_and_changes_nothing() {
        let s = small(10, 20, 2);
        assert_eq!(
            s.put("k".repeat(MAX_KEY_BYTES + 1), json!(1)),
            Err(PutError::KeyTooLong {
                bytes: MAX_KEY_BYTES + 1,
                limit: MAX_KEY_BYTES
            })
        );
        assert_eq!(
            s.put("a".into(), json!("0123456789")),
            Err(PutError::ValueTooLarge {
                bytes: 12,
                limit: 10
            })
        );
        s.put("a".into(), json!("01234567")).unwrap(); // 1 + 10
        assert!(matches!(
            s.put("b".into(), json!("0123456")),
            Err(PutError::Full { .. })
        )); // 11 + 1 + 9 > 20
        s.put("b".into(), json!(12_345)).unwrap(); // 11 + 6 = 17
        assert_eq!(
            s.put("c".into(), json!(1)),
            Err(PutError::TooManyKeys { limit: 2 })
        );
        assert_eq!(s.usage(), (2, 17));
        // Replacing a key counts the old value out first: not "too many keys", not "full".
        s.put("a".into(), json!("0123456")).unwrap(); // 1 + 9, + 6
        assert_eq!(s.usage(), (2, 16));
        assert!(s.remove("b"));
        s.put("c".into(), json!(1)).unwrap(); // 10 + 2
        assert_eq!(s.usage(), (2, 12));
        for e in [
            PutError::KeyTooLong { bytes: 2, limit: 1 },
            PutError::ValueTooLarge { bytes: 2, limit: 1 },
            PutError::TooManyKeys { limit: 1 },
            PutError::Full {
                used: 1,
                needed: 2,
                limit: 2,
            },
        ] {
            assert!(e.to_string().contains("limit"), "{e}");
        }
    }
}
