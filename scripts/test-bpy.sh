#!/usr/bin/env bash
# Runs the core and packaging tests in PyPI `bpy` (Blender as a Python module) for each version given:
#   bash scripts/test-bpy.sh 4.2.23 4.5.15 5.0.1      (default: 4.5.15, the LTS that CI runs)
# Each version gets its own venv in .venv-bpy/VERSION (~1 GB each; Python 3.11 is required by bpy 4.2-5.0).
# The same tests as for Debian's Blender run unchanged: the server process is `python -c "import bpy; ..."`
# instead of `blender -b`, selected by BLD_REMOTE_TEST_BPY_PYTHON (tests/helpers.py).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
[ -n "$(ls dist/*.whl 2>/dev/null)" ] || bash scripts/setup.sh
PY311=${PYTHON311:-python3.11}
command -v "$PY311" >/dev/null || PY311=python3
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(4.5.15)
status=0
for v in "${versions[@]}"; do
  venv=.venv-bpy/$v
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import bpy" 2>/dev/null; then
    echo "==> installing bpy==$v into $venv" >&2
    rm -rf "$venv"
    "$PY311" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "bpy==$v"
  fi
  echo "==> pytest tests/test_core.py tests/test_packaging.py in bpy $v" >&2
  BLD_REMOTE_TEST_BPY_PYTHON=$PWD/$venv/bin/python python -m pytest tests/test_core.py tests/test_packaging.py \
    -p no:cacheprovider -q \
    || status=1
done
exit $status
