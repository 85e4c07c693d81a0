"""Command handlers that need ``bpy``: one function per command, in one table.

Runs on Blender's main thread only, called by the pump through ``dispatch``. Everything that does not need
``bpy`` (ping, status, persist data, the probes, shutdown, base64, serialisation) is answered by the native
side on network threads and never reaches this module.
"""

from __future__ import annotations

import io
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, Callable


class CommandError(Exception):
    """A command failed in a way the client should see: message plus extra reply fields."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


def dispatch(command: str, params: dict[str, Any]) -> tuple[bool, Any]:
    """Run one command. Never raises: returns ``(True, result)`` or ``(False, {"message": ..., ...})``."""
    handler = HANDLERS.get(command)
    if handler is None:
        return False, {"message": f"Unknown command type: {command}"}
    try:
        return True, handler(params)
    except CommandError as exc:
        return False, {"message": exc.message, **exc.extra}
    except BaseException as exc:  # noqa: BLE001 - nothing a client sends may escape into Blender
        return False, {
            "message": f"{type(exc).__name__}: {exc}",
            "exception": type(exc).__name__,
            "traceback": traceback.format_exc(),
        }


def _bpy():
    import bpy

    return bpy


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """Blender values → JSON-friendly ones: vectors, colours, matrices → lists; data-blocks → their name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if _depth > 50:
        return repr(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v, _depth + 1) for v in value]
    bpy = _bpy()
    if isinstance(value, bpy.types.ID):
        return value.name
    try:
        import mathutils
    except ImportError:  # pragma: no cover - always present in Blender
        mathutils = None
    if mathutils is not None:
        if isinstance(value, mathutils.Matrix):
            return [list(row) for row in value]
        if isinstance(value, (mathutils.Vector, mathutils.Euler, mathutils.Quaternion, mathutils.Color)):
            return list(value)
    if isinstance(value, bpy.types.bpy_struct):
        name = getattr(value, "name", None)
        return name if isinstance(name, str) else repr(value)
    if type(value).__name__ in ("bpy_prop_array", "bpy_prop_collection", "IDPropertyArray"):
        try:
            return [to_jsonable(v, _depth + 1) for v in value]
        except TypeError:
            pass
    return repr(value)


def _vec(v: Any) -> list[float]:
    return [float(c) for c in v]


def get_scene_info(params: dict[str, Any]) -> dict[str, Any]:
    bpy = _bpy()
    scene = bpy.context.scene
    objects = [
        {
            "name": obj.name,
            "type": obj.type,
            "location": _vec(obj.location),
            "visible": obj.visible_get(),
        }
        for obj in scene.objects
    ]
    return {
        "name": scene.name,
        "object_count": len(objects),
        "objects": objects,
        "truncated": False,
        "materials_count": len(bpy.data.materials),
        "frame_current": scene.frame_current,
        "frame_start": scene.frame_start,
        "frame_end": scene.frame_end,
        "active_object": obj.name if (obj := bpy.context.view_layer.objects.active) else None,
        "render_engine": scene.render.engine,
        "blend_file": bpy.data.filepath or None,
    }


def get_object_info(params: dict[str, Any]) -> dict[str, Any]:
    bpy = _bpy()
    name = params.get("name")
    if not isinstance(name, str) or not name:
        raise CommandError("get_object_info needs 'name' (an object name)")
    obj = bpy.data.objects.get(name)
    if obj is None:
        raise CommandError(f"Object not found: {name}")
    info: dict[str, Any] = {
        "name": obj.name,
        "type": obj.type,
        "location": _vec(obj.location),
        "rotation": _vec(obj.rotation_euler),
        "scale": _vec(obj.scale),
        "visible": obj.visible_get(),
        "dimensions": _vec(obj.dimensions),
        "materials": [slot.material.name for slot in obj.material_slots if slot.material],
        "parent": obj.parent.name if obj.parent else None,
        "collections": [c.name for c in obj.users_collection],
    }
    if obj.type == "MESH" and obj.data is not None:
        mesh = obj.data
        info["mesh"] = {
            "vertices": len(mesh.vertices),
            "edges": len(mesh.edges),
            "polygons": len(mesh.polygons),
        }
    return info


def execute_code(params: dict[str, Any]) -> dict[str, Any]:
    """Run Python with ``bpy`` in a fresh namespace; capture stdout and stderr; return a ``result`` variable.

    The native side has already decoded base64 code and will shape the reply (base64 output included).
    """
    bpy = _bpy()
    code = params.get("code")
    if not isinstance(code, str):
        raise CommandError("execute_code needs 'code' (a string of Python)")
    namespace: dict[str, Any] = {"bpy": bpy, "__name__": "__main__", "__builtins__": __builtins__}
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    try:
        compiled = compile(code, "<bld_remote>", "exec")
        with redirect_stdout(out), redirect_stderr(err):
            exec(compiled, namespace)  # noqa: S102 - running client code is this tool's purpose
    except BaseException as exc:  # noqa: BLE001 - SystemExit in client code must not end Blender
        # Start the traceback at the client's code, not at this exec() frame.
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        raise CommandError(
            f"{type(exc).__name__}: {exc}",
            exception=type(exc).__name__,
            traceback="".join(traceback.format_exception(type(exc), exc, tb)),
            output={"stdout": out.getvalue(), "stderr": err.getvalue()},
            duration=time.perf_counter() - started,
        ) from None
    reply: dict[str, Any] = {
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "duration": time.perf_counter() - started,
    }
    if "result" in namespace:
        reply["value"] = to_jsonable(namespace["result"])
    return reply


HANDLERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "get_scene_info": get_scene_info,
    "get_object_info": get_object_info,
    "execute_code": execute_code,
}
