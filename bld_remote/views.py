"""``look``: one image of several labelled views of the scene (or of named objects), framed to fit.

Headless, each view is a render from a temporary camera (Workbench by default; EEVEE or Cycles on request).
In the GUI, each view is the largest 3D viewport's own drawing (``render.opengl``) looking through that
temporary camera, in the shading asked for. The tiles are read back as pixels and put together here, with a
small bitmap font for the labels: no numpy (Debian's Blender has none), no image library in the native
module (issue 13).

Nothing is left behind: the temporary camera and every image are removed, every setting touched is put
back (render settings, ``scene.camera``, the viewport's view and shading), the "Render Result" of the
user's last render is kept (looks render into a slot of their own), and no undo step is pushed. Runs on
Blender's main thread only, called through ``commands.dispatch``.
"""

from __future__ import annotations

import array
import math
import os
import tempfile
import time
from typing import Any

from . import commands
from .commands import CommandError

VIEWS = ("front", "back", "left", "right", "top", "bottom", "camera", "iso")
SHADINGS = ("solid", "material", "rendered", "wireframe", "xray")
DEFAULT_VIEWS = ("front", "right", "top", "iso")
SIZE_MIN, SIZE_MAX, SIZE_DEFAULT = 64, 2048, 320
MAX_VIEWS = 16
# Objects with no surface to see: left out of the default framing (named ones are framed all the same).
_NO_GEOMETRY = {"CAMERA", "LIGHT", "LIGHT_PROBE", "LIGHTPROBE", "SPEAKER"}
_CAMERA_NAME = "bld_remote_look"
_GAP = 2  # pixels between tiles
_BACKGROUND = (0.08, 0.08, 0.08, 1.0)

_DEG = math.pi / 180
# Euler XYZ rotation of a camera for each view, and the direction from the target to the camera.
_AXIS_VIEWS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "front": ((90 * _DEG, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "back": ((90 * _DEG, 0.0, 180 * _DEG), (0.0, 1.0, 0.0)),
    "right": ((90 * _DEG, 0.0, 90 * _DEG), (1.0, 0.0, 0.0)),
    "left": ((90 * _DEG, 0.0, -90 * _DEG), (-1.0, 0.0, 0.0)),
    "top": ((0.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "bottom": ((180 * _DEG, 0.0, 0.0), (0.0, 0.0, -1.0)),
    # The isometric orbit: from front-right-above, every axis foreshortened alike.
    "iso": (
        (math.atan(math.sqrt(2)), 0.0, 45 * _DEG),
        (1 / math.sqrt(3), -1 / math.sqrt(3), 1 / math.sqrt(3)),
    ),
}

# A 5x7 bitmap font for the labels, one string of 7 rows (top first) per glyph.
_FONT = {
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 11001 10101 10011 10001 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    " ": "00000 00000 00000 00000 00000 00000 00000",
}


def _bpy() -> Any:
    import bpy

    return bpy


# --- parameters -------------------------------------------------------------------------------------------


def _names(params: dict[str, Any], key: str) -> list[str] | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise CommandError(f"{key} must be a list of names (strings), got {value!r}")
    return list(value)


def _check(params: dict[str, Any], scene: Any) -> dict[str, Any]:
    """Every parameter, checked before anything is changed."""
    views = _names(params, "views")
    if views is not None:
        views = [v.lower() for v in views]
        unknown = [v for v in views if v not in VIEWS]
        if unknown:
            raise CommandError(f"unknown view(s) {unknown}: views must be names from {list(VIEWS)}")
        if not views:
            raise CommandError(f"views must name at least one of {list(VIEWS)}")
        if len(views) > MAX_VIEWS:
            raise CommandError(f"views: at most {MAX_VIEWS} views in one look, got {len(views)}")
        if "camera" in views and scene.camera is None:
            raise CommandError("view 'camera' needs a scene camera, and this scene has none (scene.camera)")
    else:
        views = list(DEFAULT_VIEWS) + (["camera"] if scene.camera is not None else [])
    shading = str(params.get("shading") or "solid").lower().replace("-", "")
    if shading == "x_ray":
        shading = "xray"
    if shading not in SHADINGS:
        raise CommandError(f"shading must be one of {list(SHADINGS)}, got {params.get('shading')!r}")
    engine = params.get("engine")
    if engine is not None:
        engine = str(engine).upper()
        if engine not in commands._RENDER_ENGINES:
            raise CommandError(f"engine must be WORKBENCH, CYCLES or EEVEE, got {params.get('engine')!r}")
    size = params.get("size")
    if size is None:
        size = SIZE_DEFAULT
    else:
        if isinstance(size, float) and size.is_integer():
            size = int(size)
        if isinstance(size, bool) or not isinstance(size, int) or not SIZE_MIN <= size <= SIZE_MAX:
            raise CommandError(
                f"size must be an integer from {SIZE_MIN} to {SIZE_MAX} (pixels per tile), got {size!r}"
            )
    samples = commands._positive_int(params, "samples", commands._RENDER_MAX_SAMPLES)
    device = params.get("device")
    if device is not None and str(device).upper() not in ("CPU", "GPU"):
        raise CommandError(f"device must be CPU or GPU, got {device!r}")
    denoise = params.get("denoise")
    if denoise is not None and not isinstance(denoise, bool):
        raise CommandError(f"denoise must be true or false, got {denoise!r}")
    filepath = params.get("filepath")
    if filepath is not None:
        if not isinstance(filepath, str) or not filepath.strip():
            raise CommandError("filepath must be a non-empty string (or left out for a temp file)")
        filepath = os.path.abspath(os.path.expanduser(filepath))
        if not os.path.isdir(os.path.dirname(filepath)):
            raise CommandError(f"the folder for filepath does not exist: {os.path.dirname(filepath)}")
    names = _names(params, "objects")
    bpy = _bpy()
    if names is not None:
        unknown = [n for n in names if scene.objects.get(n) is None]
        if unknown:
            known = sorted(o.name for o in scene.objects)
            shown = ", ".join(known[:50]) + (f", ... ({len(known)} in all)" if len(known) > 50 else "")
            raise CommandError(
                f"unknown object(s) {unknown} (not in scene {scene.name!r}): objects must be names from the "
                f"scene: {shown or 'the scene has none'}",
                unknown=unknown,
            )
        objects = [scene.objects[n] for n in dict.fromkeys(names)]
    else:
        view_layer = bpy.context.view_layer
        visible = [o for o in scene.objects if o.visible_get(view_layer=view_layer)]
        objects = [o for o in visible if o.type not in _NO_GEOMETRY]
    return {
        "views": views,
        "shading": shading,
        "engine": engine,
        "size": size,
        "samples": samples,
        "device": None if device is None else str(device).upper(),
        "denoise": denoise,
        "filepath": filepath,
        "objects": objects,
        "named": names is not None,
        "inline": bool(params.get("inline", False)),
        "keep_file": bool(params.get("keep_file", False)),
    }


# --- framing ----------------------------------------------------------------------------------------------


def _bounds(objects: list[Any]) -> tuple[list[float], list[float]] | None:
    """World-space box around the objects' bound_box corners (their origins for objects without one)."""
    import mathutils

    lo = [math.inf] * 3
    hi = [-math.inf] * 3
    for obj in objects:
        m = obj.matrix_world
        corners = [m @ mathutils.Vector(c) for c in obj.bound_box] if obj.bound_box else [m.translation]
        for p in corners:
            for i in range(3):
                lo[i] = min(lo[i], p[i])
                hi[i] = max(hi[i], p[i])
    if not objects or not all(math.isfinite(v) for v in lo + hi):
        return None
    return lo, hi


def _place(cam_obj: Any, view: str, lo: list[float], hi: list[float]) -> None:
    """Point the orthographic camera along the view's axis and fit the box (with a margin) in a square frame."""
    import mathutils

    rotation, direction = _AXIS_VIEWS[view]
    euler = mathutils.Euler(rotation, "XYZ")
    center = mathutils.Vector([(a + b) / 2 for a, b in zip(lo, hi)])
    half = mathutils.Vector([max((b - a) / 2, 1e-4) for a, b in zip(lo, hi)])
    radius = max(half.length, 1e-3)
    # The box's half extent across the camera's own x and y axes.
    to_cam = euler.to_matrix().transposed()
    extent = 0.0
    for sx in (-1, 1):
        for sy in (-1, 1):
            for sz in (-1, 1):
                p = to_cam @ mathutils.Vector((sx * half.x, sy * half.y, sz * half.z))
                extent = max(extent, abs(p.x), abs(p.y))
    cam = cam_obj.data
    cam.type = "ORTHO"
    cam.ortho_scale = 2.2 * extent
    distance = 2 * radius + 1
    cam.clip_start = min(0.5, radius * 0.1)
    cam.clip_end = distance + 2 * radius + 1
    cam_obj.rotation_mode = "XYZ"
    cam_obj.rotation_euler = euler
    cam_obj.location = center + mathutils.Vector(direction) * distance


# --- pixels -----------------------------------------------------------------------------------------------


def _read_png(bpy: Any, path: str) -> tuple[int, int, array.array]:
    image = bpy.data.images.load(path, check_existing=False)
    try:
        width, height = (int(v) for v in image.size)
        pixels = array.array("f", bytes(4 * width * height * 4))
        image.pixels.foreach_get(pixels)
        return width, height, pixels
    finally:
        bpy.data.images.remove(image)


def _write_png(bpy: Any, path: str, width: int, height: int, pixels: array.array) -> None:
    image = bpy.data.images.new(_CAMERA_NAME, width, height, alpha=True)
    try:
        image.pixels.foreach_set(pixels)
        image.filepath_raw = path
        image.file_format = "PNG"
        image.save()
    finally:
        bpy.data.images.remove(image)


def _fill(grid: array.array, width: int, x0: int, y0: int, w: int, h: int, rgba: tuple[float, ...]) -> None:
    """Fill a rectangle (x0, y0 from the bottom-left, as Blender stores pixels)."""
    row = array.array("f", rgba * w)
    for y in range(y0, y0 + h):
        start = (y * width + x0) * 4
        grid[start : start + 4 * w] = row


def _label(grid: array.array, width: int, x0: int, top: int, text: str, scale: int) -> None:
    """Draw `text` in white on a dark box whose top-left corner is at (x0, top) (top counted from the
    bottom-left like Blender's pixels, so it is the box's highest row)."""
    text = text.upper()
    pad = 2 * scale
    box_w = len(text) * 6 * scale - scale + 2 * pad
    box_h = 7 * scale + 2 * pad
    _fill(grid, width, x0, top - box_h + 1, box_w, box_h, (0.0, 0.0, 0.0, 1.0))
    white = array.array("f", (1.0, 1.0, 1.0, 1.0) * scale)
    for i, ch in enumerate(text):
        rows = _FONT.get(ch, _FONT[" "]).split()
        gx = x0 + pad + i * 6 * scale
        for r, bits in enumerate(rows):
            for c, bit in enumerate(bits):
                if bit != "1":
                    continue
                for dy in range(scale):
                    y = top - pad - r * scale - dy
                    start = (y * width + gx + c * scale) * 4
                    grid[start : start + 4 * scale] = white


# --- the command ------------------------------------------------------------------------------------------


def look(params: dict[str, Any]) -> dict[str, Any]:
    """``look {views?, objects?, shading?, engine?, size?, samples?, device?, denoise?, filepath?, inline?,
    keep_file?}`` → one PNG grid of labelled views; see docs/PROTOCOL.md, "look"."""
    bpy = _bpy()
    scene = bpy.context.scene
    opts = _check(params, scene)
    started = time.perf_counter()
    warnings: list[str] = []
    viewport = not bpy.app.background and opts["engine"] is None
    window: Any = None
    area: Any = None
    region: Any = None
    if viewport:
        try:
            window, area = commands._largest_view3d(bpy)
        except CommandError:
            viewport = False
            warnings.append("no 3D viewport is open: rendered with Workbench instead of the viewport")
        else:
            region = next((r for r in area.regions if r.type == "WINDOW"), None)
            if region is None:
                viewport = False
    engine_name = opts["engine"] or "WORKBENCH"
    shading = opts["shading"]
    if not viewport and opts["engine"] is None and shading in ("material", "rendered"):
        warnings.append(
            f"shading {shading!r} without a viewport uses Workbench with material colours: pass engine EEVEE or "
            "CYCLES for a real material render"
        )
    # Transforms set from Python since the last depsgraph evaluation are not in matrix_world yet.
    bpy.context.view_layer.update()
    bounds = _bounds(opts["objects"])
    empty = bounds is None
    lo, hi = bounds if bounds is not None else ([-1.0] * 3, [1.0] * 3)
    size = opts["size"]
    views: list[str] = opts["views"]
    cols = math.ceil(math.sqrt(len(views)))
    rows = math.ceil(len(views) / cols)
    width = cols * size + (cols - 1) * _GAP
    height = rows * size + (rows - 1) * _GAP

    saved: list[tuple[Any, str, Any]] = []

    def setattr_saved(obj: Any, attr: str, value: Any) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def report(i: float, message: str) -> None:
        try:
            commands._core.report_progress(i, float(len(views) + 1), message)
        except BaseException:  # progress must never break a look
            pass

    created_cam = cam_obj = None
    modifiers: list[tuple[Any, Any, Any]] = []  # (object, our modifier, its active modifier before)
    slot_state = commands._RenderSlot(bpy)
    tile_path = ""
    path = ""
    temporary = False
    engine = "viewport" if viewport else ""
    try:
        r = scene.render
        if viewport:
            space = area.spaces.active
            rv3d = space.region_3d
            for attr in ("view_perspective", "view_location", "view_rotation", "view_distance"):
                value = getattr(rv3d, attr)
                saved.append((rv3d, attr, value.copy() if hasattr(value, "copy") else value))
            setattr_saved(space, "use_local_camera", False)
            # Without overlays: no grid, selection outlines or the temporary camera drawn in the views.
            setattr_saved(space.overlay, "show_overlays", False)
            _viewport_shading(space.shading, shading, setattr_saved)
            if shading == "rendered" and opts["engine"] is None:
                engine = f"viewport ({r.engine})"
        else:
            engine = commands._set_engine(scene, engine_name, setattr_saved)
            if engine == "CYCLES" or engine.startswith("BLENDER_EEVEE"):
                commands._engine_settings(
                    bpy,
                    scene,
                    engine,
                    opts["samples"],
                    opts["device"],
                    opts["denoise"],
                    setattr_saved,
                    warnings,
                )
            if engine == "BLENDER_WORKBENCH":
                _workbench_shading(scene.display.shading, shading, setattr_saved)
                # A look is a preview: anti-aliased as the viewport is (FXAA by default), not as a final render
                # (8 samples, about 3x slower in software GL).
                if scene.display.render_aa != scene.display.viewport_aa:
                    setattr_saved(scene.display, "render_aa", scene.display.viewport_aa)
            if shading == "wireframe" and engine == "BLENDER_WORKBENCH":
                # Workbench renders no wireframes: a temporary Wireframe modifier on each mesh shows the edges.
                # About 1.5 pixels wide: a tile spans at most 2.2 times the box's half diagonal.
                radius = math.dist(lo, hi) / 2
                thickness = max(1.5 * 2.2 * radius / size, 1e-5)
                for obj in opts["objects"] if opts["named"] else list(scene.objects):
                    if obj.type != "MESH":
                        continue
                    active = obj.modifiers.active if hasattr(obj.modifiers, "active") else None
                    mod = obj.modifiers.new(_CAMERA_NAME, "WIREFRAME")
                    mod.thickness = thickness
                    mod.use_replace = True
                    mod.use_even_offset = True
                    modifiers.append((obj, mod, active))
        setattr_saved(r, "resolution_x", size)
        setattr_saved(r, "resolution_y", size)
        setattr_saved(r, "resolution_percentage", 100)
        setattr_saved(r, "use_border", False)
        setattr_saved(r.image_settings, "file_format", "PNG")
        setattr_saved(r.image_settings, "color_mode", "RGBA")
        setattr_saved(r.image_settings, "color_depth", "8")
        if "camera" in views or any(v != "camera" for v in views):
            setattr_saved(scene, "camera", scene.camera)
        if any(v != "camera" for v in views):
            created_cam = bpy.data.cameras.new(_CAMERA_NAME)
            cam_obj = bpy.data.objects.new(_CAMERA_NAME, created_cam)
            scene.collection.objects.link(cam_obj)
        fd, tile_path = tempfile.mkstemp(prefix="bld_remote_look_tile_", suffix=".png")
        os.close(fd)
        slot_state.enter()
        user_camera = scene.camera
        grid = array.array("f", _BACKGROUND * (width * height))
        placed = []
        for i, view in enumerate(views):
            report(float(i), f"rendering view {i + 1}/{len(views)} ({view}) with {engine}")
            row, col = divmod(i, cols)
            if view == "camera":
                scene.camera = user_camera
                # The scene camera keeps its own aspect ratio: fitted into the tile, centred.
                sx = max(
                    1, saved_value(saved, r, "resolution_x") * saved_value(saved, r, "resolution_percentage")
                )
                sy = max(
                    1, saved_value(saved, r, "resolution_y") * saved_value(saved, r, "resolution_percentage")
                )
                tw, th = (
                    (size, max(1, round(size * sy / sx)))
                    if sx >= sy
                    else (max(1, round(size * sx / sy)), size)
                )
            else:
                scene.camera = cam_obj
                _place(cam_obj, view, lo, hi)
                tw, th = size, size
            r.resolution_x, r.resolution_y = tw, th
            if viewport:
                rv3d.view_perspective = "CAMERA"
                _render_viewport(bpy, window, area, region)
            else:
                bpy.ops.render.render(write_still=False)
            result = bpy.data.images.get("Render Result")
            if result is None:
                raise CommandError(f"the render of view {view!r} produced no image")
            result.save_render(tile_path, scene=scene)
            w, h, pixels = _read_png(bpy, tile_path)
            x0 = col * (size + _GAP) + (size - w) // 2
            y0 = (rows - 1 - row) * (size + _GAP) + (size - h) // 2
            for y in range(min(h, size)):
                start = ((y0 + y) * width + x0) * 4
                grid[start : start + 4 * min(w, size)] = pixels[y * w * 4 : y * w * 4 + 4 * min(w, size)]
            top = (rows - 1 - row) * (size + _GAP) + size - 1
            _label(grid, width, col * (size + _GAP), top, view, max(1, size // 160))
            placed.append({"name": view, "row": row, "col": col})
        report(float(len(views)), "composing the grid")
        if opts["filepath"] is not None:
            path = opts["filepath"]
        else:
            fd, path = tempfile.mkstemp(prefix="bld_remote_look_", suffix=".png")
            os.close(fd)
            temporary = True
        _write_png(bpy, path, width, height, grid)
    except BaseException:
        if temporary and path:
            _remove(path)
        raise
    finally:
        if tile_path:
            _remove(tile_path)
        slot_state.leave()
        for obj, mod, active in reversed(modifiers):
            try:
                obj.modifiers.remove(mod)
                if active is not None:
                    obj.modifiers.active = active
            except Exception:
                pass
        for obj, attr, value in reversed(saved):
            try:
                setattr(obj, attr, value)
            except Exception:  # restore what can be restored
                pass
        if cam_obj is not None:
            bpy.data.objects.remove(cam_obj, do_unlink=True)
        if created_cam is not None:
            bpy.data.cameras.remove(created_cam)
    framed = [o.name for o in opts["objects"]]
    text = _text(views, cols, rows, width, height, framed, opts["named"], empty, engine, shading)
    reply: dict[str, Any] = {
        "width": width,
        "height": height,
        "tile": size,
        "columns": cols,
        "rows": rows,
        "views": placed,
        "objects": framed,
        "empty": empty,
        "bounds": {"min": lo, "max": hi},
        "engine": engine,
        "shading": shading,
        "mode": "viewport" if viewport else "render",
        "duration": time.perf_counter() - started,
        "format": "png",
        "mime_type": "image/png",
        "size": os.path.getsize(path),
        "warnings": warnings,
    }
    if warnings:
        text += " Note: " + "; ".join(warnings) + "."
    if opts["inline"]:
        with open(path, "rb") as f:
            reply["data"] = f.read()  # bytes → base64 on the network thread
        if temporary and not opts["keep_file"]:
            _remove(path)
        else:
            reply["filepath"] = path
        reply["temporary"] = False
    else:
        reply["filepath"] = path
        reply["temporary"] = temporary and not opts["keep_file"]
    if opts["keep_file"] or opts["filepath"] is not None:
        text += f" Full-size image: {path}"
    reply["text"] = text
    report(float(len(views) + 1), "done")
    return reply


def saved_value(saved: list[tuple[Any, str, Any]], obj: Any, attr: str) -> Any:
    """The value an attribute had before the look changed it."""
    for o, a, v in saved:
        if o == obj and a == attr:
            return v
    return getattr(obj, attr)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _text(
    views: list[str],
    cols: int,
    rows: int,
    width: int,
    height: int,
    framed: list[str],
    named: bool,
    empty: bool,
    engine: str,
    shading: str,
) -> str:
    order = "; ".join(f"row {r + 1}: " + ", ".join(views[r * cols : (r + 1) * cols]) for r in range(rows))
    if empty:
        what = "The scene has no visible objects to frame: the views show an empty scene around the origin."
    else:
        shown = ", ".join(framed[:20]) + (f" and {len(framed) - 20} more" if len(framed) > 20 else "")
        what = f"Framed {'the named' if named else 'every visible'} object{'s' if len(framed) != 1 else ''}: {shown}."
    return (
        f"{len(views)} views in a {cols}x{rows} grid ({width}x{height} px), left to right, top to bottom: "
        f"{order}. {what} Shading {shading}, {engine}."
    )


def _viewport_shading(shading: Any, mode: str, setattr_saved: Any) -> None:
    kind = {
        "solid": "SOLID",
        "material": "MATERIAL",
        "rendered": "RENDERED",
        "wireframe": "WIREFRAME",
        "xray": "SOLID",
    }
    setattr_saved(shading, "type", kind[mode])
    if mode == "xray":
        setattr_saved(shading, "show_xray", True)
    elif mode == "solid":
        setattr_saved(shading, "show_xray", False)


def _workbench_shading(shading: Any, mode: str, setattr_saved: Any) -> None:
    """The scene's own Workbench settings, changed only as far as the shading asks."""
    if mode == "xray":
        setattr_saved(shading, "show_xray", True)
        if shading.xray_alpha > 0.8:
            setattr_saved(shading, "xray_alpha", 0.5)
    else:
        setattr_saved(shading, "show_xray", False)
    if mode in ("material", "rendered"):
        setattr_saved(shading, "color_type", "MATERIAL")


def _render_viewport(bpy: Any, window: Any, area: Any, region: Any) -> None:
    """The viewport's own drawing, through the scene camera, into "Render Result"."""
    if hasattr(bpy.context, "temp_override"):
        with bpy.context.temp_override(window=window, area=area, region=region):
            bpy.ops.render.opengl(write_still=False, view_context=True)
    else:  # Blender < 3.2
        bpy.ops.render.opengl(
            {"window": window, "area": area, "region": region}, write_still=False, view_context=True
        )
