#!/usr/bin/env bash
# The README's first command: set up, then run headless Blender serving bld_remote on 127.0.0.1:6688
# (override with BLD_REMOTE_MCP_PORT). Ctrl+C or SIGTERM stops Blender cleanly (rc 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
port=${BLD_REMOTE_MCP_PORT:-6688}
if command -v bld-remote >/dev/null && bld-remote start --help >/dev/null 2>&1; then
  exec bld-remote start --background --port "$port"
fi
# Without the CLI: install the add-on from the built wheel into a private user-scripts folder.
scripts_dir=$PWD/.venv/blender-scripts
pkg=$(cd / && python -c 'import bld_remote, os; print(os.path.dirname(bld_remote.__file__))')
rm -rf "$scripts_dir/addons/bld_remote" && mkdir -p "$scripts_dir/addons"
cp -r "$pkg" "$scripts_dir/addons/bld_remote"
# Blender honours VIRTUAL_ENV; keep the venv out of Blender's sys.path.
exec env -u VIRTUAL_ENV -u PYTHONPATH BLENDER_USER_SCRIPTS="$scripts_dir" blender -b --factory-startup \
  --python-expr "import bld_remote; bld_remote.start_mcp_service(port=$port); bld_remote.keep_alive()"
