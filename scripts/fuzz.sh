#!/usr/bin/env bash
# Coverage-guided fuzzing of the request decoder for a bounded time (default 60 s): scripts/fuzz.sh [SECONDS]
#
# Runs the libFuzzer target fuzz/fuzz_targets/decoder.rs (over crates/core's decoder and request parser,
# with AddressSanitizer) from the seeds in fuzz/seeds. A crash leaves its input in fuzz/artifacts/decoder/
# and fails the script. Needs no nightly toolchain: cargo-fuzz is installed from crates.io (pinned) and the
# stable compiler accepts its -Z flags with RUSTC_BOOTSTRAP=1, which is set for these commands only.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-${FUZZ_SECONDS:-60}}"
CARGO_FUZZ_VERSION=0.13.1

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (crates.io)" >&2
    cargo install --quiet --locked "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi
mkdir -p fuzz/corpus/decoder
echo "fuzz: cargo fuzz run decoder for ${seconds}s (stable toolchain, RUSTC_BOOTSTRAP=1)" >&2
RUSTC_BOOTSTRAP=1 cargo fuzz run decoder fuzz/corpus/decoder fuzz/seeds -- \
    -max_total_time="${seconds}" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
