#!/usr/bin/env bash
# The README's test command: sets the machine up (scripts/setup.sh), then runs every test —
# lints and type checks, Rust unit and integration tests of the whole workspace, coverage-guided fuzzing of
# the request decoder, pytest against a real Blender (Debian's 3.4.1 headless, and GUI under Xvfb), then the
# core tests in PyPI bpy 4.5 LTS (Python 3.11) and 5.3 (Python 3.13). Arguments go to pytest (and skip the
# bpy runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "==> lints: cargo fmt, clippy (warnings are errors), ruff (no dead noqa)" >&2
cargo fmt --all --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
ruff check --extend-select RUF100 bld_remote tests bench scripts
ruff format --check bld_remote tests bench scripts
echo "==> type checks: mypy on bld_remote, stubtest of bld_remote._core against its .pyi" >&2
bash scripts/typecheck.sh
echo "==> cargo test --workspace" >&2
cargo test --quiet --workspace
echo "==> fuzz the request decoder (30 s, libFuzzer through cargo-fuzz)" >&2
bash scripts/fuzz.sh 30
echo "==> pytest (real Blender: Debian's blender, headless and under Xvfb)" >&2
set +e
python -m pytest tests -p no:cacheprovider "$@"
rc=$?
set -e
# pytest's 5 means "no test ran": that is a failure here, never a pass.
[ $rc -eq 0 ] || exit $rc
if [ $# -eq 0 ]; then
  echo "==> the core tests again in PyPI bpy 4.5 LTS and 5.3 (Blender as a Python module)" >&2
  bash scripts/test-bpy.sh 4.5.15 5.3.0
fi
