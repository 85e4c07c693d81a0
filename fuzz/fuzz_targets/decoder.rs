//! libFuzzer target: the incremental request decoder and request parser (src/protocol.rs) on arbitrary
//! bytes split into arbitrary reads. The invariants live in `protocol::fuzz_check_decoder`, which a
//! randomized `cargo test` also runs. The module is compiled straight from the source file so the target
//! does not link pyo3 or libpython.
#![no_main]

#[path = "../../src/protocol.rs"]
#[allow(dead_code)]
mod protocol;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    protocol::fuzz_check_decoder(data);
});
