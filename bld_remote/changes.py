"""What ``execute_code`` changed in the scene: a cheap snapshot before and after the client's code, and a
compact, bounded diff of the two (docs/PROTOCOL.md, "What changed").

Runs on Blender's main thread only (it reads ``bpy``), called by ``commands.execute_code``. A snapshot is
columns, not rows: one ``foreach_get`` per transform property and per hide flag (C speed), ``keys()`` for
the names, and one ``map`` over the objects for each property that ``foreach_get`` cannot read (type,
parent, data, modifiers). Materials are read once per distinct data-block, not per object. Comparing
compares whole columns first (``memcmp`` for the float buffers, C-level list and set equality for the
rest), and looks at single objects only inside runs that differ. Measured in bench/changes.py
(docs/BENCHMARKS.md, "What changed").

Identity: ``ID.session_uid`` where Blender has it (4.x and later; not in 3.4), else the object's address
(a ``bpy_struct`` hashes and compares by it), checked against the object's type so that a removed object's
memory reused by a new one of another type is not taken for a rename.
"""

from __future__ import annotations

import array
import gc
from operator import attrgetter
from typing import Any

# At most this many entries in each list of the diff (added, removed, renamed, modified, and each
# data-block type's added/removed names); ``<list>_total`` says how many there were when a list is cut.
MAX_ENTRIES = 50
# At most this many material or modifier names per object in an entry.
MAX_NAMES = 32

# (property, floats per object), read with foreach_get.
_TRANSFORMS = (
    ("location", 3),
    ("rotation_euler", 3),
    ("rotation_quaternion", 4),
    ("rotation_axis_angle", 4),
    ("scale", 3),
)
_FLAGS = ("hide_viewport", "hide_render")
# Data-block collections of bpy.data left out of the diff: objects have their own lists, and these are
# the user interface's own (they change as the user works, not as the scene does).
_NOT_DATA = frozenset({"objects", "screens", "window_managers", "workspaces"})
# Runs of aligned objects are compared in blocks of this many before single objects are looked at.
_BLOCK = 64

_get_type = attrgetter("type")
_get_parent = attrgetter("parent")
_get_data = attrgetter("data")
_get_modifiers = attrgetter("modifiers")

_data_collections: list[str] | None = None


def _collections(bpy: Any) -> list[str]:
    global _data_collections
    if _data_collections is None:
        _data_collections = [
            p.identifier
            for p in bpy.types.BlendData.bl_rna.properties
            if p.type == "COLLECTION" and p.identifier not in _NOT_DATA
        ]
    return _data_collections


class Snapshot:
    """The state of every object in ``bpy.data.objects`` (in its order), plus data-block names per type."""

    __slots__ = (
        "data",
        "datas",
        "flags",
        "by_address",
        "ids",
        "materials",
        "modifiers",
        "names",
        "objects",
        "parents",
        "transforms",
        "types",
        "visible",
    )

    def __init__(self, bpy: Any) -> None:
        objects = bpy.data.objects
        n = len(objects)
        self.objects: list[Any] = objects[:]
        self.names: list[str] = objects.keys()
        self.types: list[str] = list(map(_get_type, self.objects))
        # By session_uid (never reused in a session), else by address (hash and == of a bpy_struct).
        self.ids: list[Any]
        self.by_address = False
        uids = array.array("i", bytes(4 * n))
        try:
            objects.foreach_get("session_uid", uids)
            self.ids = uids.tolist()
        except (AttributeError, TypeError, RuntimeError):  # Blender < 4: no session_uid in RNA
            self.ids = self.objects
            self.by_address = True
        self.transforms: list[memoryview] = []
        for prop, width in _TRANSFORMS:
            buf = array.array("f", bytes(4 * width * n))
            objects.foreach_get(prop, buf)
            self.transforms.append(memoryview(buf).cast("B"))
        self.flags: list[memoryview] = []
        for prop in _FLAGS:
            flags = array.array("b", bytes(n))
            objects.foreach_get(prop, flags)
            self.flags.append(memoryview(flags).cast("B"))
        self.parents: list[Any] = list(map(_get_parent, self.objects))
        # Materials come from the object's data (meshes, curves...): read once per distinct data-block.
        # (Slots linked to the object itself, link='OBJECT', are not seen; see docs/PROTOCOL.md.)
        self.datas: list[Any] = list(map(_get_data, self.objects))
        per_data: dict[Any, tuple[str, ...]] = {}
        materials: list[tuple[str, ...]] = []
        for d in self.datas:
            if d is None:
                materials.append(())
                continue
            m = per_data.get(d)
            if m is None:
                slots = getattr(d, "materials", None)
                m = per_data[d] = tuple(slots.keys()) if slots is not None else ()
            materials.append(m)
        self.materials = materials
        self.modifiers: list[Any] = [
            tuple((m.name, m.type) for m in mods) if len(mods) else ()
            for mods in map(_get_modifiers, self.objects)
        ]
        try:
            self.visible: set[Any] | None = set(bpy.context.visible_objects)
        except (AttributeError, TypeError, RuntimeError):  # no view layer in this context
            self.visible = None
        self.data: dict[str, list[str]] = {}
        for name in _collections(bpy):
            coll = getattr(bpy.data, name, None)
            if coll is not None:
                self.data[name] = coll.keys()


def snapshot(bpy: Any) -> Snapshot | None:
    """Take a snapshot (garbage collection paused: it makes many small objects). None if it failed."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return Snapshot(bpy)
    except Exception:  # the diff is a report: it must never break the command
        return None
    finally:
        if enabled:
            gc.enable()


def _rows(b: Snapshot, a: Snapshot) -> tuple[list[tuple[int, int, int]], list[int], list[int]]:
    """Match objects before and after by identity: runs ``(i, j, length)`` of objects ``b[i+k]`` that are
    ``a[j+k]``, and the indices of removed (in ``b``) and added (in ``a``) objects."""
    nb, na = len(b.ids), len(a.ids)
    # By address, an object is the same only with the same type, and the same name or data: a removed
    # object's memory is often reused at once by the next new one (delete the cube, add a sphere).
    by_address = b.by_address or a.by_address
    if b.ids == a.ids and b.types == a.types and (not by_address or b.names == a.names or b.datas == a.datas):
        return ([(0, 0, nb)] if nb else []), [], []
    where = {ident: j for j, ident in enumerate(a.ids)}
    runs: list[tuple[int, int, int]] = []
    removed: list[int] = []
    matched = bytearray(na)
    bt, at, bd, ad, bn, an = b.types, a.types, b.datas, a.datas, b.names, a.names
    for i, ident in enumerate(b.ids):
        j = where.get(ident)
        if j is None or bt[i] != at[j] or (by_address and bd[i] != ad[j] and bn[i] != an[j]):
            removed.append(i)
            continue
        matched[j] = 1
        if runs:
            ri, rj, rn = runs[-1]
            if ri + rn == i and rj + rn == j:
                runs[-1] = (ri, rj, rn + 1)
                continue
        runs.append((i, j, 1))
    added = [j for j in range(na) if not matched[j]]
    return runs, removed, added


def _differing(runs: list[tuple[int, int, int]], same: Any) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` inside the runs for which ``same(i, j, count)`` is false for the single object,
    found by comparing whole runs, then blocks, then single objects."""
    out: list[tuple[int, int]] = []
    for i, j, n in runs:
        if same(i, j, n):
            continue
        for k in range(0, n, _BLOCK):
            m = min(_BLOCK, n - k)
            if m > 1 and same(i + k, j + k, m):
                continue
            out.extend((i + k + x, j + k + x) for x in range(m) if not same(i + k + x, j + k + x, 1))
    return out


def _bytes_same(b: memoryview, a: memoryview, width: int) -> Any:
    return lambda i, j, n: b[i * width : (i + n) * width] == a[j * width : (j + n) * width]


def _list_same(b: list[Any], a: list[Any]) -> Any:
    return lambda i, j, n: b[i : i + n] == a[j : j + n]


def _floats(view: memoryview, i: int, width: int) -> list[float]:
    return [round(v, 6) for v in view[i * width * 4 : (i + 1) * width * 4].cast("f")]


def _cut(items: list[Any], limit: int = MAX_NAMES) -> list[Any]:
    return items if len(items) <= limit else [*items[:limit], f"... {len(items) - limit} more"]


def _bounded(out: dict[str, Any], key: str, items: list[Any]) -> None:
    out[key] = items[:MAX_ENTRIES]
    if len(items) > MAX_ENTRIES:
        out[f"{key}_total"] = len(items)


def diff(b: Snapshot | None, a: Snapshot | None) -> dict[str, Any] | None:
    """The changes from ``b`` to ``a`` (see docs/PROTOCOL.md for the shape); None when either is missing."""
    if b is None or a is None:
        return None
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _diff(b, a)
    except Exception as exc:  # a report, never a failure of the command
        return {"error": f"the changes could not be computed: {type(exc).__name__}: {exc}"}
    finally:
        if enabled:
            gc.enable()


def _diff(b: Snapshot, a: Snapshot) -> dict[str, Any]:
    runs, removed_i, added_j = _rows(b, a)
    modified: dict[tuple[int, int], dict[str, Any]] = {}

    def entry(i: int, j: int) -> dict[str, Any]:
        e = modified.get((i, j))
        if e is None:
            e = modified[(i, j)] = {"name": a.names[j]}
        return e

    # _differing compares whole runs first: with nothing added or removed, one memcmp per column.
    for (prop, width), tb, ta in zip(_TRANSFORMS, b.transforms, a.transforms):
        for i, j in _differing(runs, _bytes_same(tb, ta, width * 4)):
            entry(i, j)[prop] = [_floats(tb, i, width), _floats(ta, j, width)]
    for prop, fb, fa in zip(_FLAGS, b.flags, a.flags):
        for i, j in _differing(runs, _bytes_same(fb, fa, 1)):
            entry(i, j)[prop] = [bool(fb[i]), bool(fa[j])]
    if b.visible is not None and a.visible is not None and b.visible != a.visible:
        flipped = b.visible ^ a.visible
        for i, j, n in runs:
            for k in range(n):
                obj = a.objects[j + k]
                if obj in flipped:
                    entry(i + k, j + k)["visible"] = [obj not in a.visible, obj in a.visible]
    before_name = _namer(b)
    for i, j in _differing(runs, _list_same(b.parents, a.parents)):
        entry(i, j)["parent"] = [before_name(b.parents[i]), _name(a.parents[j])]
    for i, j in _differing(runs, _list_same(b.materials, a.materials)):
        entry(i, j)["materials"] = [_cut(list(b.materials[i])), _cut(list(a.materials[j]))]
    for i, j in _differing(runs, _list_same(b.modifiers, a.modifiers)):
        entry(i, j)["modifiers"] = [
            _cut([list(m) for m in b.modifiers[i]]),
            _cut([list(m) for m in a.modifiers[j]]),
        ]
    renamed = [
        {"from": b.names[i], "to": a.names[j]} for i, j in _differing(runs, _list_same(b.names, a.names))
    ]
    changes: dict[str, Any] = {}
    _bounded(changes, "added", [{"name": a.names[j], "type": a.types[j]} for j in added_j])
    _bounded(changes, "removed", [{"name": b.names[i], "type": b.types[i]} for i in removed_i])
    _bounded(changes, "renamed", renamed)
    _bounded(changes, "modified", [modified[k] for k in sorted(modified, key=lambda k: k[1])])
    data: dict[str, Any] = {}
    for name, after in a.data.items():
        before = b.data.get(name, [])
        if before == after:
            continue
        sb, sa = set(before), set(after)
        part: dict[str, Any] = {"count": [len(before), len(after)]}
        _bounded(part, "added", [n for n in after if n not in sb])
        _bounded(part, "removed", [n for n in before if n not in sa])
        data[name] = part
    changes["data"] = data
    return changes


def _name(obj: Any) -> str | None:
    if obj is None:
        return None
    try:
        return str(obj.name)
    except ReferenceError:  # removed meanwhile
        return None


def _namer(b: Snapshot) -> Any:
    """Names of objects as they were in ``b`` (a parent may have been removed or renamed since)."""
    index: dict[Any, int] | None = None

    def name(obj: Any) -> str | None:
        nonlocal index
        if obj is None:
            return None
        if index is None:
            index = {o: i for i, o in enumerate(b.objects)}
        i = index.get(obj)
        return b.names[i] if i is not None else _name(obj)

    return name


def is_empty(changes: dict[str, Any] | None) -> bool:
    return not changes or not any(changes.get(k) for k in ("added", "removed", "renamed", "modified", "data"))
