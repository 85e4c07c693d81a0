"""Scene queries for scenes of any size, in a real headless Blender over real sockets: `get_scene_info`'s
fields, every filter, paging, summary and today's shape without `limit`; `get_object_info`'s paged lists;
bad input; and the MCP tools' default budget through the official `mcp` client. Expected answers are
computed by plain bpy loops in the same Blender (execute_code), never by the code under test."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from helpers import Conn, call, err, ok

# A known scene on top of the default one (Cube, Camera, Light in "Collection"):
#   Props (child of the scene collection) with child Small; 30 linked duplicates Prop.000-.029 of the
#   Cube's mesh (.000-.009 in Small, the rest in Props); Lamp2, a light parented to the Cube, in Props and
#   in Collection; Hidden, an empty hidden in the view layer; Prop.000-.004 and Lamp2 selected, nothing else.
BUILD = """
import bpy
scene = bpy.context.scene
props = bpy.data.collections.new("Props"); scene.collection.children.link(props)
small = bpy.data.collections.new("Small"); props.children.link(small)
mesh = bpy.data.objects["Cube"].data
for i in range(30):
    o = bpy.data.objects.new(f"Prop.{i:03d}", mesh)
    (small if i < 10 else props).objects.link(o)
    o.location = (i, 2 * i, -i)
lamp = bpy.data.objects.new("Lamp2", bpy.data.lights.new("Lamp2", "POINT"))
props.objects.link(lamp); bpy.data.collections["Collection"].objects.link(lamp)
lamp.parent = bpy.data.objects["Cube"]
hidden = bpy.data.objects.new("Hidden", None); scene.collection.objects.link(hidden)
for o in scene.objects: o.select_set(False)
for name in ["Prop.000", "Prop.001", "Prop.002", "Prop.003", "Prop.004", "Lamp2"]:
    bpy.data.objects[name].select_set(True)
hidden.hide_set(True)
cube = bpy.data.objects["Cube"]
for i in range(5):
    cube.modifiers.new(f"Mod{i}", "BEVEL" if i % 2 else "ARRAY")
for i in range(3):
    cube.vertex_groups.new(name=f"Group{i}")
"""


def bpy_eval(port: int, expr: str, setup: str = ""):
    """A value computed by plain bpy in the same Blender (the independent answer)."""
    return ok(call(port, "execute_code", code=f"{setup}\nresult = {expr}"))["value"]


def scene_info(port: int, **params) -> dict:
    return ok(call(port, "get_scene_info", **params))


def names(info: dict) -> list[str]:
    return [o["name"] for o in info["objects"]]


@pytest.fixture(scope="module")
def scene(served):
    ok(call(served.port, "execute_code", code=BUILD))
    return served


def all_names(port: int) -> list[str]:
    return bpy_eval(port, "[o.name for o in bpy.context.scene.objects]")


# --- get_scene_info: today's shape ----------------------------------------------------------------------


def test_without_limit_every_object_in_todays_shape(scene):
    info = scene_info(scene.port)
    expected = all_names(scene.port)
    assert len(expected) == 35
    assert names(info) == expected
    assert info["object_count"] == len(info["objects"]) == info["total"] == 35
    assert info["truncated"] is False and "next_offset" not in info and info["limit"] is None
    for o in info["objects"]:
        assert set(o) == {"name", "type", "location", "visible"}
        assert len(o["location"]) == 3
    by = {o["name"]: o for o in info["objects"]}
    assert by["Prop.007"]["location"] == [7.0, 14.0, -7.0]
    assert by["Hidden"]["visible"] is False and by["Cube"]["visible"] is True
    assert info["name"] == "Scene"
    for key in ("materials_count", "frame_current", "frame_start", "frame_end"):
        assert isinstance(info[key], int), key
    assert info["active_object"] == bpy_eval(scene.port, "bpy.context.view_layer.objects.active.name")


# --- fields ---------------------------------------------------------------------------------------------

FIELD_EXPR = {
    "type": "o.type",
    "data": "o.data.name if o.data else None",
    "location": "list(o.location)",
    "rotation": "list(o.rotation_euler)",
    "scale": "list(o.scale)",
    "dimensions": "list(o.dimensions)",
    "visible": "o.visible_get()",
    "selected": "o.select_get()",
    "parent": "o.parent.name if o.parent else None",
    "collections": "[c.name for c in o.users_collection]",
    "materials": "[s.material.name for s in o.material_slots if s.material]",
}


@pytest.mark.parametrize("field", sorted(FIELD_EXPR))
def test_each_field_alone(scene, field):
    info = scene_info(scene.port, fields=[field])
    expected = bpy_eval(scene.port, f"[[o.name, {FIELD_EXPR[field]}] for o in bpy.context.scene.objects]")
    assert [[o["name"], o[field]] for o in info["objects"]] == expected
    for o in info["objects"]:
        assert set(o) == {"name", field}


def test_fields_all_and_order_and_name_always(scene):
    info = scene_info(scene.port, fields="all")
    assert set(info["objects"][0]) == {"name", *FIELD_EXPR}
    by = {o["name"]: o for o in info["objects"]}
    assert by["Lamp2"]["parent"] == "Cube"
    assert sorted(by["Lamp2"]["collections"]) == ["Collection", "Props"]
    assert by["Prop.003"]["data"] == "Cube" and by["Prop.003"]["collections"] == ["Small"]
    assert by["Hidden"]["data"] is None and by["Hidden"]["type"] == "EMPTY"
    assert by["Cube"]["materials"] == ["Material"]
    info = scene_info(scene.port, fields=["parent", "type", "parent"])
    assert list(info["objects"][0]) == ["name", "parent", "type"]
    assert list(scene_info(scene.port, fields=[])["objects"][0]) == ["name"]


# --- filters ---------------------------------------------------------------------------------------------

FILTERS = [
    ({"type": "MESH"}, "o.type == 'MESH'"),
    ({"type": "light"}, "o.type == 'LIGHT'"),
    ({"type": ["CAMERA", "EMPTY"]}, "o.type in ('CAMERA', 'EMPTY')"),
    ({"name": "Prop.01*"}, "o.name.startswith('Prop.01')"),
    ({"name": "*.00[0-2]"}, "o.name[-4:] in ('.000', '.001', '.002')"),
    ({"name": "?amp*"}, "o.name in ('Lamp2',)"),
    ({"name": "Lamp2"}, "o.name == 'Lamp2'"),
    ({"name": "prop.001"}, "False"),  # case-sensitive
    ({"collection": "Props"}, "o.name.startswith('Prop.') or o.name == 'Lamp2'"),
    ({"collection": "Small"}, "o.name.startswith('Prop.00')"),
    ({"collection": "Collection"}, "o.name in ('Cube', 'Camera', 'Light', 'Lamp2')"),
    ({"collection": "Scene Collection"}, "True"),
    ({"selected": True}, "o.select_get()"),
    ({"selected": False}, "not o.select_get()"),
    ({"visible": False}, "not o.visible_get()"),
    ({"visible": True}, "o.visible_get()"),
    (
        {"type": "MESH", "selected": True, "collection": "Small"},
        "o.name in ['Prop.00%d' % i for i in range(5)]",
    ),
    ({"type": "LIGHT", "collection": "Props", "name": "Lamp2"}, "o.name == 'Lamp2'"),
    ({"type": "CAMERA", "collection": "Small"}, "False"),
]


@pytest.mark.parametrize("filt,expr", FILTERS, ids=[json.dumps(f) for f, _ in FILTERS])
def test_each_filter_matches_what_a_bpy_loop_finds(scene, filt, expr):
    expected = bpy_eval(scene.port, f"[o.name for o in bpy.context.scene.objects if {expr}]")
    info = scene_info(scene.port, filter=filt)
    assert sorted(names(info)) == sorted(expected)
    assert info["total"] == len(expected)
    assert info["object_count"] == 35  # the scene's objects, whatever the filter
    assert info["truncated"] is False


def test_a_filter_that_matches_nothing_is_an_empty_page(scene):
    for params in (
        {"filter": {"name": "NoSuch*"}},
        {"filter": {"name": "NoSuch"}, "limit": 10},
        {"filter": {"type": "CURVE"}, "limit": 10, "offset": 5},
    ):
        info = scene_info(scene.port, **params)
        assert info["objects"] == [] and info["total"] == 0 and info["truncated"] is False, params


# --- paging ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filt", [None, {"type": "MESH"}, {"collection": "Props", "visible": True}])
def test_pages_join_to_the_whole_list_without_duplicates(scene, filt):
    extra = {} if filt is None else {"filter": filt}
    whole = names(scene_info(scene.port, **extra))
    joined: list[str] = []
    offset, pages = 0, 0
    with Conn(scene.port) as c:
        while True:
            page = ok(c.request("get_scene_info", limit=7, offset=offset, **extra))
            assert page["offset"] == offset and page["limit"] == 7
            assert page["total"] == len(whole)
            assert len(page["objects"]) <= 7
            joined += names(page)
            pages += 1
            if not page["truncated"]:
                assert "next_offset" not in page
                break
            assert len(page["objects"]) == 7 and page["next_offset"] == offset + 7
            offset = page["next_offset"]
    assert joined == whole and len(set(joined)) == len(joined)
    assert pages == max(1, -(-len(whole) // 7))


def test_limit_zero_offset_past_the_end_and_float_integers(scene):
    info = scene_info(scene.port, limit=0)
    assert info["objects"] == [] and info["total"] == 35 and info["truncated"] is True
    assert info["next_offset"] == 0
    info = scene_info(scene.port, limit=5, offset=1000)
    assert info["objects"] == [] and info["total"] == 35 and info["truncated"] is False
    info = scene_info(scene.port, offset=30)  # offset without limit: the rest
    assert names(info) == all_names(scene.port)[30:] and info["truncated"] is False
    info = scene_info(scene.port, limit=3.0, offset=2.0)
    assert names(info) == all_names(scene.port)[2:5]
    info = scene_info(scene.port, limit=1_000_000_000)
    assert len(info["objects"]) == 35 and info["truncated"] is False


# --- summary ---------------------------------------------------------------------------------------------


def test_summary(scene):
    info = scene_info(scene.port, summary=True)
    assert "objects" not in info and info["summary"] is True
    counts = bpy_eval(
        scene.port,
        "dict(collections.Counter(o.type for o in bpy.context.scene.objects))",
        "import collections",
    )
    assert info["counts_by_type"] == counts == {"MESH": 31, "CAMERA": 1, "LIGHT": 2, "EMPTY": 1}
    assert info["object_count"] == info["total"] == 35
    tree = info["collections"]
    assert tree["name"] == "Scene Collection" and tree["objects"] == 1  # Hidden
    kids = {c["name"]: c for c in tree["children"]}
    assert set(kids) == {"Collection", "Props"}
    assert kids["Collection"]["objects"] == 4 and kids["Props"]["objects"] == 21
    assert [(c["name"], c["objects"], c["children"]) for c in kids["Props"]["children"]] == [
        ("Small", 10, [])
    ]
    assert info["collection_count"] == 3 and info["collections_truncated"] is False
    assert info["camera"] == "Camera"
    assert (info["frame_start"], info["frame_end"], info["frame_current"]) == tuple(
        bpy_eval(
            scene.port,
            "[bpy.context.scene.frame_start, bpy.context.scene.frame_end, bpy.context.scene.frame_current]",
        )
    )
    assert info["fps"] == pytest.approx(24.0)
    filtered = scene_info(scene.port, summary=True, filter={"collection": "Small"})
    assert filtered["counts_by_type"] == {"MESH": 10} and filtered["total"] == 10
    assert filtered["object_count"] == 35


def test_summary_tree_is_capped(served):
    """A scene with more collections than the tree lists: cut, counted, and still a small reply."""
    code = (
        "scene = bpy.context.scene\n"
        "root = bpy.data.collections.new('Many')\n"
        "scene.collection.children.link(root)\n"
        "for i in range(300):\n"
        "    root.children.link(bpy.data.collections.new(f'Many.{i:03d}'))\n"
    )
    ok(call(served.port, "execute_code", code=code))
    try:
        info = scene_info(served.port, summary=True)
        assert info["collections_truncated"] is True
        assert info["collection_count"] == bpy_eval(
            served.port, "len(bpy.context.scene.collection.children_recursive)"
        )
        assert info["collection_count"] >= 301

        def count(node: dict) -> int:
            return 1 + sum(count(c) for c in node["children"])

        assert count(info["collections"]) == 256
    finally:
        ok(
            call(
                served.port,
                "execute_code",
                code="for c in [c for c in bpy.data.collections if c.name.startswith('Many')]:\n"
                "    bpy.data.collections.remove(c)",
            )
        )


# --- bad input -------------------------------------------------------------------------------------------

BAD_NUMBERS = [-1, -0.5, 2.5, True, False, "5", 1e10, 2**64, 1_000_000_001, [1], {"a": 1}, float("inf")]


@pytest.mark.parametrize("param", ["limit", "offset"])
@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_bad_limit_and_offset(scene, param, value):
    with Conn(scene.port) as c:
        if value == float("inf"):
            # JSON has no infinity: Python's json writes `Infinity`, which the service refuses as JSON.
            c.send(json.dumps({"type": "get_scene_info", "params": {param: value}}).encode())
            assert "malformed JSON" in err(c.reply())
        else:
            message = err(c.request("get_scene_info", **{param: value}))
            assert message.startswith(f"{param} must be a whole number from 0 to 1000000000"), message
            message = err(c.request("get_object_info", name="Cube", **{param: value}))
            assert message.startswith(f"{param} must be a whole number from 0 to 1000000000"), message
        assert ok(c.request("ping"))["pong"] is True  # the connection goes on


def test_nan_and_infinity_reaching_the_handler_are_refused(scene):
    """JSON cannot carry NaN or infinity; a Python caller inside Blender can pass them: refused the same way."""
    code = (
        "from bld_remote import scene as s, commands\n"
        "out = []\n"
        "for v in (float('nan'), float('inf'), float('-inf')):\n"
        "    for p in ('limit', 'offset'):\n"
        "        for fn in (s.get_scene_info, lambda q: s.get_object_info({'name': 'Cube', **q})):\n"
        "            try:\n"
        "                fn({p: v}); out.append('accepted')\n"
        "            except commands.CommandError as e:\n"
        "                out.append(e.message)\n"
        "result = out\n"
    )
    out = ok(call(scene.port, "execute_code", code=code))["value"]
    assert len(out) == 12
    for message in out:
        assert "must be a whole number from 0 to 1000000000" in message, message


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"fields": ["name", "colour"]}, "unknown field 'colour': the fields are name, type, data, location"),
        ({"fields": ["bogus", "x"]}, "unknown fields 'bogus', 'x'"),
        ({"fields": "name"}, "fields must be a list of field names"),
        ({"fields": [1]}, "fields must be a list of field names"),
        ({"filter": {"kind": "MESH"}}, "unknown filter key 'kind': the keys are type, name, collection"),
        ({"filter": "MESH"}, "filter must be an object with any of type, name"),
        ({"filter": {"name": 5}}, "filter.name must be a string, a glob"),
        ({"filter": {"name": ["Cube*"]}}, "filter.name must be a string"),
        ({"filter": {"type": 5}}, "filter.type must be an object type"),
        ({"filter": {"type": []}}, "filter.type must be an object type"),
        (
            {"filter": {"type": "MESHES"}},
            "filter.type: unknown object type 'MESHES': the types are MESH, CURVE",
        ),
        ({"filter": {"collection": 3}}, "filter.collection must be a collection's name"),
        (
            {"filter": {"collection": "Nope"}},
            "filter.collection: no collection named 'Nope'; the collections:",
        ),
        ({"filter": {"selected": "yes"}}, "filter.selected must be true or false"),
        ({"filter": {"visible": 1}}, "filter.visible must be true or false"),
        ({"summary": "yes"}, "summary must be true or false"),
    ],
)
def test_bad_fields_filters_and_flags(scene, params, expected):
    message = err(call(scene.port, "get_scene_info", **params))
    assert expected in message, message


def test_unknown_collection_error_lists_them(scene):
    message = err(call(scene.port, "get_scene_info", filter={"collection": "Nope"}))
    for name in ("Scene Collection", "Collection", "Props", "Small"):
        assert repr(name) in message, message


# --- get_object_info -------------------------------------------------------------------------------------


def test_object_info_keeps_todays_fields_and_adds_lists_with_totals(scene):
    info = ok(call(scene.port, "get_object_info", name="Cube"))
    assert info["name"] == "Cube" and info["type"] == "MESH"
    assert info["mesh"] == {"vertices": 8, "edges": 12, "polygons": 6}
    assert info["dimensions"] == [2.0, 2.0, 2.0] and info["scale"] == [1.0, 1.0, 1.0]
    assert info["materials"] == ["Material"] and info["collections"] == ["Collection"]
    assert info["parent"] is None and info["visible"] is True and len(info["rotation"]) == 3
    assert info["modifiers"] == [{"name": f"Mod{i}", "type": "BEVEL" if i % 2 else "ARRAY"} for i in range(5)]
    assert info["vertex_groups"] == ["Group0", "Group1", "Group2"]
    assert info["children"] == ["Lamp2"]
    assert info["totals"] == {
        "materials": 1,
        "modifiers": 5,
        "vertex_groups": 3,
        "collections": 1,
        "children": 1,
        "vertices": 8,
    }
    assert info["truncated"] is False and "more" not in info and "hint" not in info
    cam = ok(call(scene.port, "get_object_info", name="Camera"))
    assert "mesh" not in cam and "vertices" not in cam["totals"] and cam["modifiers"] == []


def test_object_lists_cut_at_limit_say_how_to_get_more(scene):
    info = ok(call(scene.port, "get_object_info", name="Cube", limit=2))
    assert [m["name"] for m in info["modifiers"]] == ["Mod0", "Mod1"]
    assert info["vertex_groups"] == ["Group0", "Group1"]
    assert info["materials"] == ["Material"]
    assert info["totals"]["modifiers"] == 5 and info["truncated"] is True
    assert info["more"] == {"modifiers": 2, "vertex_groups": 2}
    assert 'list="modifiers"' in info["hint"] and "offset=2" in info["hint"]
    # Following the hint pages one list to its end.
    got, offset = [], 0
    while True:
        page = ok(call(scene.port, "get_object_info", name="Cube", list="modifiers", limit=2, offset=offset))
        assert set(page) >= {"name", "type", "list", "items", "total", "offset", "limit", "truncated"}
        assert page["list"] == "modifiers" and page["total"] == 5 and "mesh" not in page
        got += [m["name"] for m in page["items"]]
        if not page["truncated"]:
            break
        offset = page["next_offset"]
    assert got == [f"Mod{i}" for i in range(5)]


@pytest.mark.parametrize(
    "which,expr",
    [
        ("materials", "[s.material.name for s in o.material_slots if s.material]"),
        ("vertex_groups", "[g.name for g in o.vertex_groups]"),
        ("collections", "[c.name for c in o.users_collection]"),
        ("children", "[c.name for c in o.children]"),
        ("vertices", "[list(v.co) for v in o.data.vertices]"),
    ],
)
def test_each_object_list(scene, which, expr):
    expected = bpy_eval(scene.port, expr, "o = bpy.data.objects['Cube']")
    page = ok(call(scene.port, "get_object_info", name="Cube", list=which))
    assert page["items"] == expected and page["total"] == len(expected) and page["truncated"] is False


def test_vertex_pages_large_mesh(served):
    """2500 vertices: the default page, a small page read vertex by vertex, and a large page read with
    foreach_get, each equal to plain bpy's coordinates; pages join to every vertex."""
    setup = (
        "m = bpy.data.meshes.new('Grid')\n"
        "m.from_pydata([(i * 0.5, (i % 7) * 0.25, -i / 8) for i in range(2500)], [], [])\n"
        "o = bpy.data.objects.new('Grid', m); bpy.context.scene.collection.objects.link(o)\n"
    )
    ok(call(served.port, "execute_code", code=setup))
    try:
        expected = bpy_eval(served.port, "[list(v.co) for v in bpy.data.objects['Grid'].data.vertices]")
        info = ok(call(served.port, "get_object_info", name="Grid"))
        assert info["totals"]["vertices"] == 2500 and info["mesh"]["vertices"] == 2500
        assert "vertices" not in info and "vertices" not in info.get("more", {})
        first = ok(call(served.port, "get_object_info", name="Grid", list="vertices"))
        assert first["items"] == expected[:100] and first["next_offset"] == 100 and first["truncated"] is True
        joined, offset = [], 0
        for limit in (10, 1990, 1000):
            page = ok(
                call(served.port, "get_object_info", name="Grid", list="vertices", limit=limit, offset=offset)
            )
            joined += page["items"]
            offset = page.get("next_offset", offset + len(page["items"]))
        assert joined == expected and page["truncated"] is False
    finally:
        ok(call(served.port, "execute_code", code="bpy.data.objects.remove(bpy.data.objects['Grid'])"))


def test_object_info_bad_input(scene):
    assert "list must be one of materials, modifiers" in err(
        call(scene.port, "get_object_info", name="Cube", list="faces")
    )
    assert "list 'vertices' needs a mesh: Camera is a CAMERA" in err(
        call(scene.port, "get_object_info", name="Camera", list="vertices")
    )
    assert "Object not found: Nope" in err(call(scene.port, "get_object_info", name="Nope", list="materials"))
    assert "name" in err(call(scene.port, "get_object_info"))


# --- MCP -------------------------------------------------------------------------------------------------

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402


def stdio(port: int) -> StdioServerParameters:
    exe = Path(sys.executable).with_name("bld-remote")
    assert exe.exists(), f"{exe} missing: pip install the built wheel into this venv"
    return StdioServerParameters(command=str(exe), args=["mcp", "--port", str(port)])


def tool_json(r) -> dict:
    assert not r.is_error, r.content
    texts = [c.text for c in r.content if c.type == "text"]
    assert len(texts) == 1
    value = json.loads(texts[0])
    assert r.structured_content == value  # structuredContent, and its text copy
    return value


async def refusal(client, tool: str, args: dict) -> str:
    """The message of a refused call: a tool error, or (bad arguments) a JSON-RPC error."""
    try:
        r = await client.call_tool(tool, args)
    except mcp.McpError as e:
        return str(e)
    assert r.is_error, r.content
    return " ".join(c.text for c in r.content if c.type == "text")


MANY = (
    "coll = bpy.data.collections.new('ManyObjects'); bpy.context.scene.collection.children.link(coll)\n"
    "mesh = bpy.data.objects['Cube'].data\n"
    "for i in range(500):\n"
    "    o = bpy.data.objects.new(f'Many.{i:03d}', mesh); coll.objects.link(o); o.location = (i, i, i)\n"
)
UNMANY = (
    "for o in [o for o in bpy.data.objects if o.name.startswith('Many.')]: bpy.data.objects.remove(o)\n"
    "bpy.data.collections.remove(bpy.data.collections['ManyObjects'])\n"
)


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_mcp_default_budget_truncates_and_next_offset_works(scene, mode):
    ok(call(scene.port, "execute_code", code=MANY))
    try:
        expected = all_names(scene.port)
        assert len(expected) == 535

        async def main() -> None:
            async with Client(stdio(scene.port), mode=mode) as client:
                tools = {t.name: t for t in (await client.list_tools()).tools}
                for name in ("get_scene_info", "get_object_info"):
                    schema = json.dumps(
                        {"description": tools[name].description, "inputSchema": tools[name].input_schema}
                    )
                    assert len(schema) <= 1600, (name, len(schema))
                props = tools["get_scene_info"].input_schema["properties"]
                assert set(props) >= {"fields", "filter", "limit", "offset", "summary", "instance"}

                r = await client.call_tool("get_scene_info", {})
                first = tool_json(r)
                assert first["truncated"] is True and first["total"] == 535
                assert 0 < len(first["objects"]) <= 200
                assert len(r.content[0].text) < 12 * 1024
                assert first["next_offset"] == len(first["objects"])
                assert f"offset={first['next_offset']}" in first["hint"]

                joined, page = names(first), first
                while page["truncated"]:
                    page = tool_json(
                        await client.call_tool("get_scene_info", {"offset": page["next_offset"]})
                    )
                    assert page["total"] == 535 and len(page["objects"]) > 0
                    joined += names(page)
                assert joined == expected

                # An explicit limit is honoured (no byte cut), and names alone fit more per page.
                page = tool_json(await client.call_tool("get_scene_info", {"limit": 300, "offset": 10}))
                assert names(page) == expected[10:310] and page["next_offset"] == 310
                page = tool_json(await client.call_tool("get_scene_info", {"fields": ["name"]}))
                assert len(page["objects"]) == 200 and page["next_offset"] == 200
                page = tool_json(
                    await client.call_tool(
                        "get_scene_info", {"filter": {"collection": "ManyObjects", "name": "Many.49*"}}
                    )
                )
                assert names(page) == [f"Many.{i}" for i in range(490, 500)] and page["truncated"] is False

                summary = tool_json(await client.call_tool("get_scene_info", {"summary": True}))
                assert summary["counts_by_type"]["MESH"] == 531 and "objects" not in summary

                info = tool_json(await client.call_tool("get_object_info", {"name": "Cube", "limit": 2}))
                assert info["more"] == {"modifiers": 2, "vertex_groups": 2}
                page = tool_json(
                    await client.call_tool(
                        "get_object_info", {"name": "Cube", "list": "vertices", "limit": 3}
                    )
                )
                assert len(page["items"]) == 3 and page["next_offset"] == 3 and "offset=3" in page["hint"]

                for args, words in (
                    ({"limit": -1}, "limit must be a whole number from 0 to 1000"),
                    ({"limit": 2.5}, "limit must be a whole number from 0 to 1000"),
                    ({"limit": 1001}, "limit must be a whole number from 0 to 1000"),
                    ({"offset": -3}, "offset must be a whole number from 0 to 1000000000"),
                    ({"fields": ["colour"]}, "unknown field 'colour'"),
                    ({"filter": {"kind": "MESH"}}, "unknown filter key 'kind'"),
                ):
                    assert words in await refusal(client, "get_scene_info", args), args
                assert "unknown variant `faces`" in await refusal(
                    client, "get_object_info", {"name": "Cube", "list": "faces"}
                )

        asyncio.run(main())
    finally:
        ok(call(scene.port, "execute_code", code=UNMANY))
