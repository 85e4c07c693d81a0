#!/usr/bin/env bash
# Fuzz the request decoder for a bounded time (default 60 s): scripts/fuzz.sh [SECONDS]
#
# With a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`, `cargo install cargo-fuzz`)
# this runs the libFuzzer target fuzz/fuzz_targets/decoder.rs with AddressSanitizer, starting from the
# seeds in fuzz/seeds; a crash leaves its input in fuzz/artifacts/decoder/ and fails the script.
# Without them it falls back to the libFuzzer-free randomized test of the same invariants (cargo test),
# scaled to the time budget, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-${FUZZ_SECONDS:-60}}"

if rustup toolchain list 2>/dev/null | grep -q '^nightly' && command -v cargo-fuzz >/dev/null 2>&1; then
    mkdir -p fuzz/corpus/decoder
    echo "fuzz: cargo +nightly fuzz run decoder for ${seconds}s"
    exec cargo +nightly fuzz run decoder fuzz/corpus/decoder fuzz/seeds -- \
        -max_total_time="${seconds}" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
fi

echo "fuzz: nightly or cargo-fuzz missing; running the randomized decoder test instead (no coverage guidance)" >&2
# About 20k inputs per second on one core in a release build.
iterations=$(( seconds * 20000 ))
BLD_REMOTE_FUZZ_ITERATIONS="${iterations}" exec cargo test --release --lib \
    protocol::tests::randomized_streams_keep_the_decoder_invariants -- --exact
