"""``lookup_bpy_api``: the bpy API of the Blender actually running, read from its own RNA (no shipped docs).

Runs on Blender's main thread (it reads ``bpy.types`` and ``bpy.ops``). A ``path`` names a struct
(``bpy.types.Object`` or ``Object``), a property (``bpy.types.Object.location``) or an operator
(``bpy.ops.mesh.primitive_cube_add``); ``search`` finds names containing a substring. Lists are paged
(``limit``, ``offset``) with their totals.
"""

from __future__ import annotations

import difflib
from typing import Any

from . import commands

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
ENUM_ITEMS = 200

# Built once per Blender process on the first search: (lowercase name, path, kind), sorted.
_INDEX: list[tuple[str, str, str]] | None = None


def _whole(params: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    v = params.get(name)
    if v is None:
        return default
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or (isinstance(v, float) and not v.is_integer())
    ):
        raise commands.CommandError(f"'{name}' must be a whole number from {lo} to {hi}, got {v!r}")
    n = int(v)
    if not lo <= n <= hi:
        raise commands.CommandError(f"'{name}' must be a whole number from {lo} to {hi}, got {v!r}")
    return n


def _struct_names(bpy: Any) -> list[str]:
    return [n for n in dir(bpy.types) if not n.startswith("_")]


def _operators(bpy: Any) -> list[str]:
    out = []
    for mod in dir(bpy.ops):
        if mod.startswith("_"):
            continue
        try:
            names = dir(getattr(bpy.ops, mod))
        except Exception:
            continue
        out += [f"{mod}.{n}" for n in names if not n.startswith("_")]
    return out


def _rna(bpy: Any, name: str) -> Any:
    t = getattr(bpy.types, name, None)
    return getattr(t, "bl_rna", None) if t is not None else None


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    try:
        return [_plain(x) for x in v]
    except TypeError:
        return repr(v)


def _property(p: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "identifier": p.identifier,
        "name": p.name,
        "description": p.description,
        "type": p.type,
        "subtype": p.subtype,
        "readonly": bool(p.is_readonly),
    }
    length = getattr(p, "array_length", 0) or 0
    if length:
        d["array_length"] = length
    if p.type in ("INT", "FLOAT"):
        d["min"], d["max"] = p.hard_min, p.hard_max
        if p.type == "FLOAT":
            d["unit"] = p.unit
        d["default"] = _plain(p.default_array) if length else p.default
    elif p.type in ("BOOLEAN", "STRING"):
        d["default"] = _plain(p.default_array) if length else p.default
    elif p.type == "ENUM":
        items = list(p.enum_items)
        d["enum_flag"] = bool(p.is_enum_flag)
        d["default"] = sorted(p.default_flag) if p.is_enum_flag else p.default
        d["enum_items"] = [
            {"identifier": i.identifier, "name": i.name, "description": i.description}
            for i in items[:ENUM_ITEMS]
        ]
        if len(items) > ENUM_ITEMS:
            d["enum_items_total"] = len(items)
    elif p.type in ("POINTER", "COLLECTION"):
        fixed = getattr(p, "fixed_type", None)
        d["fixed_type"] = fixed.identifier if fixed is not None else None
    return d


def _page(items: list[Any], offset: int, limit: int, what: str) -> dict[str, Any]:
    page = items[offset : offset + limit]
    out: dict[str, Any] = {what: page, f"{what}_total": len(items), "offset": offset}
    if offset + len(page) < len(items):
        out["truncated"] = True
        out["next_offset"] = offset + len(page)
    return out


def _not_found(what: str, wanted: str, candidates: list[str]) -> commands.CommandError:
    close = difflib.get_close_matches(wanted, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return commands.CommandError(
        f"{what} not found in this Blender: {wanted!r}{hint}", not_found=True, close_matches=close
    )


def _operator(bpy: Any, path: str, offset: int, limit: int) -> dict[str, Any]:
    mod, _, name = path.partition(".")
    if not mod or not name or "." in name:
        raise commands.CommandError(f"an operator path is bpy.ops.<module>.<name>, got 'bpy.ops.{path}'")
    if mod not in dir(bpy.ops) or name not in dir(getattr(bpy.ops, mod)):
        raise _not_found("operator", f"bpy.ops.{path}", [f"bpy.ops.{o}" for o in _operators(bpy)])
    rna = getattr(getattr(bpy.ops, mod), name).get_rna_type()
    props = [_property(p) for p in rna.properties if p.identifier != "rna_type"]
    return {
        "kind": "operator",
        "path": f"bpy.ops.{path}",
        "name": rna.name,
        "description": rna.description,
        **_page(props, offset, limit, "properties"),
    }


def _lookup(bpy: Any, path: str, offset: int, limit: int) -> dict[str, Any]:
    p = path.strip()
    if p.startswith("bpy.ops."):
        return _operator(bpy, p[len("bpy.ops.") :], offset, limit)
    if p.startswith("bpy.types."):
        p = p[len("bpy.types.") :]
    struct, _, prop = p.partition(".")
    rna = _rna(bpy, struct) if struct else None
    if rna is None:
        raise _not_found("struct", f"bpy.types.{struct}", [f"bpy.types.{n}" for n in _struct_names(bpy)])
    if prop:
        if "." in prop:
            raise commands.CommandError(f"a property path is bpy.types.<Struct>.<property>, got {path!r}")
        if prop in rna.properties.keys():
            return {"kind": "property", "path": f"bpy.types.{struct}.{prop}", "struct": struct,
                    **_property(rna.properties[prop])}  # fmt: skip
        if prop in rna.functions.keys():
            f = rna.functions[prop]
            return {
                "kind": "function",
                "path": f"bpy.types.{struct}.{prop}",
                "description": f.description,
                "parameters": [_property(x) for x in f.parameters],
            }
        names = list(rna.properties.keys()) + list(rna.functions.keys())
        raise _not_found(f"property of {struct}", prop, names)
    props = [
        {"identifier": x.identifier, "type": x.type, "description": x.description}
        for x in rna.properties
        if x.identifier != "rna_type"
    ]
    base = rna.base.identifier if rna.base is not None else None
    return {
        "kind": "struct",
        "path": f"bpy.types.{struct}",
        "name": rna.name,
        "description": rna.description,
        "base": base,
        "functions": list(rna.functions.keys()),
        **_page(props, offset, limit, "properties"),
    }


def _index(bpy: Any) -> list[tuple[str, str, str]]:
    global _INDEX
    if _INDEX is None:
        entries = []
        for name in _struct_names(bpy):
            entries.append((name.lower(), f"bpy.types.{name}", "struct"))
            rna = _rna(bpy, name)
            if rna is None:
                continue
            for key in rna.properties.keys():
                if key != "rna_type":
                    entries.append((f"{name}.{key}".lower(), f"bpy.types.{name}.{key}", "property"))
        for op in _operators(bpy):
            entries.append((op.lower(), f"bpy.ops.{op}", "operator"))
        _INDEX = sorted(set(entries), key=lambda e: e[1])
    return _INDEX


def lookup_bpy_api(params: dict[str, Any]) -> dict[str, Any]:
    bpy = commands._bpy()
    path, search = params.get("path"), params.get("search")
    limit = _whole(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _whole(params, "offset", 0, 0, 10**9)
    if (path is None) == (search is None):
        raise commands.CommandError(
            "lookup_bpy_api needs exactly one of 'path' (bpy.types.Object, bpy.types.Object.location, "
            "bpy.ops.mesh.primitive_cube_add) or 'search' (a substring)"
        )
    version = ".".join(str(v) for v in bpy.app.version)
    if path is not None:
        if not isinstance(path, str) or not path.strip():
            raise commands.CommandError(f"'path' must be a non-empty string, got {path!r}")
        return {"blender_version": version, **_lookup(bpy, path, offset, limit)}
    if not isinstance(search, str) or not search.strip():
        raise commands.CommandError(f"'search' must be a non-empty string, got {search!r}")
    q = search.strip().lower()
    kinds = params.get("kind")
    if kinds is not None and kinds not in ("struct", "property", "operator"):
        raise commands.CommandError(f"'kind' must be struct, property or operator, got {kinds!r}")
    hits = [{"path": p, "kind": k} for low, p, k in _index(bpy) if q in low and (kinds is None or k == kinds)]
    return {"blender_version": version, "search": search, **_page(hits, offset, limit, "matches")}
