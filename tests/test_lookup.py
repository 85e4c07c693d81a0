"""`lookup_bpy_api`: the bpy API of the Blender actually running, from its own RNA, against a real Blender
(Debian's 3.4.1 headless; PyPI bpy 5.3 in scripts/test-bpy.sh): structs, properties (types, defaults, enum
items), operators, a substring search, paging, not-found with close matches, bad input; and the MCP tool
through the official `mcp` client. Expected values are read from the same Blender by plain bpy code."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from helpers import call, err, ok


def blender_version(port: int) -> list[int]:
    return ok(call(port, "execute_code", code="result = list(bpy.app.version)"))["value"]


def test_struct_and_property(served):
    port = served.port
    s = ok(call(port, "lookup_bpy_api", path="bpy.types.Object", limit=500))
    assert s["kind"] == "struct" and s["base"] == "ID" and s["path"] == "bpy.types.Object", s
    names = [p["identifier"] for p in s["properties"]]
    truth = ok(
        call(
            port,
            "execute_code",
            code="result = [p.identifier for p in bpy.types.Object.bl_rna.properties if p.identifier != 'rna_type']",
        )
    )["value"]
    assert names == truth and s["properties_total"] == len(truth)
    assert "select_get" in s["functions"]
    assert ok(call(port, "lookup_bpy_api", path="Object"))["path"] == "bpy.types.Object"  # short form

    loc = ok(call(port, "lookup_bpy_api", path="bpy.types.Object.location"))
    assert loc["kind"] == "property" and loc["type"] == "FLOAT" and loc["array_length"] == 3, loc
    assert loc["subtype"] == "TRANSLATION" and loc["default"] == [0.0, 0.0, 0.0] and loc["unit"] == "LENGTH"
    assert loc["readonly"] is False and loc["description"]

    mode = ok(call(port, "lookup_bpy_api", path="bpy.types.Object.rotation_mode"))
    ids = [i["identifier"] for i in mode["enum_items"]]
    truth = ok(
        call(
            port,
            "execute_code",
            code="result = [i.identifier for i in bpy.types.Object.bl_rna.properties['rotation_mode'].enum_items]",
        )
    )["value"]
    assert mode["type"] == "ENUM" and ids == truth and "QUATERNION" in ids and mode["default"] == "XYZ", mode

    fn = ok(call(port, "lookup_bpy_api", path="bpy.types.Object.select_set"))
    assert fn["kind"] == "function" and [p["identifier"] for p in fn["parameters"]][0] == "state", fn


def test_operator_and_the_running_version(served):
    port = served.port
    op = ok(call(port, "lookup_bpy_api", path="bpy.ops.mesh.primitive_cube_add"))
    props = {p["identifier"]: p for p in op["properties"]}
    assert (
        op["kind"] == "operator" and props["size"]["type"] == "FLOAT" and props["size"]["default"] == 2.0
    ), op
    assert props["location"]["array_length"] == 3
    # Exact for this Blender: Mesh.use_auto_smooth went away in 4.1, Object.modifiers.new's ... stays.
    major, minor = blender_version(port)[:2]
    r = call(port, "lookup_bpy_api", path="bpy.types.Mesh.use_auto_smooth")
    if (major, minor) < (4, 1):
        assert ok(r)["type"] == "BOOLEAN", r
    else:
        assert "not found" in err(r), r
    r = ok(call(port, "lookup_bpy_api", path="Object"))
    assert r["blender_version"].startswith(f"{major}.{minor}")


def test_search_paging_and_bad_input(served):
    port = served.port
    first = ok(call(port, "lookup_bpy_api", search="cube_add", limit=1))
    assert first["matches"][0]["path"].startswith("bpy.ops.") and first["matches_total"] >= 1, first
    every = ok(call(port, "lookup_bpy_api", search="object.loc", limit=500))
    assert {"path": "bpy.types.Object.location", "kind": "property"} in every["matches"]
    page1 = ok(call(port, "lookup_bpy_api", search="object.loc", limit=3))
    page2 = ok(call(port, "lookup_bpy_api", search="object.loc", limit=3, offset=page1["next_offset"]))
    assert page1["truncated"] is True and page1["matches"] + page2["matches"] == every["matches"][:6]
    none = ok(call(port, "lookup_bpy_api", search="zzqx_no_such_name"))
    assert none["matches"] == [] and none["matches_total"] == 0

    miss = call(port, "lookup_bpy_api", path="bpy.types.Objct")
    assert "not found" in err(miss) and "bpy.types.Object" in miss["close_matches"], miss
    miss = call(port, "lookup_bpy_api", path="bpy.types.Object.locaton")
    assert "location" in miss["close_matches"], miss
    miss = call(port, "lookup_bpy_api", path="bpy.ops.mesh.primitive_cube_ad")
    assert "bpy.ops.mesh.primitive_cube_add" in miss["close_matches"], miss
    for params in (
        {},
        {"path": "Object", "search": "x"},
        {"path": ""},
        {"path": 5},
        {"search": ""},
        {"search": "x", "limit": 0},
        {"search": "x", "limit": -1},
        {"search": "x", "limit": 2.5},
        {"search": "x", "limit": True},
        {"search": "x", "limit": "10"},
        {"search": "x", "offset": -1},
        {"search": "x", "kind": "thing"},
        {"path": "bpy.ops.mesh"},
        {"path": "Object.location.x"},
    ):
        assert err(call(port, "lookup_bpy_api", **params)), params


mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_mcp_tool(served, mode):
    exe = Path(sys.executable).with_name("bld-remote")
    params = StdioServerParameters(command=str(exe), args=["mcp", "--port", str(served.port)])

    async def main() -> None:
        async with Client(params, mode=mode) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert tools["lookup_bpy_api"].annotations.read_only_hint is True
            r = await client.call_tool("lookup_bpy_api", {"path": "bpy.types.Object.location"})
            assert not r.is_error, r.content
            assert r.structured_content["type"] == "FLOAT" and r.structured_content["array_length"] == 3
            assert json.loads(r.content[0].text) == r.structured_content
            r = await client.call_tool("lookup_bpy_api", {"path": "bpy.types.Nope"})
            assert r.is_error and "not found" in r.content[0].text

    asyncio.run(main())
