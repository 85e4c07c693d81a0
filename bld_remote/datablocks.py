"""Materials, collections and paged name listings (the wire commands behind the MCP resources), and the
cheap watch that tells clients when objects, materials or collections come or go.

Runs on Blender's main thread (handlers, through ``commands.dispatch``; the watch, from Blender's own
``depsgraph_update_post`` and ``load_post`` handlers and after each ``execute_code``). Each handler reads only
what it returns: bounded lists, the totals when cut. The watch compares three lengths and hands them to the
native side (``_core.note_datablock_counts``), which bumps the ``scene_generation`` number that
``get_status`` reports on a network thread; nothing here runs per poll.
"""

from __future__ import annotations

import difflib
from typing import Any

from . import _core
from .commands import CommandError

# Longest page a client may ask for, and the page when it gives no limit.
_MAX_LIMIT = 10000
_DEFAULT_LIMIT = 100
# Largest offset accepted (past the end is an empty page, not an error).
_MAX_OFFSET = 1 << 31
# Nodes and child collections listed at most (the totals are always given).
_MAX_NODES = 200
_MAX_CHILDREN = 1000

_LIST_TYPES = ("objects", "materials", "collections")

# Principled BSDF inputs worth showing, by their name in Blender 3.x and later (4.0 renamed a few).
_PRINCIPLED_INPUTS = (
    "Base Color",
    "Metallic",
    "Roughness",
    "Alpha",
    "IOR",
    "Emission",
    "Emission Color",
    "Emission Strength",
    "Transmission",
    "Transmission Weight",
    "Normal",
)


def _bpy() -> Any:
    import bpy

    return bpy


def _int_param(params: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    """``params[name]`` as a whole number from ``low`` to ``high`` (an integral float counts), the default when
    absent or null; anything else is a CommandError naming it and its range (docs/PROTOCOL.md, "Numbers")."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CommandError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def _name_param(params: dict[str, Any], command: str, what: str) -> str:
    name = params.get("name")
    if not isinstance(name, str) or not name:
        raise CommandError(f"{command} needs 'name' (a {what} name, a non-empty string), got {name!r}")
    return name


def _not_found(kind: str, name: str, names: Any) -> CommandError:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return CommandError(f"{kind} not found: {name!r}{hint}", not_found=True, close_matches=close)


def _value(v: Any) -> Any:
    """A socket's default value as JSON: numbers as they are, arrays (colours, vectors) as lists."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    try:
        return [float(c) for c in v]
    except (TypeError, ValueError):
        return repr(v)


# --- get_material_info ------------------------------------------------------------------------------------


def get_material_info(params: dict[str, Any]) -> dict[str, Any]:
    """A material by name: users, fake user, viewport colour/metallic/roughness, blend mode, whether it uses
    nodes, its first nodes (name, type, label; at most 200, with the total) and the key Principled BSDF inputs
    (value, or ``linked: true`` when a link drives it)."""
    bpy = _bpy()
    name = _name_param(params, "get_material_info", "material")
    mat = bpy.data.materials.get(name)
    if mat is None:
        raise _not_found("Material", name, bpy.data.materials.keys())
    info: dict[str, Any] = {
        "name": mat.name,
        "users": mat.users,
        "use_fake_user": mat.use_fake_user,
        "is_grease_pencil": bool(getattr(mat, "is_grease_pencil", False)),
        "diffuse_color": _value(mat.diffuse_color),
        "metallic": mat.metallic,
        "roughness": mat.roughness,
        "blend_method": getattr(mat, "blend_method", None),
        "library": mat.library.filepath if mat.library else None,
    }
    # use_nodes is deprecated in Blender 5 (always on) but still readable; a node tree is what counts.
    info["use_nodes"] = bool(getattr(mat, "use_nodes", mat.node_tree is not None))
    tree = mat.node_tree
    nodes: list[dict[str, Any]] = []
    principled = None
    total = 0
    if tree is not None:
        total = len(tree.nodes)
        for i, node in enumerate(tree.nodes):
            if i < _MAX_NODES:
                entry = {"name": node.name, "type": node.type}
                if node.label:
                    entry["label"] = node.label
                nodes.append(entry)
            if principled is None and node.type == "BSDF_PRINCIPLED":
                principled = node
            if i >= _MAX_NODES and principled is not None:
                break
    info["node_count"] = total
    info["nodes"] = nodes
    info["nodes_truncated"] = total > len(nodes)
    info["principled"] = _principled(principled) if principled is not None else None
    return info


def _principled(node: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {"node": node.name}
    for key in _PRINCIPLED_INPUTS:
        socket = node.inputs.get(key)
        if socket is None:
            continue
        if socket.is_linked:
            inputs[key] = {"linked": True}
        elif hasattr(socket, "default_value"):
            inputs[key] = _value(socket.default_value)
    return inputs


# --- get_collection_info ----------------------------------------------------------------------------------


def _find_layer_collection(layer: Any, collection: Any) -> Any:
    stack = [layer]
    while stack:
        lc = stack.pop()
        if lc.collection == collection:
            return lc
        stack.extend(lc.children)
    return None


def get_collection_info(params: dict[str, Any]) -> dict[str, Any]:
    """A collection by name (the scene's own top collection too, as "Scene Collection"): a page of its
    objects (``limit``, default 100, at most 10000; ``offset``), their total, its child collections (at most
    1000), its hide and exclude flags, and how many objects it holds with its children's."""
    bpy = _bpy()
    name = _name_param(params, "get_collection_info", "collection")
    limit = _int_param(params, "limit", 1, _MAX_LIMIT, _DEFAULT_LIMIT)
    offset = _int_param(params, "offset", 0, _MAX_OFFSET, 0)
    scene = bpy.context.scene
    coll = bpy.data.collections.get(name)
    master = False
    if coll is None and name == scene.collection.name:
        coll, master = scene.collection, True
    if coll is None:
        raise _not_found("Collection", name, [*bpy.data.collections.keys(), scene.collection.name])
    objects = coll.objects
    total = len(objects)
    page = [o.name for o in objects[offset : offset + limit]] if offset < total else []
    children = coll.children
    info: dict[str, Any] = {
        "name": coll.name,
        "scene_collection": master,
        "object_count": total,
        "offset": offset,
        "limit": limit,
        "objects": page,
        "truncated": offset + len(page) < total,
        "all_object_count": len(coll.all_objects),
        "children": [c.name for c in children[:_MAX_CHILDREN]],
        "children_count": len(children),
        "hide_viewport": bool(getattr(coll, "hide_viewport", False)),
        "hide_render": bool(getattr(coll, "hide_render", False)),
        "hide_select": bool(getattr(coll, "hide_select", False)),
        "users": coll.users,
        "color_tag": getattr(coll, "color_tag", None),
    }
    if info["truncated"]:
        info["next_offset"] = offset + len(page)
    # The current view layer's own switches (the checkbox and the eye in the outliner).
    lc = _find_layer_collection(bpy.context.view_layer.layer_collection, coll)
    info["view_layer"] = (
        None
        if lc is None
        else {"name": bpy.context.view_layer.name, "exclude": lc.exclude, "hide_viewport": lc.hide_viewport}
    )
    return info


# --- list_datablocks --------------------------------------------------------------------------------------


def list_datablocks(params: dict[str, Any]) -> dict[str, Any]:
    """A page of names: ``type`` is ``objects`` (the current scene's), ``materials`` or ``collections`` (the
    file's); ``limit`` (default 100, at most 10000) and ``offset``. Returns the names, the total, and
    ``next_offset`` when there are more."""
    bpy = _bpy()
    kind = params.get("type")
    if kind not in _LIST_TYPES:
        raise CommandError(f"type must be one of {', '.join(_LIST_TYPES)}, got {kind!r}")
    limit = _int_param(params, "limit", 1, _MAX_LIMIT, _DEFAULT_LIMIT)
    offset = _int_param(params, "offset", 0, _MAX_OFFSET, 0)
    if kind == "objects":
        items = bpy.context.scene.objects
    elif kind == "materials":
        items = bpy.data.materials
    else:
        items = bpy.data.collections
    total = len(items)
    names = [i.name for i in items[offset : offset + limit]] if offset < total else []
    reply: dict[str, Any] = {"type": kind, "total": total, "offset": offset, "limit": limit, "names": names}
    if offset + len(names) < total:
        reply["next_offset"] = offset + len(names)
    return reply


# --- the watch --------------------------------------------------------------------------------------------


def note_changes(*_args: Any) -> None:
    """Hand the numbers of objects, materials and collections to the native side, which bumps
    ``scene_generation`` when they differ from the last ones (three ``len`` calls; never raises)."""
    try:
        data = _bpy().data
        _core.note_datablock_counts(len(data.objects), len(data.materials), len(data.collections))
    except BaseException:  # restricted data during registration, or no bpy at all: nothing to count
        pass


def _on_load(*_args: Any) -> None:
    """A file was loaded: everything may be new, even with the same counts."""
    _core.bump_scene_generation()
    note_changes()


def _handler_lists() -> list[tuple[Any, Any]]:
    handlers = _bpy().app.handlers
    return [(handlers.depsgraph_update_post, note_changes), (handlers.load_post, _on_load)]


def _persistent() -> None:
    # Kept across File > Open (Blender drops non-persistent handlers on load).
    persistent = _bpy().app.handlers.persistent
    for fn in (note_changes, _on_load):
        persistent(fn)


def _ours(fn: Any) -> bool:
    # By name and module too, so an instance of this module from before a reload is removed as well.
    return getattr(fn, "__module__", None) == __name__ and getattr(fn, "__name__", None) in (
        "note_changes",
        "_on_load",
    )


def watch() -> None:
    """Register the handlers (once; called by ``start_mcp_service``) and take the first counts."""
    try:
        _persistent()
        for handlers, fn in _handler_lists():
            if fn not in handlers:
                handlers.append(fn)
    except ImportError:  # not inside Blender
        return
    note_changes()


def unwatch() -> None:
    """Remove the handlers (called by ``stop_mcp_service``, and so by the add-on's ``unregister()``)."""
    try:
        lists = _handler_lists()
    except ImportError:
        return
    for handlers, _fn in lists:
        for fn in [f for f in handlers if _ours(f)]:
            handlers.remove(fn)
