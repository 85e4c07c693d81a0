#!/usr/bin/env bash
# Type checks of the Python package (part of scripts/test.sh):
#   1. mypy on bld_remote/ from the checkout. bpy and mathutils exist only inside Blender: mypy treats them as
#      Any (ignore_missing_imports for those two modules only); everything else must type-check.
#   2. mypy.stubtest: the hand-written bld_remote/_core.pyi against the module in the INSTALLED wheel, run
#      from outside the checkout so that the source folder (which has no _core.so) is not the one imported.
# Needs the .venv made by scripts/setup.sh (mypy is pinned in requirements-dev.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bpy_section='[mypy-bpy,bpy.*,mathutils,mathutils.*]
ignore_missing_imports = True'
cat >"$work/mypy.ini" <<INI
[mypy]
python_version = 3.10
warn_unused_ignores = True
warn_redundant_casts = True
check_untyped_defs = True
cache_dir = /dev/null

$bpy_section
INI
# stubtest reads the checkout's stub (mypy_path), and imports the runtime module from the installed wheel.
cat >"$work/stubtest.ini" <<INI
[mypy]
mypy_path = $root
cache_dir = /dev/null

$bpy_section
INI

echo "==> mypy bld_remote" >&2
python -m mypy --config-file "$work/mypy.ini" "$root/bld_remote"

echo "==> stubtest bld_remote._core (installed wheel)" >&2
cd "$work"
installed=$(python -c 'import bld_remote._core as c, pathlib; print(pathlib.Path(c.__file__).parent)')
case "$installed" in
  "$root/bld_remote")
    echo "error: bld_remote is imported from the checkout ($installed), not the wheel: an editable install" \
      "(maturin develop) is in this venv; bash scripts/setup.sh reinstalls the wheel" >&2
    exit 1 ;;
esac
python -m mypy.stubtest bld_remote._core --mypy-config-file "$work/stubtest.ini"
