"""Packaging: the zips built by scripts/package.py install through Blender's own APIs and serve.

The legacy add-on zip is tested in the runtime under test (Debian's Blender 3.4.1, or PyPI bpy); the 4.2+
extension zip needs Blender's extension system, so it runs when the runtime is PyPI bpy (scripts/test-bpy.sh,
which CI runs with bpy 4.5 LTS)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from helpers import BPY_PYTHON, ROOT, BlenderProcess, blender_env, call, runtime_argv

from conftest import built_cli_wheel, built_wheel


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


# --- one version, a lean module, no import cycles (no Blender needed) -----------------------------------

CRATES_NOT_IN_BLENDER = ("tokio", "hyper", "rmcp", "clap", "png", "schemars")


def _workspace_version() -> str:
    return tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]


def test_the_version_literals_match_the_workspace(tmp_path):
    # Blender reads bl_info and blender_manifest.toml without importing the package, so they stay literals;
    # this keeps them equal to the one written version (Cargo.toml), and to what the installed module says.
    version = _workspace_version()
    tree = ast.parse((ROOT / "bld_remote" / "__init__.py").read_text())
    bl_info = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "bl_info" for t in node.targets)
    )
    assert ".".join(map(str, bl_info["version"])) == version, "bl_info['version'] in bld_remote/__init__.py"
    manifest = tomllib.loads((ROOT / "bld_remote" / "blender_manifest.toml").read_text())
    assert manifest["version"] == version, "version in bld_remote/blender_manifest.toml"
    with zipfile.ZipFile(built_wheel()) as z:
        metadata = next(z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    assert f"\nVersion: {version}\n" in metadata
    # The installed package, imported from outside the checkout (whose bld_remote/ may lack _core).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", "import bld_remote; print(bld_remote.__version__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == version


def _crate_paths(binary: Path) -> set[str]:
    """Names of the crates above whose source paths `strings` finds in ``binary`` (they survive stripping:
    panic locations)."""
    text = subprocess.run(["strings", "-a", str(binary)], capture_output=True, text=True, check=True).stdout
    pattern = re.compile(r"\b(" + "|".join(CRATES_NOT_IN_BLENDER) + r")(?:[-_][a-z_]+)?-\d+\.\d+\.\d+[/\\]")
    return {m.group(1) for m in pattern.finditer(text)}


def _extract(wheel: Path, match, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if match(n))
        return Path(z.extract(name, dest))


def test_the_module_blender_loads_is_lean(tmp_path):
    module = _extract(
        built_wheel(), lambda n: n.startswith("bld_remote/_core") and n.endswith(".so"), tmp_path
    )
    size = module.stat().st_size
    assert size < 4 * 1024 * 1024, f"{module.name} is {size / 1e6:.1f} MB"
    assert _crate_paths(module) == set()
    # The check itself works: the CLI binary links every one of them.
    cli = _extract(built_cli_wheel(), lambda n: n.endswith("/scripts/bld-remote"), tmp_path / "cli")
    assert _crate_paths(cli) >= {"tokio", "hyper", "rmcp", "clap"}


def _package_imports() -> dict[str, set[str]]:
    """bld_remote's modules and the package modules each imports (also inside functions)."""
    package = ROOT / "bld_remote"
    modules = {p.stem for p in package.glob("*.py")} | {p.stem for p in package.glob("*.pyi")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        edges = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges.add(node.module.split(".")[0])
                else:
                    edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bld_remote."):
                edges.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                edges.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bld_remote."))
    return graph


def test_bld_remote_has_no_import_cycles():
    graph = _package_imports()
    assert graph["gui"] >= {"service"}, graph  # the walk sees imports at all
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
