"""``export_scene``: write the scene (or named objects) as glb, gltf, fbx, obj or usd with Blender's own
exporters, and return the file's path, size and, when small, its bytes (docs/PROTOCOL.md, "export_scene").

Runs on Blender's main thread only (called through ``commands.dispatch``). It leaves nothing behind: the
selection and the active object are put back as they were, and no undo step is pushed (it is not in
``commands.CHANGES_DATA``; operators called from Python push none of their own). The bytes go back as
Python ``bytes``, which the native side turns into base64 on the network thread.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import time
from typing import Any

from . import commands

# Sent inline without being asked up to this size; with ``inline: true`` up to INLINE_MAX.
INLINE_DEFAULT_MAX = 256 * 1024
INLINE_MAX = 64 * 1024 * 1024

# Temp folders this process made for exports without a filepath: the newest few are kept for clients
# to read, older ones are removed.
_TEMP_DIRS: collections.deque[str] = collections.deque()
_TEMP_KEPT = 16


class _Exporter:
    def __init__(
        self, module: str, op: str, selection: str, kwargs: dict[str, Any] | None = None, addon: str = ""
    ) -> None:
        self.module, self.op, self.selection = module, op, selection
        self.kwargs = kwargs or {}
        self.addon = addon

    @property
    def name(self) -> str:
        return f"bpy.ops.{self.module}.{self.op}"

    def available(self, bpy: Any) -> bool:
        try:
            getattr(getattr(bpy.ops, self.module), self.op).get_rna_type()
        except (AttributeError, KeyError, RuntimeError):
            return False
        return True

    def run(self, bpy: Any, path: str, selected: bool, extra: dict[str, Any] | None = None) -> Any:
        kwargs = {**self.kwargs, **(extra or {}), "filepath": path}
        if selected:
            kwargs[self.selection] = True
        return getattr(getattr(bpy.ops, self.module), self.op)(**kwargs)


# format → (extension, MIME type, exporters in the order tried).
FORMATS: dict[str, tuple[str, str, list[_Exporter]]] = {
    "glb": (
        ".glb",
        "model/gltf-binary",
        [_Exporter("export_scene", "gltf", "use_selection", {"export_format": "GLB"}, "io_scene_gltf2")],
    ),
    # One self-contained .gltf where Blender still offers it (GLTF_EMBEDDED, gone in 4.x and later),
    # else .gltf + .bin (+ textures) side by side (listed in `files`).
    "gltf": (
        ".gltf",
        "model/gltf+json",
        [
            _Exporter(
                "export_scene", "gltf", "use_selection", {"export_format": "GLTF_EMBEDDED"}, "io_scene_gltf2"
            )
        ],
    ),
    "fbx": (
        ".fbx",
        "application/octet-stream",
        [_Exporter("export_scene", "fbx", "use_selection", {}, "io_scene_fbx")],
    ),
    "obj": (
        ".obj",
        "model/obj",
        [
            _Exporter("wm", "obj_export", "export_selected_objects"),  # Blender 3.2 and later
            _Exporter("export_scene", "obj", "use_selection", {}, "io_scene_obj"),  # the older add-on
        ],
    ),
    "usd": (".usd", "model/vnd.usd", [_Exporter("wm", "usd_export", "selected_objects_only")]),
}


def _missing(bpy: Any, fmt: str, exporters: list[_Exporter]) -> str:
    names = " or ".join(e.name for e in exporters)
    addons = [e.addon for e in exporters if e.addon]
    text = f"this Blender ({bpy.app.version_string}) has no {fmt} exporter ({names} is not available)"
    if addons:
        text += f": enable the add-on {' or '.join(addons)} (Preferences > Add-ons), if this build ships it"
    elif fmt == "usd":
        text += ": this Blender was built without USD support"
    return text


def _new_temp_dir() -> str:
    d = tempfile.mkdtemp(prefix="bld_remote_export_")
    _TEMP_DIRS.append(d)
    while len(_TEMP_DIRS) > _TEMP_KEPT:
        shutil.rmtree(_TEMP_DIRS.popleft(), ignore_errors=True)
    return d


def _params(params: dict[str, Any]) -> tuple[str, list[str] | None, str | None, bool | None]:
    fmt = params.get("format")
    if not isinstance(fmt, str) or fmt.strip().lower() not in FORMATS:
        raise commands.CommandError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    objects = params.get("objects")
    if objects is not None:
        if not isinstance(objects, list) or not objects or not all(isinstance(n, str) and n for n in objects):
            raise commands.CommandError(
                f"objects must be a non-empty list of object names (or left out for the whole scene), got {objects!r}"
            )
    filepath = params.get("filepath")
    if filepath is not None and (not isinstance(filepath, str) or not filepath.strip()):
        raise commands.CommandError("filepath must be a non-empty string (or left out for a temp file)")
    inline = params.get("inline")
    if inline is not None and not isinstance(inline, bool):
        raise commands.CommandError(
            f"inline must be true or false (default: inline when at most {INLINE_DEFAULT_MAX} bytes), got {inline!r}"
        )
    return fmt.strip().lower(), objects, filepath, inline


def export_scene(params: dict[str, Any]) -> dict[str, Any]:
    """Export the scene, or only ``objects``, in ``format`` to ``filepath`` (default: a fresh temp file)."""
    bpy = commands._bpy()
    fmt, names, filepath, inline = _params(params)
    ext, mime, exporters = FORMATS[fmt]
    exporter = next((e for e in exporters if e.available(bpy)), None)
    if exporter is None:
        raise commands.CommandError(_missing(bpy, fmt, exporters), format=fmt)
    view_layer = bpy.context.view_layer
    chosen: list[Any] = []
    if names is not None:
        unknown = [n for n in names if bpy.data.objects.get(n) is None]
        if unknown:
            raise commands.CommandError(
                f"objects not found: {', '.join(map(repr, unknown))}", unknown=unknown
            )
        chosen = [bpy.data.objects[n] for n in dict.fromkeys(names)]
        outside = [o.name for o in chosen if view_layer.objects.get(o.name) is None]
        if outside:
            raise commands.CommandError(
                f"objects not in the current view layer ({view_layer.name!r}), so they cannot be exported: "
                f"{', '.join(map(repr, outside))}"
            )
    temporary = filepath is None
    if filepath is None:
        path = os.path.join(_new_temp_dir(), "scene" + ext)
    else:
        path = os.path.abspath(os.path.expanduser(filepath))
        if os.path.splitext(path)[1].lower() != ext:
            path += ext
        if not os.path.isdir(os.path.dirname(path)):
            raise commands.CommandError(f"the folder for filepath does not exist: {os.path.dirname(path)}")
    folder = os.path.dirname(path)
    existing = set(os.listdir(folder))

    selection = [(o, o.select_get()) for o in view_layer.objects]
    active = view_layer.objects.active
    started = time.perf_counter()
    try:
        if chosen:
            for o, was in selection:
                if was:
                    o.select_set(False)
            for o in chosen:
                o.select_set(True)
        extra: dict[str, Any] = {}
        try:
            result = exporter.run(bpy, path, bool(chosen), extra)
        except TypeError as exc:
            if fmt == "gltf" and "GLTF_EMBEDDED" in str(exc):  # Blender 4 and later: separate files only
                result = exporter.run(bpy, path, bool(chosen), {"export_format": "GLTF_SEPARATE"})
            else:
                raise
    except commands.CommandError:
        raise
    except Exception as exc:
        message = str(exc).strip()
        hint = ""
        if "No module named 'numpy'" in message:
            hint = " (this Blender's glTF exporter needs numpy, which its Python lacks; on Debian: python3-numpy)"
        raise commands.CommandError(
            f"the {fmt} exporter ({exporter.name}) failed: {message.splitlines()[-1] if message else type(exc).__name__}"
            f"{hint}",
            format=fmt,
            exporter=exporter.name,
            detail=message[-4000:],
        ) from None
    finally:
        for o, was in selection:
            try:
                if o.select_get() != was:
                    o.select_set(was)
            except (ReferenceError, RuntimeError):
                pass
        try:
            if view_layer.objects.active != active:
                view_layer.objects.active = active
        except (ReferenceError, RuntimeError):
            pass
    duration = time.perf_counter() - started
    if "FINISHED" not in result or not os.path.isfile(path):
        raise commands.CommandError(
            f"the {fmt} exporter ({exporter.name}) wrote no file (it returned {sorted(result)})",
            format=fmt,
            exporter=exporter.name,
        )
    size = os.path.getsize(path)
    others = sorted(set(os.listdir(folder)) - existing - {os.path.basename(path)})
    reply: dict[str, Any] = {
        "filepath": path,
        "bytes": size,
        "format": fmt,
        "mime_type": mime,
        "exporter": exporter.name,
        "objects": [o.name for o in chosen] if chosen else None,
        "temporary": temporary,
        "duration": duration,
    }
    if others:
        reply["files"] = [os.path.join(folder, f) for f in others]
    limit = 0 if inline is False else INLINE_MAX if inline else INLINE_DEFAULT_MAX
    if size <= limit:
        with open(path, "rb") as f:
            reply["data"] = f.read()  # bytes → base64 on the network thread
        reply["encoding"] = "base64"
    elif inline:
        reply["inline_error"] = f"{size} bytes is more than the {INLINE_MAX} sent inline: read filepath"
    return reply
