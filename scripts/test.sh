#!/usr/bin/env bash
# The README's test command: sets the machine up (scripts/setup.sh), then runs every test —
# Rust unit and integration tests, then pytest against a real Blender (headless, and GUI under Xvfb),
# then the core tests in PyPI bpy 4.5 LTS. Arguments go to pytest (and skip the bpy run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "==> lints: cargo fmt, clippy (warnings are errors), ruff" >&2
cargo fmt --check
cargo clippy --quiet --all-targets -- -D warnings
ruff check bld_remote tests bench scripts
ruff format --check bld_remote tests bench scripts
echo "==> cargo test" >&2
cargo test --quiet
echo "==> fuzz the request decoder (30 s; libFuzzer when nightly + cargo-fuzz are there)" >&2
bash scripts/fuzz.sh 30
echo "==> pytest (real Blender: Debian's blender, headless and under Xvfb)" >&2
python -m pytest tests -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
  echo "==> the core tests again in PyPI bpy 4.5 LTS (Blender as a Python module)" >&2
  bash scripts/test-bpy.sh 4.5.15
fi
