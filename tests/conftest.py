"""Shared fixtures: a real Blender (Debian 3.4.1 headless) serving bld_remote from the built wheel.
Every Blender a test starts is stopped by its PID, even when the test fails."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SERVE, BlenderProcess, blender_env, built_cli_wheel, built_wheel, runtime_argv


@pytest.fixture(scope="session")
def user_scripts(tmp_path_factory) -> Path:
    """An isolated BLENDER_USER_SCRIPTS with the add-on from the built wheel in addons/bld_remote."""
    root = tmp_path_factory.mktemp("blender_scripts")
    addons = root / "addons"
    addons.mkdir()
    with zipfile.ZipFile(built_wheel()) as wheel:
        for name in wheel.namelist():
            if name.startswith("bld_remote/"):
                wheel.extract(name, addons)
    assert (addons / "bld_remote" / "__init__.py").exists()
    assert list((addons / "bld_remote").glob("_core*.so")), "the wheel has no native module"
    return root


@pytest.fixture
def start_blender(user_scripts):
    """Factory: start_blender(expr=None, port=0, extra_args=(), env=None) -> BlenderProcess (ready)."""
    started: list[BlenderProcess] = []

    def start(
        expr: str | None = None,
        *,
        port: int = 0,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> BlenderProcess:
        argv = runtime_argv(expr if expr is not None else SERVE.format(port=port), args)
        b = BlenderProcess(argv, blender_env(user_scripts, **(env or {})))
        started.append(b)
        if wait:
            b.wait_ready()
        return b

    yield start
    for b in started:
        b.kill()


@pytest.fixture(scope="module")
def served(user_scripts):
    """One headless Blender serving on a free port, shared by a module's tests."""
    b = BlenderProcess(runtime_argv(SERVE.format(port=0)), blender_env(user_scripts))
    try:
        b.wait_ready()
        yield b
    finally:
        b.kill()


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with only the two built wheels installed (the package, and the `bld-remote` command):
    returns its bin/ folder (bld-remote, python)."""
    venv = tmp_path_factory.mktemp("cli_venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(built_wheel()),
            str(built_cli_wheel()),
        ],
        check=True,
    )
    assert (venv / "bin" / "bld-remote").exists()
    return venv / "bin"


@pytest.fixture
def runtime_dir(tmp_path) -> Path:
    d = tmp_path / "runtime"
    d.mkdir()
    return d
