"""The tools/list budget (issue 16: the whole answer stays within 16 KiB of JSON, about 4k tokens), measured on
the real `bld-remote mcp` through the official Python SDK (`mcp`), in both protocol eras, with the output
schemas; and what every listed tool must carry: an input schema with the optional `instance` argument, and
truthful annotations. tools/list needs no Blender: the server lists its tools without one."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers import free_port
from test_mcp import stdio

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402

BUDGET = 16 * 1024
# Every tool, and whether it only reads (a new tool must be added here: its annotations are checked).
READ_ONLY = {
    "check_connection_status": True,
    "get_object_info": True,
    "get_persist_data": True,
    "get_scene_info": True,
    "get_viewport_screenshot": True,
    "list_instances": True,
    "look": True,
    "lookup_bpy_api": True,
    "render_image": True,
    "execute_blender_code": False,
    "export_scene": False,
    "put_persist_data": False,
    "remove_persist_data": False,
}


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_tools_list_fits_the_budget_and_every_tool_is_described_truthfully(mode, record_property):
    async def main() -> tuple[int, int]:
        async with Client(stdio(free_port()), mode=mode) as client:
            listed = await client.list_tools()
        assert listed.next_cursor is None, "tools/list is one page"
        answer = listed.model_dump(mode="json", by_alias=True, exclude_none=True)
        size = len(json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode())
        tools = listed.tools
        for t in tools:
            name = t.name
            assert name in READ_ONLY, f"{name}: a new tool; add it to READ_ONLY with whether it only reads"
            assert t.description and 20 < len(t.description) < 700, name
            schema = t.input_schema
            assert schema["type"] == "object", name
            if name != "list_instances":
                instance = schema.get("properties", {}).get("instance")
                assert instance is not None, f"{name} takes no `instance`"
                assert "instance" not in schema.get("required", []), name
            a = t.annotations
            assert a is not None and a.title, name
            assert a.read_only_hint is READ_ONLY[name], f"{name}: readOnlyHint {a.read_only_hint}"
            assert a.open_world_hint is not None, name
            if not READ_ONLY[name]:
                assert a.destructive_hint is not None, f"{name} writes: say whether it destroys"
            if t.output_schema is not None:
                assert t.output_schema["type"] == "object", name
            per_tool = len(json.dumps(t.model_dump(mode="json", by_alias=True, exclude_none=True)))
            assert per_tool < 2048, f"{name}: {per_tool} bytes in tools/list"
        return size, len(tools)

    size, count = asyncio.run(main())
    record_property("tools_list_bytes", size)
    print(f"tools/list ({mode}): {size} bytes of JSON for {count} tools (budget {BUDGET})")
    assert size <= BUDGET, f"tools/list is {size} bytes, over the {BUDGET}-byte budget"
