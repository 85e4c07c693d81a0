#!/usr/bin/env bash
# Runs the core and packaging tests in PyPI `bpy` (Blender as a Python module) for each version given:
#   bash scripts/test-bpy.sh 4.2.23 4.5.15 5.0.1 5.3.0      (default: 4.5.15 and 5.3.0, what CI runs)
# Each version gets its own venv in .venv-bpy/VERSION (~1 GB each). bpy 4.2-5.0 need Python 3.11, bpy 5.1+
# Python 3.13 ($PYTHON311 / $PYTHON313, else python3.11 / python3.13 on PATH, else pyenv's).
# The same tests as for Debian's Blender run unchanged: the server process is `python -c "import bpy; ..."`
# instead of `blender -b`, selected by BLD_REMOTE_TEST_BPY_PYTHON (tests/helpers.py).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
[ -n "$(ls dist/bld_remote-*.whl 2>/dev/null)" ] || bash scripts/setup.sh

# The interpreter for Python X.Y: an explicit override, else PATH, else pyenv's newest X.Y.
python_for() {
  local want=$1 override=$2 p
  if [ -n "$override" ]; then echo "$override"; return; fi
  # A pyenv shim is on PATH even when that version is not selected: check that it really runs.
  if "python$want" -c pass 2>/dev/null; then command -v "python$want"; return; fi
  if command -v pyenv >/dev/null; then
    p=$(ls -d "$(pyenv root)"/versions/"$want".*/bin/python"$want" 2>/dev/null | sort -V | tail -1)
    if [ -n "$p" ]; then echo "$p"; return; fi
  fi
  echo "error: bpy needs Python $want; none found (set PYTHON${want/./} or install python$want)" >&2
  return 1
}

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(4.5.15 5.3.0)
status=0
for v in "${versions[@]}"; do
  case "$v" in
    3.* | 4.* | 5.0.*) py=$(python_for 3.11 "${PYTHON311:-}") ;;
    *) py=$(python_for 3.13 "${PYTHON313:-}") ;;
  esac
  venv=.venv-bpy/$v
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import bpy" 2>/dev/null; then
    echo "==> installing bpy==$v into $venv ($("$py" --version))" >&2
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "bpy==$v"
  fi
  echo "==> pytest tests/test_core.py tests/test_packaging.py tests/test_scene.py tests/test_changes.py tests/test_export.py tests/test_views.py tests/test_datablocks.py tests/test_mcp_resources.py tests/test_lookup.py in bpy $v" >&2
  BLD_REMOTE_TEST_BPY_PYTHON=$PWD/$venv/bin/python python -m pytest tests/test_core.py tests/test_packaging.py tests/test_scene.py tests/test_changes.py tests/test_export.py tests/test_views.py tests/test_datablocks.py tests/test_mcp_resources.py tests/test_lookup.py \
    -p no:cacheprovider -q \
    || status=1
done
exit $status
