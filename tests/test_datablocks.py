"""The wire commands behind the MCP resources, against a real headless Blender: get_material_info,
get_collection_info, list_datablocks (their shapes, paging, bad input with clear errors), and the
scene_generation number get_status reports when objects, materials or collections come or go."""

from __future__ import annotations

import json

import pytest
from helpers import Conn, err, ok

SETUP = r"""
import bpy
for o in list(bpy.data.objects):
    if o.name.startswith("DB "):
        bpy.data.objects.remove(o)
for c in list(bpy.data.collections):
    if c.name.startswith("DB "):
        bpy.data.collections.remove(c)
for m in list(bpy.data.materials):
    if m.name.startswith("DB "):
        bpy.data.materials.remove(m)
mat = bpy.data.materials.new("DB Red ✓")
mat.use_nodes = True
bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
bsdf.inputs["Base Color"].default_value = (0.8, 0.1, 0.05, 1.0)
bsdf.inputs["Roughness"].default_value = 0.25
tex = mat.node_tree.nodes.new("ShaderNodeTexNoise")
tex.label = "noise"
mat.node_tree.links.new(tex.outputs["Fac"], bsdf.inputs["Metallic"])
plain = bpy.data.materials.new("DB Plain")
plain.use_nodes = False
top = bpy.data.collections.new("DB Top / Ünïcode")
bpy.context.scene.collection.children.link(top)
child = bpy.data.collections.new("DB Child")
top.children.link(child)
child.hide_render = True
for i in range(25):
    o = bpy.data.objects.new(f"DB Obj {i:02d}", None)
    top.objects.link(o)
o = bpy.data.objects.new("DB In Child", None)
child.objects.link(o)
bpy.context.view_layer.layer_collection.children[top.name].children[child.name].exclude = True
"""


@pytest.fixture(scope="module")
def conn(served):
    with Conn(served.port) as c:
        ok(c.request("execute_code", code=SETUP))
        yield c


def test_material_info(conn):
    m = ok(conn.request("get_material_info", name="DB Red ✓"))
    assert m["name"] == "DB Red ✓"
    assert m["use_nodes"] is True
    assert m["users"] == 0 and m["use_fake_user"] is False
    types = {n["type"] for n in m["nodes"]}
    assert {"BSDF_PRINCIPLED", "OUTPUT_MATERIAL", "TEX_NOISE"} <= types, m["nodes"]
    assert m["node_count"] == len(m["nodes"]) == 3 and m["nodes_truncated"] is False
    assert any(n.get("label") == "noise" for n in m["nodes"])
    p = m["principled"]
    assert p["Base Color"] == pytest.approx([0.8, 0.1, 0.05, 1.0])
    assert p["Roughness"] == pytest.approx(0.25)
    assert p["Metallic"] == {"linked": True}
    assert len(m["diffuse_color"]) == 4
    json.dumps(m)

    plain = ok(conn.request("get_material_info", name="DB Plain"))
    # Blender 5 always uses nodes (use_nodes is deprecated there); 3.4 reports what was set.
    assert isinstance(plain["use_nodes"], bool)
    assert isinstance(plain["metallic"], float) and isinstance(plain["roughness"], float)


def test_material_nodes_are_bounded(conn):
    code = (
        "import bpy\nm = bpy.data.materials.new('DB Many')\nm.use_nodes = True\n"
        "for i in range(250):\n    m.node_tree.nodes.new('ShaderNodeMath')\n"
    )
    ok(conn.request("execute_code", code=code))
    m = ok(conn.request("get_material_info", name="DB Many"))
    assert m["node_count"] == 252 and len(m["nodes"]) == 200 and m["nodes_truncated"] is True
    assert m["principled"] is not None


def test_collection_info_pages(conn):
    name = "DB Top / Ünïcode"
    c = ok(conn.request("get_collection_info", name=name))
    assert c["name"] == name and c["scene_collection"] is False
    assert c["object_count"] == 25 and len(c["objects"]) == 25 and c["truncated"] is False
    assert "next_offset" not in c
    assert c["all_object_count"] == 26
    assert c["children"] == ["DB Child"] and c["children_count"] == 1
    assert c["hide_viewport"] is False and c["hide_render"] is False
    assert c["view_layer"]["exclude"] is False

    seen: list[str] = []
    offset = 0
    while True:
        page = ok(conn.request("get_collection_info", name=name, limit=10, offset=offset))
        assert page["object_count"] == 25 and page["limit"] == 10
        seen += page["objects"]
        if not page["truncated"]:
            break
        offset = page["next_offset"]
    assert seen == c["objects"] and len(set(seen)) == 25

    past = ok(conn.request("get_collection_info", name=name, offset=1000))
    assert past["objects"] == [] and past["truncated"] is False and past["object_count"] == 25

    child = ok(conn.request("get_collection_info", name="DB Child"))
    assert child["hide_render"] is True and child["objects"] == ["DB In Child"]
    assert child["view_layer"]["exclude"] is True

    scene = ok(conn.request("get_collection_info", name="Scene Collection"))
    assert scene["scene_collection"] is True and name in scene["children"]


def test_list_datablocks_walks_every_page(conn):
    for kind, code in [
        ("objects", "result = sorted(o.name for o in bpy.context.scene.objects)"),
        ("materials", "result = sorted(bpy.data.materials.keys())"),
        ("collections", "result = sorted(bpy.data.collections.keys())"),
    ]:
        want = ok(conn.request("execute_code", code=code))["value"]
        names: list[str] = []
        offset = 0
        while True:
            page = ok(conn.request("list_datablocks", type=kind, limit=7, offset=offset))
            assert page["type"] == kind and page["total"] == len(want)
            assert len(page["names"]) <= 7
            names += page["names"]
            if "next_offset" not in page:
                break
            offset = page["next_offset"]
        assert sorted(names) == want, kind
        assert len(set(names)) == len(names)
    first = ok(conn.request("list_datablocks", type="objects"))
    assert first["limit"] == 100 and first["offset"] == 0


def test_unknown_names_are_clear_errors_with_close_matches(conn):
    r = conn.request("get_material_info", name="DB Red")
    assert "Material not found: 'DB Red'" in err(r)
    assert r["not_found"] is True and "DB Red ✓" in r["close_matches"]
    r = conn.request("get_collection_info", name="DB Chlid")
    assert "Collection not found" in err(r) and "DB Child" in r["close_matches"]
    r = conn.request("get_material_info", name="zzzzqqqq")
    assert err(r) == "Material not found: 'zzzzqqqq'" and r["close_matches"] == []


@pytest.mark.parametrize(
    ("command", "params", "names"),
    [
        ("get_material_info", {}, "name"),
        ("get_material_info", {"name": ""}, "name"),
        ("get_material_info", {"name": 5}, "name"),
        ("get_collection_info", {"name": None}, "name"),
        ("get_collection_info", {"name": "DB Child", "limit": 0}, "limit must be an integer from 1 to 10000"),
        ("get_collection_info", {"name": "DB Child", "limit": -1}, "limit"),
        ("get_collection_info", {"name": "DB Child", "limit": 2.5}, "limit"),
        ("get_collection_info", {"name": "DB Child", "limit": "10"}, "limit"),
        ("get_collection_info", {"name": "DB Child", "limit": True}, "limit"),
        ("get_collection_info", {"name": "DB Child", "offset": -1}, "offset must be an integer from 0 to"),
        ("get_collection_info", {"name": "DB Child", "offset": 1e300}, "offset"),
        ("list_datablocks", {}, "type must be one of objects, materials, collections, got None"),
        ("list_datablocks", {"type": "meshes"}, "type must be one of"),
        ("list_datablocks", {"type": "objects", "limit": 10001}, "limit must be an integer from 1 to 10000"),
        ("list_datablocks", {"type": "objects", "offset": "3"}, "offset"),
    ],
)
def test_bad_input_names_the_argument(conn, command, params, names):
    message = err(conn.request(command, **params))
    assert names in message, message
    # The connection goes on.
    assert ok(conn.request("ping"))["pong"] is True


def test_integral_floats_count(conn):
    page = ok(conn.request("list_datablocks", type="objects", limit=3.0, offset=1.0))
    assert page["limit"] == 3 and page["offset"] == 1 and len(page["names"]) == 3


def test_scene_generation_grows_when_objects_materials_collections_come_and_go(conn):
    def gen() -> int:
        return ok(conn.request("get_status"))["scene_generation"]

    g0 = gen()
    ok(conn.request("execute_code", code="import bpy\nprint(len(bpy.data.objects))"))
    assert gen() == g0, "nothing added or removed: the number stays"
    ok(conn.request("execute_code", code="import bpy\nbpy.context.scene.frame_set(3)"))
    assert gen() == g0
    ok(conn.request("execute_code", code="import bpy\nbpy.data.objects.new('DB Gen', None)"))
    g1 = gen()
    assert g1 > g0
    ok(conn.request("execute_code", code="import bpy\nbpy.data.objects.remove(bpy.data.objects['DB Gen'])"))
    g2 = gen()
    assert g2 > g1
    ok(conn.request("execute_code", code="import bpy\nbpy.data.materials.new('DB Gen')"))
    g3 = gen()
    assert g3 > g2
    ok(conn.request("execute_code", code="import bpy\nbpy.data.collections.new('DB Gen')"))
    assert gen() > g3
    # A failed script that added something still counts.
    g4 = gen()
    r = conn.request("execute_code", code="import bpy\nbpy.data.objects.new('DB Gen2', None)\n1/0")
    assert "ZeroDivisionError" in err(r)
    assert gen() > g4


def test_handlers_are_registered_once_and_removed_on_stop(conn):
    code = r"""
import bpy, bld_remote
from bld_remote import datablocks
def ours(lst):
    return sum(1 for f in lst if getattr(f, "__module__", "") == "bld_remote.datablocks")
h = bpy.app.handlers
before = (ours(h.depsgraph_update_post), ours(h.load_post))
bld_remote.start_mcp_service()          # already running: no second registration
again = (ours(h.depsgraph_update_post), ours(h.load_post))
datablocks.unwatch()
gone = (ours(h.depsgraph_update_post), ours(h.load_post))
datablocks.watch()
result = [before, again, gone, (ours(h.depsgraph_update_post), ours(h.load_post))]
"""
    assert ok(conn.request("execute_code", code=code))["value"] == [[1, 1], [1, 1], [0, 0], [1, 1]]


def test_stop_removes_the_handlers(start_blender):
    """unregister()/stop_mcp_service() undo the watch: after a stop no handler of ours is left."""
    code = (
        "import bpy, bld_remote\n"
        "bld_remote.start_mcp_service(port=0)\n"
        "h = bpy.app.handlers\n"
        "ours = lambda: [f for f in [*h.depsgraph_update_post, *h.load_post]"
        " if getattr(f, '__module__', '') == 'bld_remote.datablocks']\n"
        "n = len(ours())\n"
        "bld_remote.stop_mcp_service()\n"
        "print('HANDLERS', n, len(ours()), flush=True)\n"
    )
    b = start_blender(code, wait=False)
    assert b.wait_exit(60) == 0, b.output
    b._reader.join(10)
    line = next((ln for ln in b.lines if ln.startswith("HANDLERS")), b.output)
    assert line.split()[1:] == ["2", "0"], line
