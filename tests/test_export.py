"""`export_scene` against a real headless Blender, over real sockets, and the `export_scene` MCP tool through
the official `mcp` client: every format this Blender can export gives a file with the right magic bytes that
Blender imports back; a format it cannot export is a clear error (Debian's 3.4.1 has no USD, and its glTF
exporter needs numpy, which its Python lacks); bad formats, objects and arguments are clear errors; and
nothing is left behind (selection, active object, objects)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import sys
from pathlib import Path

import anyio
import pytest
from helpers import Conn, err, ok

_ids = itertools.count(1)

MAGIC = {
    "glb": b"glTF",
    "gltf": b"{",
    "fbx": b"Kaydara FBX Binary",
    "obj": b"# Blender",
    "usd": b"PXR-USDC",
}
IMPORT = {
    "glb": "bpy.ops.import_scene.gltf(filepath=path)",
    "gltf": "bpy.ops.import_scene.gltf(filepath=path)",
    "fbx": "bpy.ops.import_scene.fbx(filepath=path)",
    "obj": "(bpy.ops.wm.obj_import if hasattr(bpy.ops.wm, 'obj_import') else bpy.ops.import_scene.obj)(filepath=path)",
    "usd": "bpy.ops.wm.usd_import(filepath=path)",
}
# What this Blender can export, worked out independently of bld_remote/export.py.
CAN_EXPORT = """
import importlib.util
def has(module, op):
    try:
        getattr(getattr(bpy.ops, module), op).get_rna_type()
        return True
    except Exception:
        return False
gltf = has('export_scene', 'gltf') and importlib.util.find_spec('numpy') is not None
result = {'glb': gltf, 'gltf': gltf, 'fbx': has('export_scene', 'fbx'),
          'obj': has('wm', 'obj_export') or has('export_scene', 'obj'), 'usd': has('wm', 'usd_export')}
"""
STATE = """
vl = bpy.context.view_layer
result = {'selected': sorted(o.name for o in vl.objects if o.select_get()),
          'active': vl.objects.active.name if vl.objects.active else None,
          'objects': sorted(bpy.data.objects.keys())}
"""


@pytest.fixture(scope="module")
def conn(served):
    with Conn(served.port) as c:
        yield c


def send(conn: Conn, command: str, **params) -> dict:
    rid = next(_ids)
    conn.send({"type": command, "params": params, "id": rid})
    reply = conn.reply()
    assert reply.get("id") == rid, reply
    return reply


def code(conn: Conn, source: str, **params):
    return ok(send(conn, "execute_code", code="import bpy\n" + source, **params)).get("value")


@pytest.fixture(scope="module")
def can(conn) -> dict:
    return code(conn, CAN_EXPORT, changes=False)


@pytest.mark.parametrize("fmt", list(MAGIC))
def test_each_format_exports_a_file_blender_imports_back_or_says_why_not(conn, can, fmt, tmp_path):
    reply = send(conn, "export_scene", format=fmt, filepath=str(tmp_path / "scene"))
    if not can[fmt]:
        message = err(reply)
        assert f"no {fmt} exporter" in message or "needs numpy" in message, message
        assert reply["format"] == fmt
        return
    r = ok(reply)
    path = Path(r["filepath"])
    assert path == tmp_path / f"scene.{fmt}"  # the extension is added when the path has none
    data = path.read_bytes()
    assert r["bytes"] == len(data) > 0 and r["format"] == fmt and r["temporary"] is False
    assert data.startswith(MAGIC[fmt]), data[:32]
    if fmt == "gltf":
        assert "asset" in json.loads(data)
    # Small: inline by default, the same bytes.
    assert base64.b64decode(r["data"]) == data and r["encoding"] == "base64"
    # Blender reads it back: the import's own report of what changed names the cube.
    imported = ok(send(conn, "execute_code", code=f"import bpy\npath = {str(path)!r}\n{IMPORT[fmt]}"))[
        "changes"
    ]
    new = [e["name"] for e in imported["added"]]
    assert any(e["type"] == "MESH" for e in imported["added"]), imported
    code(conn, f"for n in {new!r}:\n    bpy.data.objects.remove(bpy.data.objects[n])", changes=False)


def test_named_objects_only_and_nothing_left_behind(conn, can, tmp_path):
    assert can["obj"]
    code(
        conn,
        "o = bpy.data.objects.new('Other', bpy.data.meshes.new('Other'))\n"
        "bpy.context.scene.collection.objects.link(o)\n"
        "for x in bpy.context.view_layer.objects: x.select_set(x.name == 'Camera')\n"
        "bpy.context.view_layer.objects.active = bpy.data.objects['Light']",
        changes=False,
    )
    before = code(conn, STATE)
    assert before["selected"] == ["Camera"] and before["active"] == "Light"
    r = ok(send(conn, "export_scene", format="obj", objects=["Cube"], filepath=str(tmp_path / "cube.obj")))
    assert r["objects"] == ["Cube"]
    text = Path(r["filepath"]).read_text()
    assert "o Cube" in text and "o Other" not in text, text[:400]
    assert code(conn, STATE) == before
    # The whole scene: both meshes; still nothing changed.
    r = ok(send(conn, "export_scene", format="obj"))
    text = Path(r["filepath"]).read_text()
    assert "o Cube" in text and "o Other" in text
    assert r["temporary"] is True and Path(r["filepath"]).parent.name.startswith("bld_remote_export_")
    # the .mtl beside it is listed
    assert any(f.endswith(".mtl") for f in r.get("files", [])), r
    assert code(conn, STATE) == before


def test_inline_false_and_true(conn, can):
    assert can["fbx"]
    r = ok(send(conn, "export_scene", format="fbx", inline=False))
    assert "data" not in r and Path(r["filepath"]).stat().st_size == r["bytes"]
    r = ok(send(conn, "export_scene", format="fbx", inline=True))
    assert base64.b64decode(r["data"]).startswith(MAGIC["fbx"])


def test_missing_exporter_is_a_clear_error(conn, can):
    # Every Blender here has the FBX add-on: disable it for a moment, and the exporter is missing.
    assert can["fbx"]
    code(conn, "import addon_utils\naddon_utils.disable('io_scene_fbx')", changes=False)
    try:
        message = err(send(conn, "export_scene", format="fbx"))
    finally:
        code(conn, "import addon_utils\naddon_utils.enable('io_scene_fbx')", changes=False)
    assert "has no fbx exporter (bpy.ops.export_scene.fbx is not available)" in message, message
    assert "enable the add-on io_scene_fbx" in message, message
    assert ok(send(conn, "export_scene", format="fbx", inline=False))["bytes"] > 0


@pytest.mark.parametrize(
    "params, says",
    [
        ({}, "format must be one of glb, gltf, fbx, obj, usd"),
        ({"format": "blend"}, "format must be one of glb, gltf, fbx, obj, usd, got 'blend'"),
        ({"format": 3}, "format must be one of"),
        ({"format": "obj", "objects": ["Nope", "Cube", "Nada"]}, "objects not found: 'Nope', 'Nada'"),
        ({"format": "obj", "objects": "Cube"}, "objects must be a non-empty list of object names"),
        ({"format": "obj", "objects": []}, "objects must be a non-empty list of object names"),
        ({"format": "obj", "objects": [1]}, "objects must be a non-empty list of object names"),
        ({"format": "obj", "filepath": ""}, "filepath must be a non-empty string"),
        ({"format": "obj", "filepath": "/nonexistent/dir/x.obj"}, "the folder for filepath does not exist"),
        ({"format": "obj", "inline": "yes"}, "inline must be true or false"),
    ],
)
def test_bad_arguments_are_clear_errors(conn, params, says):
    before = code(conn, STATE)
    message = err(send(conn, "export_scene", **params))
    assert says in message, message
    assert code(conn, STATE) == before


# --- MCP ---------------------------------------------------------------------------------------------------

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402


def stdio(port: int) -> StdioServerParameters:
    exe = Path(sys.executable).with_name("bld-remote")
    assert exe.exists(), f"{exe} missing: pip install the built wheel into this venv"
    return StdioServerParameters(command=str(exe), args=["mcp", "--port", str(port)])


def test_mcp_export_scene_returns_the_path_and_the_file(served, can):
    assert can["fbx"]

    async def main() -> None:
        async with Client(stdio(served.port), mode="legacy") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            tool = tools["export_scene"]
            assert tool.annotations.read_only_hint is False and tool.annotations.destructive_hint is False
            assert tool.input_schema["required"] == ["format"]
            r = await client.call_tool("export_scene", {"format": "fbx", "objects": ["Cube"]})
            assert not r.is_error, r
            texts = [c.text for c in r.content if c.type == "text"]
            blobs = [c.resource for c in r.content if c.type == "resource"]
            assert len(blobs) == 1 and blobs[0].blob
            path = blobs[0].uri.removeprefix("file://")
            assert path in texts[0] and "objects: Cube" in texts[0]
            data = base64.b64decode(blobs[0].blob)
            assert data.startswith(MAGIC["fbx"]) and data == Path(path).read_bytes()
            assert r.structured_content["bytes"] == len(data) and "data" not in r.structured_content
            r = await client.call_tool("export_scene", {"format": "obj", "inline": False})
            assert not r.is_error and [c.type for c in r.content] == ["text"]
            assert os.path.exists(r.structured_content["filepath"])
            r = await client.call_tool("export_scene", {"format": "obj", "objects": ["Nope"]})
            assert r.is_error and "objects not found: 'Nope'" in r.content[0].text
            r = await client.call_tool("export_scene", {"format": "blend"})
            assert r.is_error

    anyio.run(main)
