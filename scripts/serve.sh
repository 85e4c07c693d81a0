#!/usr/bin/env bash
# The README's first command: set up (scripts/setup.sh builds and installs both wheels), then run headless
# Blender serving bld_remote on 127.0.0.1:6688 (override with BLD_REMOTE_MCP_PORT) through
# `bld-remote start --background`. Ctrl+C or SIGTERM stops Blender cleanly (rc 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
port=${BLD_REMOTE_MCP_PORT:-6688}
exec bld-remote start --background --port "$port"
