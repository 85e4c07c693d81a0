"""Scene queries for scenes of any size: ``get_scene_info`` (fields, filter, paging, summary) and
``get_object_info`` (its long lists paged). Runs on Blender's main thread, called through
``commands.dispatch``; the reply shapes are in docs/PROTOCOL.md, "Scene queries".

Everything a client sends is checked before ``bpy`` is touched. The query is one pass over the scene's
objects: the cheap tests first, the costly ones (``visible_get()``, ``select_get()``) only when the filter
asks for them, and a dict is built only for the objects of the page, with only the requested fields.
"""

from __future__ import annotations

import collections
import fnmatch
import math
import operator
import re
from array import array
from typing import Any, Callable, Iterable

from .commands import CommandError, _bpy

# Both paging numbers: whole numbers from 0 to this (no Blender file holds a billion objects).
MAX_PAGE = 1_000_000_000
# The default number of items per list of get_object_info.
OBJECT_LIST_DEFAULT = 100
# The summary's collection tree lists at most this many nodes.
TREE_NODES = 256
SCENE_COLLECTION = "Scene Collection"

_name = operator.attrgetter("name")
_type = operator.attrgetter("type")


def _data(o: Any) -> str | None:
    d = o.data
    return None if d is None else d.name


def _parent(o: Any) -> str | None:
    p = o.parent
    return None if p is None else p.name


def _materials(o: Any) -> list[str]:
    return [m.name for s in o.material_slots if (m := s.material) is not None]


FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": _name,
    "type": _type,
    "data": _data,
    "location": lambda o: o.location[:],
    "rotation": lambda o: o.rotation_euler[:],
    "scale": lambda o: o.scale[:],
    "dimensions": lambda o: o.dimensions[:],
    "visible": lambda o: o.visible_get(),
    "selected": lambda o: o.select_get(),
    "parent": _parent,
    "collections": lambda o: [c.name for c in o.users_collection],
    "materials": _materials,
}
DEFAULT_FIELDS = ("name", "type", "location", "visible")
FILTER_KEYS = ("type", "name", "collection", "selected", "visible")


def _whole(params: dict[str, Any], name: str, default: int | None) -> int | None:
    """``params[name]`` as a whole number from 0 to ``MAX_PAGE`` (an integral float such as 200.0 counts);
    ``default`` when absent or null. Negative, fractional, NaN, ±inf, huge, bool, string: a CommandError
    naming the parameter and its range."""
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PAGE:
        raise CommandError(f"{name} must be a whole number from 0 to {MAX_PAGE}, got {value!r}")
    return value


def _bool(params: dict[str, Any], name: str, where: str = "") -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise CommandError(f"{where}{name} must be true or false, got {value!r}")
    return value


def _fields(params: dict[str, Any]) -> tuple[str, ...]:
    value = params.get("fields")
    if value is None:
        return DEFAULT_FIELDS
    if value == "all":
        return tuple(FIELDS)
    if not isinstance(value, (list, tuple)) or not all(isinstance(f, str) for f in value):
        raise CommandError(
            f'fields must be a list of field names (or "all"), got {value!r}; the fields: {", ".join(FIELDS)}'
        )
    unknown = [f for f in value if f not in FIELDS]
    if unknown:
        raise CommandError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            f"the fields are {', '.join(FIELDS)}"
        )
    # name first, always; each field once, in the order asked.
    return tuple(dict.fromkeys(["name", *value]))


def _object_types(bpy: Any) -> tuple[str, ...]:
    return tuple(bpy.types.Object.bl_rna.properties["type"].enum_items.keys())


class _Filter:
    """The checked ``filter`` param. Everything but the collection's existence is checked before bpy."""

    def __init__(self, params: dict[str, Any]) -> None:
        f = params.get("filter")
        if f is None:
            f = {}
        if not isinstance(f, dict):
            raise CommandError(f"filter must be an object with any of {', '.join(FILTER_KEYS)}, got {f!r}")
        unknown = [k for k in f if k not in FILTER_KEYS]
        if unknown:
            raise CommandError(
                f"unknown filter key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                f"the keys are {', '.join(FILTER_KEYS)}"
            )
        types = f.get("type")
        if types is not None:
            if isinstance(types, str):
                types = [types]
            if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
                raise CommandError(
                    f'filter.type must be an object type (a string such as "MESH") or a list of them, '
                    f"got {f.get('type')!r}"
                )
            types = {t.upper() for t in types}
        self.types: set[str] | None = types
        name = f.get("name")
        if name is not None and not isinstance(name, str):
            raise CommandError(
                f'filter.name must be a string, a glob such as "Cube*" (fnmatch rules), got {name!r}'
            )
        self.name: str | None = name
        coll = f.get("collection")
        if coll is not None and not isinstance(coll, str):
            raise CommandError(f"filter.collection must be a collection's name (a string), got {coll!r}")
        self.collection: str | None = coll
        self.selected = _bool(f, "selected", "filter.")
        self.visible = _bool(f, "visible", "filter.")

    def empty(self) -> bool:
        return (
            self.types is None
            and self.name is None
            and self.collection is None
            and self.selected is None
            and self.visible is None
        )

    def check_types(self, bpy: Any) -> None:
        if self.types is None:
            return
        valid = _object_types(bpy)
        unknown = sorted(self.types.difference(valid))
        if unknown:
            raise CommandError(
                f"filter.type: unknown object type{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}: the types are {', '.join(valid)}"
            )

    def matches(self, bpy: Any, scene: Any) -> list[Any]:
        """The scene's objects that pass, in the scene's order (one pass; cheap tests first)."""
        base: Iterable[Any] = _scene_objects(scene)
        if self.collection is not None:
            base = _collection_objects(bpy, scene, self.collection)
        name = self.name
        if name is not None and not any(c in name for c in "*?["):
            # No wildcard: one lookup by name instead of a pass.
            obj = _scene_objects(scene).get(name)
            candidates: Iterable[Any] = [] if obj is None else [obj]
            if self.collection is not None and obj is not None:
                candidates = [o for o in base if o == obj]
            base = candidates
            name = None
        it: Iterable[Any] = base
        if self.types is not None:
            types = self.types
            it = (o for o in it if o.type in types)
        if name is not None:
            match = re.compile(fnmatch.translate(name)).match
            it = (o for o in it if match(o.name))
        if self.selected is not None:
            selected = self.selected
            it = (o for o in it if o.select_get() is selected)
        if self.visible is not None:
            visible = self.visible
            it = (o for o in it if o.visible_get() is visible)
        return list(it)


def _scene_objects(scene: Any) -> Any:
    """The scene's objects, in ``scene.objects``' order: the scene collection's ``all_objects``, the same
    objects in the same order, read from Blender's object cache (counting and slicing 10,000 objects: 0.17 ms,
    against 0.86 ms through ``scene.objects``, whose iterator deduplicates through a hash set)."""
    return scene.collection.all_objects


def _collection_objects(bpy: Any, scene: Any, name: str) -> Iterable[Any]:
    """The scene's objects in collection ``name`` or its children. Unknown name: an error."""
    if name == scene.collection.name or name == SCENE_COLLECTION:
        return _scene_objects(scene)
    coll = bpy.data.collections.get(name)
    if coll is None:
        names = [c.name for c in bpy.data.collections[:20]]
        more = len(bpy.data.collections) - len(names)
        raise CommandError(
            f"filter.collection: no collection named {name!r}; the collections: "
            f"{', '.join(map(repr, [SCENE_COLLECTION, *names]))}{f' and {more} more' if more > 0 else ''}"
        )
    objs = coll.all_objects
    if coll in scene.collection.children_recursive:
        return objs
    # A collection outside this scene's tree: only those of its objects that the scene holds too.
    in_scene = set(_scene_objects(scene))
    return [o for o in objs if o in in_scene]


def _common(bpy: Any, scene: Any) -> dict[str, Any]:
    active = bpy.context.view_layer.objects.active
    return {
        "materials_count": len(bpy.data.materials),
        "frame_current": scene.frame_current,
        "frame_start": scene.frame_start,
        "frame_end": scene.frame_end,
        "active_object": None if active is None else active.name,
        "render_engine": scene.render.engine,
        "blend_file": bpy.data.filepath or None,
    }


def _tree(scene: Any) -> tuple[dict[str, Any], int, bool]:
    """The scene's collection tree (at most TREE_NODES nodes), the number of distinct collections in it,
    and whether the tree was cut."""
    emitted = [0]
    cut = [False]

    def node(c: Any) -> dict[str, Any]:
        emitted[0] += 1
        children: list[dict[str, Any]] = []
        for child in c.children:
            if emitted[0] >= TREE_NODES:
                cut[0] = True
                break
            children.append(node(child))
        return {"name": c.name, "objects": len(c.objects), "children": children}

    root = node(scene.collection)
    return root, len(scene.collection.children_recursive), cut[0]


def get_scene_info(params: dict[str, Any]) -> dict[str, Any]:
    # Every parameter is checked before bpy is touched.
    fields = _fields(params)
    filt = _Filter(params)
    limit = _whole(params, "limit", None)
    offset = _whole(params, "offset", 0) or 0
    summary = _bool(params, "summary") or False
    bpy = _bpy()
    filt.check_types(bpy)
    scene = bpy.context.scene
    objects = _scene_objects(scene)
    object_count = len(objects)
    matched: list[Any] | None = None if filt.empty() else filt.matches(bpy, scene)
    total = object_count if matched is None else len(matched)

    if summary:
        counts = collections.Counter(o.type for o in (objects if matched is None else matched))
        tree, collection_count, cut = _tree(scene)
        camera = scene.camera
        render = scene.render
        return {
            "name": scene.name,
            "summary": True,
            "object_count": object_count,
            "total": total,
            "counts_by_type": dict(sorted(counts.items())),
            "collections": tree,
            "collection_count": collection_count,
            "collections_truncated": cut,
            "camera": None if camera is None else camera.name,
            "fps": render.fps / render.fps_base,
            **_common(bpy, scene),
        }

    end = total if limit is None else min(total, offset + limit)
    if offset >= end:
        page: list[Any] = []
    elif matched is None:
        page = objects[offset:end]  # sliced in C: objects outside the page are never Python objects
    else:
        page = matched[offset:end]
    if fields == DEFAULT_FIELDS:  # today's shape, and the most asked for: no per-field calls
        rows = [
            {"name": o.name, "type": o.type, "location": o.location[:], "visible": o.visible_get()}
            for o in page
        ]
    else:
        getters = [(f, FIELDS[f]) for f in fields]
        rows = [{f: get(o) for f, get in getters} for o in page]
    truncated = end < total
    reply: dict[str, Any] = {
        "name": scene.name,
        "object_count": object_count,
        "objects": rows,
        "total": total,
        "offset": offset,
        "limit": limit,
        "truncated": truncated,
    }
    if truncated:
        reply["next_offset"] = end
    reply.update(_common(bpy, scene))
    return reply


# --- get_object_info ---------------------------------------------------------------------------------------

OBJECT_LISTS = ("materials", "modifiers", "vertex_groups", "collections", "children", "vertices")
# Pages of more vertices than this are read with one foreach_get rather than vertex by vertex.
_FOREACH_FROM = 1000


def _vertices(mesh: Any, start: int, end: int) -> list[tuple[float, float, float]]:
    if end - start <= _FOREACH_FROM:
        return [v.co[:] for v in mesh.vertices[start:end]]
    co = array("f", bytes(4 * 3 * len(mesh.vertices)))
    mesh.vertices.foreach_get("co", co)
    flat = co[3 * start : 3 * end]
    it = iter(flat)
    return list(zip(it, it, it))


def _list_page(obj: Any, which: str, offset: int, limit: int) -> tuple[list[Any], int]:
    """Items ``[offset, offset + limit)`` of one list of ``obj``, and the list's total length."""
    end = offset + limit
    if which == "materials":
        items = _materials(obj)
        return items[offset:end], len(items)
    if which == "modifiers":
        mods = obj.modifiers
        return [{"name": m.name, "type": m.type} for m in mods[offset:end]], len(mods)
    if which == "vertex_groups":
        groups = obj.vertex_groups
        return [g.name for g in groups[offset:end]], len(groups)
    if which == "collections":
        colls = obj.users_collection
        return [c.name for c in colls[offset:end]], len(colls)
    if which == "children":
        children = obj.children
        return [c.name for c in children[offset:end]], len(children)
    # vertices
    mesh = obj.data
    total = len(mesh.vertices)
    return _vertices(mesh, min(offset, total), min(end, total)), total


def get_object_info(params: dict[str, Any]) -> dict[str, Any]:
    name = params.get("name")
    if not isinstance(name, str) or not name:
        raise CommandError("get_object_info needs 'name' (an object name)")
    limit = _whole(params, "limit", OBJECT_LIST_DEFAULT)
    offset = _whole(params, "offset", 0)
    assert limit is not None and offset is not None
    which = params.get("list")
    if which is not None and which not in OBJECT_LISTS:
        raise CommandError(f"list must be one of {', '.join(OBJECT_LISTS)}, got {which!r}")
    bpy = _bpy()
    obj = bpy.data.objects.get(name)
    if obj is None:
        raise CommandError(f"Object not found: {name}")
    is_mesh = obj.type == "MESH" and obj.data is not None

    if which is not None:
        if which == "vertices" and not is_mesh:
            raise CommandError(f"list 'vertices' needs a mesh: {obj.name} is a {obj.type}")
        items, total = _list_page(obj, which, offset, limit)
        end = min(total, offset + limit)
        reply: dict[str, Any] = {
            "name": obj.name,
            "type": obj.type,
            "list": which,
            "items": items,
            "total": total,
            "offset": offset,
            "limit": limit,
            "truncated": end < total,
        }
        if end < total:
            reply["next_offset"] = end
        return reply

    info: dict[str, Any] = {
        "name": obj.name,
        "type": obj.type,
        "location": obj.location[:],
        "rotation": obj.rotation_euler[:],
        "scale": obj.scale[:],
        "visible": obj.visible_get(),
        "dimensions": obj.dimensions[:],
        "parent": _parent(obj),
    }
    totals: dict[str, int] = {}
    more: dict[str, int] = {}
    for which in OBJECT_LISTS[:-1]:
        items, total = _list_page(obj, which, offset, limit)
        info[which] = items
        totals[which] = total
        if offset + limit < total:
            more[which] = offset + limit
    if is_mesh:
        mesh = obj.data
        info["mesh"] = {
            "vertices": len(mesh.vertices),
            "edges": len(mesh.edges),
            "polygons": len(mesh.polygons),
        }
        totals["vertices"] = info["mesh"]["vertices"]
    info["totals"] = totals
    info["truncated"] = bool(more)
    if more:
        info["more"] = more
        first, at = next(iter(more.items()))
        info["hint"] = (
            f"lists cut at {limit} items ({', '.join(more)}): call get_object_info again with "
            f'list="{first}" and offset={at} (and a limit) for the next page of one list'
        )
    return info
