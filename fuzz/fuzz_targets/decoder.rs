//! libFuzzer target: the incremental request decoder and request parser (crates/core/src/protocol) on
//! arbitrary bytes split into arbitrary reads. The invariants live in `protocol::fuzz_check_decoder`, which a
//! randomized `cargo test` also runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bld_remote_core::protocol::fuzz_check_decoder(data);
});
