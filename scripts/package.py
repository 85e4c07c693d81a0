"""Build Blender add-on packages from the bld_remote wheel: one command, two zips.

    python scripts/package.py [--wheel dist/bld_remote-*.whl] [--out dist]

- ``bld_remote-VERSION-extension-PLATFORM.zip``: a Blender 4.2+ extension (``blender_manifest.toml`` at the
  root, with ``platforms`` set because it carries the native module). Install: Preferences > Get Extensions >
  Install from Disk, or ``bpy.ops.extensions.package_install_files(filepath=..., repo="user_default",
  enable_on_install=True)``. It is then imported as ``bl_ext.user_default.bld_remote``.
- ``bld_remote-VERSION-addon-PLATFORM.zip``: a legacy add-on (folder ``bld_remote/``) for Blender 3.x–4.1 (and
  still installable in later versions): Preferences > Add-ons > Install, or
  ``bpy.ops.preferences.addon_install(filepath=...)``.

The native module is built for the stable ABI (abi3, Python >= 3.10), so one zip per platform serves every
Blender from 3.x to 5.0. Standard library only.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MANIFEST = """\
schema_version = "1.0.0"
id = "bld_remote"
version = "{version}"
name = "bld_remote"
tagline = "Drive Blender from scripts and AI agents over TCP and MCP"
maintainer = "bld_remote contributors"
type = "add-on"
blender_version_min = "4.2.0"
license = ["SPDX:MIT"]
tags = ["System", "Development"]

[permissions]
network = "Serves remote-control requests on a local TCP port"
"""


def wheel_platform(wheel: Path) -> str:
    """Blender's platform name for a wheel's platform tag."""
    tag = wheel.stem.split("-")[-1]
    if "x86_64" in tag or "amd64" in tag:
        arch = "x64"
    elif "aarch64" in tag or "arm64" in tag:
        arch = "arm64"
    else:
        raise SystemExit(f"error: unsupported wheel platform tag {tag!r}")
    if tag.startswith(("manylinux", "musllinux", "linux")):
        return f"linux-{arch}"
    if tag.startswith("macosx"):
        return f"macos-{arch}"
    if tag.startswith("win"):
        return f"windows-{arch}"
    raise SystemExit(f"error: unsupported wheel platform tag {tag!r}")


def manifest_text(files: dict[str, bytes], version: str, platform: str) -> str:
    """The package's own blender_manifest.toml if it has one, else the default; version and platforms set."""
    text = files.get("blender_manifest.toml", b"").decode() or DEFAULT_MANIFEST.format(version=version)
    text = re.sub(r'(?m)^version\s*=\s*"[^"]*"', f'version = "{version}"', text)
    text = re.sub(r"(?m)^platforms\s*=.*\n", "", text)
    # Top-level keys must come before the first [table].
    head, sep, tables = text.partition("\n[")
    head = head.rstrip("\n") + f'\nplatforms = ["{platform}"]\n'
    return head + (sep + tables if sep else "")


def build(wheel: Path, out: Path) -> tuple[Path, Path]:
    with zipfile.ZipFile(wheel) as whl:
        files = {
            name[len("bld_remote/") :]: whl.read(name)
            for name in whl.namelist()
            if name.startswith("bld_remote/") and not name.endswith("/") and "__pycache__" not in name
        }
    if not any(n.startswith("_core") for n in files):
        raise SystemExit(f"error: {wheel} has no native module bld_remote/_core*")
    version = wheel.name.split("-")[1]
    platform = wheel_platform(wheel)
    out.mkdir(parents=True, exist_ok=True)
    ext = out / f"bld_remote-{version}-extension-{platform}.zip"
    legacy = out / f"bld_remote-{version}-addon-{platform}.zip"
    with zipfile.ZipFile(ext, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(files.items()):
            if name != "blender_manifest.toml":
                z.writestr(_entry(name, data), data)
        z.writestr("blender_manifest.toml", manifest_text(files, version, platform))
    with zipfile.ZipFile(legacy, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(files.items()):
            if name != "blender_manifest.toml":
                z.writestr(_entry("bld_remote/" + name, data), data)
    return ext, legacy


def _entry(name: str, data: bytes) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    executable = name.endswith((".so", ".pyd", ".dylib"))
    info.external_attr = (0o755 if executable else 0o644) << 16
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="the bld_remote wheel (default: newest dist/*.whl)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist)")
    args = parser.parse_args(argv)
    wheel = args.wheel
    if wheel is None:
        wheels = sorted(glob.glob(str(ROOT / "dist" / "bld_remote-*.whl")), key=os.path.getmtime)
        if not wheels:
            print("error: no wheel in dist/: run `maturin build --release -o dist` first", file=sys.stderr)
            return 2
        wheel = Path(wheels[-1])
    for path in build(wheel, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
