"""Packaging: the zips built by scripts/package.py install through Blender's own APIs and serve.

The legacy add-on zip is tested in the runtime under test (Debian's Blender 3.4.1, or PyPI bpy); the 4.2+
extension zip needs Blender's extension system, so it runs when the runtime is PyPI bpy (scripts/test-bpy.sh,
which CI runs with bpy 4.5 LTS)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from helpers import BPY_PYTHON, ROOT, BlenderProcess, blender_env, call, runtime_argv

from conftest import built_wheel


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pkg")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "package.py"),
            "--wheel",
            str(built_wheel()),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    paths = [Path(p) for p in done.stdout.split()]
    return {("extension" if "-extension-" in p.name else "addon"): p for p in paths}


def test_package_builds_an_extension_and_a_legacy_addon(packages):
    with zipfile.ZipFile(packages["extension"]) as z:
        names = z.namelist()
        manifest = tomllib.loads(z.read("blender_manifest.toml").decode())
    assert "__init__.py" in names and any(n.startswith("_core") and n.endswith(".so") for n in names)
    assert manifest["id"] == "bld_remote" and manifest["type"] == "add-on"
    assert manifest["platforms"] == ["linux-x64"]
    assert manifest["blender_version_min"] >= "4.2.0"
    assert "network" in manifest["permissions"]
    with zipfile.ZipFile(packages["addon"]) as z:
        names = z.namelist()
    assert "bld_remote/__init__.py" in names
    assert any(n.startswith("bld_remote/_core") for n in names)
    assert all(n.startswith("bld_remote/") for n in names)


def _serve(script: str, tmp_path: Path) -> BlenderProcess:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    env = blender_env(scripts, BLENDER_USER_EXTENSIONS=str(tmp_path / "extensions"))
    env.pop("PYTHONPATH", None)  # the package must come from the installed zip, nowhere else
    return BlenderProcess(runtime_argv(script), env)


def test_legacy_addon_zip_installs_enables_and_serves(packages, tmp_path):
    script = (
        "import bpy, addon_utils, sys\n"
        f"bpy.ops.preferences.addon_install(filepath={str(packages['addon'])!r})\n"
        "addon_utils.enable('bld_remote', default_set=True)\n"
        "import bld_remote\n"
        "print('FROM', bld_remote.__file__, flush=True)\n"
        "bld_remote.start_mcp_service(port=0)\n"
        "bld_remote.keep_alive()\n"
    )
    b = _serve(script, tmp_path)
    try:
        port = b.wait_ready()
        assert f"FROM {tmp_path / 'scripts' / 'addons' / 'bld_remote' / '__init__.py'}" in b.output
        assert call(port, "get_scene_info")["result"]["object_count"] == 3
        call(port, "server_shutdown")
        assert b.wait_exit(timeout=5) == 0, b.output
    finally:
        b.kill()


@pytest.mark.skipif(not BPY_PYTHON, reason="extensions exist from Blender 4.2: runs in scripts/test-bpy.sh")
def test_extension_zip_installs_enables_and_serves(packages, tmp_path):
    script = (
        "import bpy, sys\n"
        "r = bpy.ops.extensions.package_install_files(\n"
        f"    filepath={str(packages['extension'])!r}, repo='user_default', enable_on_install=True)\n"
        "assert r == {'FINISHED'}, r\n"
        "mod = sys.modules['bl_ext.user_default.bld_remote']\n"
        "print('FROM', mod.__file__, flush=True)\n"
        "mod.start_mcp_service(port=0)\n"
        "mod.keep_alive()\n"
    )
    b = _serve(script, tmp_path)
    try:
        port = b.wait_ready()
        assert f"FROM {tmp_path / 'extensions' / 'user_default' / 'bld_remote' / '__init__.py'}" in b.output
        info = call(port, "execute_code", code="import bpy; print(bpy.app.version_string)")["result"]
        assert info["result"].strip()
        assert call(port, "get_object_info", name="Cube")["result"]["mesh"]["vertices"] == 8
        call(port, "server_shutdown")
        assert b.wait_exit(timeout=5) == 0, b.output
    finally:
        b.kill()
