#!/usr/bin/env bash
# Installs what bld_remote needs on a fresh Debian machine and builds it. Idempotent: quick when done before.
#   - Debian packages: Blender (3.4.1), Xvfb for GUI tests
#   - .venv: maturin, pytest and friends (pinned), then the bld_remote wheel built from this checkout
# Needs: a Rust toolchain (cargo >= 1.88) and Python >= 3.10 with venv.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v blender >/dev/null || need_apt+=(blender)
command -v xvfb-run >/dev/null || need_apt+=(xvfb)
command -v xauth >/dev/null || need_apt+=(xauth)
dpkg -s libgl1-mesa-dri >/dev/null 2>&1 || need_apt+=(libgl1-mesa-dri)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "error: cargo not found: install a Rust toolchain (>= 1.88)" >&2; exit 1; }
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! cmp -s requirements-dev.txt .venv/.requirements-dev.txt 2>/dev/null; then
  say "pip install -r requirements-dev.txt"
  pip install -q --disable-pip-version-check -r requirements-dev.txt
  cp requirements-dev.txt .venv/.requirements-dev.txt
fi

say "building the wheel (maturin build --release)"
rm -rf dist
maturin build --release -q -o dist 2>&1 | grep -v '^🔗\|^🐍\|^📡' >&2 || true
wheel=$(ls dist/*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || { echo "error: maturin produced no wheel" >&2; exit 1; }
pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"
say "ready: $(blender --version 2>/dev/null | head -1), wheel $(basename "$wheel")"
