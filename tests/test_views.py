"""`look` (bld_remote/views.py) in a real Blender: the labelled grid of views headless (Workbench from
temporary cameras), what it leaves behind (nothing: data-blocks, settings, selection, frame), a failure
half-way that still restores everything, bad input, an empty scene, the GUI viewport under Xvfb (shading,
no undo step), the MCP tool through the official `mcp` client; and `render_image` honouring the scene's
Cycles device and denoiser, falling back with a warning where this Blender cannot."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import struct
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
from helpers import BPY_PYTHON, call, err, ok

SNAPSHOT = """
import json
s = bpy.context.scene
r = s.render
d = {}
for a in dir(bpy.data):
    c = getattr(bpy.data, a, None)
    if isinstance(c, bpy.types.bpy_prop_collection) and a != 'window_managers':
        d[a] = sorted(x.name for x in c)
sh = s.display.shading
d['settings'] = [s.camera.name if s.camera else None, r.engine, r.resolution_x, r.resolution_y,
    r.resolution_percentage, r.use_border, r.image_settings.file_format, r.image_settings.color_mode,
    r.image_settings.color_depth, s.frame_current, sh.show_xray, sh.xray_alpha, sh.color_type, sh.light,
    s.display.render_aa, s.cycles.samples, s.cycles.device, s.cycles.use_denoising]
d['objects'] = {o.name: [list(o.location), list(o.rotation_euler), o.select_get(), o.hide_render,
    [m.name for m in o.modifiers]] for o in s.objects}
al = bpy.context.view_layer.objects.active
d['active'] = al.name if al else None
print(json.dumps(d))
"""


def run(port: int, code: str, **params) -> str:
    return ok(call(port, "execute_code", code=textwrap.dedent(code), **params))["output"]["stdout"]


def snapshot(port: int) -> dict:
    return json.loads(run(port, SNAPSHOT, undo=False))


def decode_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, channels, rows of raw pixel bytes) of an 8-bit, non-interlaced PNG (zlib only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    assert header is not None
    width, height, depth, color_type = header[:4]
    assert depth == 8 and header[6] == 0, header
    c = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    raw = zlib.decompress(idat)
    stride = width * c
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - c] if i >= c else 0
            b, cc = prev[i], (prev[i - c] if i >= c else 0)
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else cc)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, c, rows


def tile(rows: list[bytes], c: int, row: int, col: int, size: int, gap: int = 2) -> list[bytes]:
    """The pixels of one tile (rows top first), each pixel as RGB bytes."""
    y0, x0 = row * (size + gap), col * (size + gap)
    return [
        bytes(rows[y][(x0 + x) * c : (x0 + x) * c + 3]) for y in range(y0, y0 + size) for x in range(size)
    ]


def covered(pixels: list[bytes], size: int) -> float:
    """Share of a tile's pixels that differ from its bottom-right corner (the background)."""
    background = pixels[-1]
    return sum(1 for p in pixels if max(abs(a - b) for a, b in zip(p, background)) > 12) / len(pixels)


# --- headless ---------------------------------------------------------------------------------------------


def test_look_grid_tiles_labels_and_reply(served):
    # A tall box: narrow from the front, a full square from the top.
    run(served.port, "bpy.data.objects['Cube'].scale = (0.5, 0.5, 2.0)")
    r = ok(call(served.port, "look", views=["front", "top", "camera"], size=96, inline=True))
    png = base64.b64decode(r["data"])
    width, height, c, rows = decode_png(png)
    assert (width, height) == (r["width"], r["height"]) == (2 * 96 + 2, 2 * 96 + 2)
    assert r["views"] == [
        {"name": "front", "row": 0, "col": 0},
        {"name": "top", "row": 0, "col": 1},
        {"name": "camera", "row": 1, "col": 0},
    ]
    assert r["objects"] == ["Cube"] and r["empty"] is False and r["mode"] == "render"
    assert "Workbench" in r["engine"] or "WORKBENCH" in r["engine"]
    assert r["temporary"] is False and "filepath" not in r
    front, top = tile(rows, c, 0, 0, 96), tile(rows, c, 0, 1, 96)
    assert covered(top, 96) > 2 * covered(front, 96) > 0.1, (covered(top, 96), covered(front, 96))
    # The label: white glyphs on black in the tile's top-left corner.
    corner = [p for i, p in enumerate(front) if i // 96 < 12 and i % 96 < 40]
    assert corner.count(b"\xff\xff\xff") > 20 and corner.count(b"\x00\x00\x00") > 20
    assert "front, top; row 2: camera" in r["text"] and "Cube" in r["text"]
    assert r["warnings"] == []


def test_look_to_a_file_and_the_default_views(served, tmp_path):
    target = tmp_path / "look.png"
    r = ok(call(served.port, "look", size=64, filepath=str(target)))
    assert r["filepath"] == str(target) and r["temporary"] is False
    assert [v["name"] for v in r["views"]] == ["front", "right", "top", "iso", "camera"]
    assert decode_png(target.read_bytes())[:2] == (r["width"], r["height"]) == (3 * 64 + 4, 2 * 64 + 2)
    assert str(target) in r["text"]
    r = ok(call(served.port, "look", size=64, views=["iso"]))
    assert r["temporary"] is True and Path(r["filepath"]).stat().st_size == r["size"]
    Path(r["filepath"]).unlink()


@pytest.mark.parametrize(
    "params",
    [
        {"size": 64},
        {"size": 64, "shading": "wireframe", "views": ["front", "camera"]},
        {"size": 64, "shading": "xray", "objects": ["Cube"]},
        {"size": 64, "shading": "material", "views": ["top"]},
        {"size": 64, "engine": "CYCLES", "samples": 1, "views": ["front"]},
    ],
)
def test_look_leaves_nothing_behind(served, params):
    run(served.port, "bpy.data.objects['Light'].select_set(True)\nbpy.context.scene.frame_current = 7")
    before = snapshot(served.port)
    r = ok(call(served.port, "look", **params))
    Path(r["filepath"]).unlink()
    assert snapshot(served.port) == before
    if params.get("shading") == "material":
        assert any("Workbench" in w for w in r["warnings"]), r["warnings"]


def test_look_failing_half_way_still_restores_everything(served, tmp_path):
    # filepath is a folder: everything is rendered, then the grid cannot be written.
    before = snapshot(served.port)
    message = err(call(served.port, "look", size=64, shading="wireframe", filepath=str(tmp_path)))
    assert message
    assert snapshot(served.port) == before
    assert ok(call(served.port, "ping"))["pong"] is True


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"views": ["front", "up"]}, "unknown view(s) ['up']"),
        ({"views": []}, "at least one"),
        ({"views": "front"}, None),
        ({"views": [3]}, "views must be a list of names"),
        ({"objects": ["Cube", "Nope"]}, "unknown object(s) ['Nope']"),
        ({"size": 0}, "size must be an integer from 64 to 2048"),
        ({"size": 5000}, "size must be an integer from 64 to 2048"),
        ({"size": 100.5}, "size must be an integer from 64 to 2048"),
        ({"size": True}, "size must be an integer from 64 to 2048"),
        ({"size": "big"}, "size must be an integer from 64 to 2048"),
        ({"shading": "toon"}, "shading must be one of"),
        ({"engine": "POVRAY"}, "engine must be WORKBENCH, CYCLES or EEVEE"),
        ({"filepath": "/nonexistent/d/x.png"}, "folder for filepath does not exist"),
        ({"device": "TPU"}, "device must be CPU or GPU"),
    ],
)
def test_look_bad_input(served, params, needle):
    reply = call(served.port, "look", **params)
    if needle is None:  # a comma- or space-separated string is accepted as a list
        assert ok(reply)["views"][0]["name"] == "front"
        Path(ok(reply)["filepath"]).unlink()
        return
    message = err(reply)
    assert needle in message, message
    if "unknown object" in needle:
        assert "Cube" in message and "Camera" in message  # it lists what there is


def test_look_on_an_empty_scene(start_blender):
    b = start_blender(
        "import bpy\nfor o in list(bpy.data.objects): bpy.data.objects.remove(o)\n"
        "import bld_remote; bld_remote.start_mcp_service(port=0); bld_remote.keep_alive()"
    )
    r = ok(call(b.port, "look", size=64, inline=True))
    assert r["empty"] is True and "no visible objects" in r["text"]
    assert [v["name"] for v in r["views"]] == ["front", "right", "top", "iso"]  # no camera view
    assert decode_png(base64.b64decode(r["data"]))[:2] == (130, 130)
    assert "needs a scene camera" in err(call(b.port, "look", views=["camera"]))


# --- render_image honours the user's setup ----------------------------------------------------------------


def test_render_image_uses_the_scenes_cycles_settings_and_says_what_fell_back(served):
    oidn = run(served.port, "import _cycles\nprint(_cycles.with_openimagedenoise)") == "True\n"
    run(served.port, "bpy.context.scene.cycles.use_denoising = True\nbpy.context.scene.cycles.device = 'CPU'")
    before = snapshot(served.port)
    r = ok(call(served.port, "render_image", width=32, height=32, engine="CYCLES", samples=1, inline=True))
    assert r["device"] == "CPU" and r["denoise"] is oidn
    assert any("OpenImageDenoise" in w for w in r["warnings"]) is not oidn, r["warnings"]
    # A GPU asked for where there is none: rendered on the CPU, and said so.
    r = ok(
        call(
            served.port,
            "render_image",
            width=32,
            height=32,
            engine="CYCLES",
            samples=1,
            device="GPU",
            denoise=False,
            inline=True,
        )
    )
    assert r["device"] == "CPU" and r["denoise"] is False
    assert any("CPU instead of the GPU" in w for w in r["warnings"]), r["warnings"]
    assert snapshot(served.port) == before
    r = ok(call(served.port, "render_image", width=16, height=16, inline=True))
    assert r["warnings"] == [] and "device" not in r
    assert "denoise must be true or false" in err(call(served.port, "render_image", denoise="yes"))


# --- GUI --------------------------------------------------------------------------------------------------

VIEWPORT = """
import json
area = max((a for a in bpy.context.window_manager.windows[0].screen.areas if a.type == 'VIEW_3D'),
           key=lambda a: a.width * a.height)
sp = area.spaces.active
rv = sp.region_3d
print(json.dumps([sp.shading.type, sp.shading.show_xray, sp.overlay.show_overlays, rv.view_perspective,
                  [list(r) for r in rv.view_matrix]]))
"""


@pytest.mark.skipif(BPY_PYTHON is not None, reason="bpy as a module has no GUI")
@pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="xvfb-run not installed")
def test_look_in_the_gui_draws_the_viewport_and_adds_no_undo_step(tmp_path, user_scripts):
    from test_gui import ENABLE_ADDON, start_gui

    from helpers import free_port

    port = free_port()
    b = start_gui(
        tmp_path, user_scripts, ENABLE_ADDON, BLD_REMOTE_MCP_START_NOW="1", BLD_REMOTE_MCP_PORT=str(port)
    )
    try:
        viewport = run(port, VIEWPORT, undo=False)
        before = snapshot(port)
        shots = {}
        for shading in ("solid", "wireframe"):
            r = ok(call(port, "look", views=["front", "iso"], size=96, shading=shading, inline=True))
            assert r["mode"] == "viewport" and r["shading"] == shading
            width, height, c, rows = decode_png(base64.b64decode(r["data"]))
            assert (width, height) == (2 * 96 + 2, 96)
            shots[shading] = tile(rows, c, 0, 1, 96)
            assert covered(shots[shading], 96) > 0.05
        assert covered(shots["solid"], 96) > 2 * covered(shots["wireframe"], 96)
        assert snapshot(port) == before
        after = json.loads(run(port, VIEWPORT, undo=False))
        assert after[:4] == json.loads(viewport)[:4]
        # The view is put back as it was, up to float rounding of the quaternion (about 1e-7).
        assert all(
            abs(a - b) < 1e-5 for ra, rb in zip(after[4], json.loads(viewport)[4]) for a, b in zip(ra, rb)
        )
        # No undo step: a marker change is one step; after a look, one undo still reverts the marker.
        run(port, "bpy.context.scene['bld_remote_marker'] = 1")
        ok(call(port, "look", views=["top"], size=64, inline=True))
        run(
            port,
            "with bpy.context.temp_override(window=bpy.context.window_manager.windows[0]):\n"
            "    bpy.ops.ed.undo()",
            undo=False,
        )
        assert run(port, "print('bld_remote_marker' in bpy.context.scene)", undo=False) == "False\n"
    finally:
        b.kill()


# --- MCP --------------------------------------------------------------------------------------------------


def _bld_remote() -> str:
    exe = Path(sys.executable).with_name("bld-remote")
    assert exe.exists(), f"{exe} missing: pip install the built wheel into this venv"
    return str(exe)


def test_mcp_look_image_text_progress_and_errors(served):
    mcp = pytest.importorskip("mcp")
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(command=_bld_remote(), args=["mcp", "--port", str(served.port)])

    async def main() -> None:
        seen: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, total, message))

        async with Client(params, mode="legacy") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert tools["look"].annotations.read_only_hint is True
            r = await client.call_tool(
                "look",
                {"views": ["top", "front"], "size": 64, "keep_file": True},
                progress_callback=on_progress,
            )
            assert not r.is_error, r
            images = [c for c in r.content if c.type == "image"]
            assert len(images) == 1 and images[0].mime_type == "image/png"
            assert decode_png(base64.b64decode(images[0].data))[:2] == (130, 64)
            text = "\n".join(c.text for c in r.content if c.type == "text")
            assert "row 1: top, front" in text
            path = text.split("Full-size image: ", 1)[1].split()[0]
            assert Path(path).read_bytes() == base64.b64decode(images[0].data)
            Path(path).unlink()
            assert any(m and "rendering view 1/2 (top)" in m for _, _, m in seen), seen
            r = await client.call_tool("look", {"views": ["front"], "engine": "CYCLES", "size": 64})
            assert not r.is_error, r
            r = await client.call_tool("look", {"objects": ["Nope"]})
            assert r.is_error and "unknown object(s) ['Nope']" in r.content[0].text
            for bad in ({"views": ["up"]}, {"size": 10}):
                try:
                    r = await client.call_tool("look", bad)
                    assert r.is_error, bad
                    message = r.content[0].text
                except mcp.McpError as e:
                    message = str(e)
                assert ("up" in message) if "views" in bad else ("size must be a whole number" in message)

    asyncio.run(main())
