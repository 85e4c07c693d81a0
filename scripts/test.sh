#!/usr/bin/env bash
# The README's test command: sets the machine up (scripts/setup.sh), then runs every test —
# Rust unit and integration tests, then pytest against a real Blender (headless, and GUI under Xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "==> cargo test" >&2
cargo test --quiet
echo "==> pytest (real Blender)" >&2
python -m pytest tests -p no:cacheprovider "$@"
