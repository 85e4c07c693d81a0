#!/usr/bin/env bash
# Installs what bld_remote needs on a fresh Debian machine and builds it. Idempotent: quick when done before.
#   - Debian packages: Blender (3.4.1), Xvfb for GUI tests
#   - .venv: maturin, pytest and friends (pinned), then the two wheels built from this checkout
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

# Two wheels (docs/PACKAGING.md): bld_remote (the package and add-on Blender loads, with `Client`) and
# bld_remote_cli (the `bld-remote` command and MCP server, a binary that Blender never loads).
say "building the wheels (maturin build --release)"
rm -rf dist
quiet() { grep -v '^🔗\|^🐍\|^📡\|^📦\|^🍹' >&2 || true; }
maturin build --release -q -o dist 2>&1 | quiet
maturin build --release -q -o dist -m crates/cli/Cargo.toml 2>&1 | quiet
wheel=$(ls dist/bld_remote-*.whl 2>/dev/null | head -1)
cli_wheel=$(ls dist/bld_remote_cli-*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] && [ -n "$cli_wheel" ] || { echo "error: maturin did not produce both wheels" >&2; exit 1; }
# One at a time: an older bld_remote wheel owned bin/bld-remote, and uninstalling it must not remove the
# command that the CLI wheel installs.
pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"
pip install -q --disable-pip-version-check --force-reinstall --no-deps "$cli_wheel"
say "ready: $(blender --version 2>/dev/null | head -1), wheels $(basename "$wheel") $(basename "$cli_wheel")"
