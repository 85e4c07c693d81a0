"""MCP resources of `bld-remote mcp`, driven by the official Python MCP SDK (`mcp`) against a real headless
Blender: the templates, `resources/list` paged over 250+ objects (every page walked, nothing twice, nothing
missing), reading each kind (the same JSON as its wire command), names with spaces, slashes and Unicode,
unknown resources, and `notifications/resources/list_changed` after objects are added and removed (2025
era: spontaneous notifications; 2026-07-28: `subscriptions/listen`), debounced for a burst."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from urllib.parse import quote

import anyio
import pytest
from helpers import Conn, ok

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

MODES = ["legacy", "2026-07-28"]
# The SDK's error codes: resource-not-found before 2026-07-28, INVALID_PARAMS from it on (rmcp maps them).
NOT_FOUND = {"legacy": -32002, "2026-07-28": -32602}
UNICODE = "Würfel / 立方体 ✓ #1?"


def bld_remote() -> str:
    exe = Path(sys.executable).with_name("bld-remote")
    assert exe.exists(), f"{exe} missing: pip install the built wheel into this venv"
    return str(exe)


def stdio(port: int) -> StdioServerParameters:
    return StdioServerParameters(command=bld_remote(), args=["mcp", "--port", str(port)])


def wire(port: int, command: str, **params) -> dict:
    with Conn(port) as c:
        return ok(c.request(command, **params))


def run_code(port: int, code: str) -> dict:
    return wire(port, "execute_code", code=code)


def uri(kind: str, name: str) -> str:
    return f"blender://{kind}/{quote(name, safe='')}"


def contents_json(result) -> dict:
    (c,) = result.contents
    assert c.mime_type == "application/json"
    return json.loads(c.text)


async def walk(client: Client) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        r = await client.list_resources(cursor=cursor, cache_mode="bypass")
        pages.append([res.uri for res in r.resources])
        for res in r.resources:
            assert res.mime_type == "application/json" and res.name
        cursor = r.next_cursor
        if cursor is None:
            return pages
        assert len(pages) < 100, "the listing never ends"


@pytest.mark.parametrize("mode", MODES)
def test_templates_and_capabilities(served, mode):
    async def main() -> None:
        async with Client(stdio(served.port), mode=mode) as client:
            r = await client.list_resource_templates(cache_mode="bypass")
            by_uri = {t.uri_template: t for t in r.resource_templates}
            assert set(by_uri) == {
                "blender://scene",
                "blender://object/{name}",
                "blender://material/{name}",
                "blender://collection/{name}",
            }
            for t in by_uri.values():
                assert t.mime_type == "application/json" and t.description, t
            assert "instance" in by_uri["blender://scene"].description

    asyncio.run(main())


@pytest.fixture(scope="module")
def many(served):
    """250 objects (and the default Cube, Camera, Light), a material and a collection with awkward names."""
    run_code(
        served.port,
        "import bpy\n"
        "coll = bpy.data.collections.new('Res Things')\n"
        "bpy.context.scene.collection.children.link(coll)\n"
        "for i in range(250):\n"
        "    coll.objects.link(bpy.data.objects.new(f'Res {i:03d}', None))\n"
        f"o = bpy.data.objects.new({UNICODE!r}, None)\n"
        "coll.objects.link(o)\n"
        f"bpy.data.materials.new({UNICODE!r})\n"
        f"c = bpy.data.collections.new({UNICODE!r})\n"
        "coll.children.link(c)\n",
    )
    return served


@pytest.mark.parametrize("mode", MODES)
def test_list_is_paged_and_complete(many, mode):
    want = {"blender://scene"}
    for kind, list_type in [("object", "objects"), ("material", "materials"), ("collection", "collections")]:
        names = wire(many.port, "list_datablocks", type=list_type, limit=10000)["names"]
        want |= {uri(kind, n) for n in names}
    assert len(want) > 256

    async def main() -> list[list[str]]:
        async with Client(stdio(many.port), mode=mode) as client:
            return await walk(client)

    pages = asyncio.run(main())
    assert len(pages) >= 3
    assert all(len(p) <= 100 for p in pages) and all(len(p) == 100 for p in pages[:-1])
    seen = [u for p in pages for u in p]
    assert len(seen) == len(set(seen)), "a resource was listed twice"
    assert set(seen) == want
    assert seen[0] == "blender://scene"
    assert uri("object", UNICODE) in seen and uri("object", "Res 249") in seen


def test_bad_cursor_is_invalid_params(served):
    async def main() -> None:
        async with Client(stdio(served.port), mode="legacy") as client:
            with pytest.raises(MCPError) as e:
                await client.list_resources(cursor="meshes:7", cache_mode="bypass")
            assert e.value.code == -32602 and "cursor" in str(e.value.error.message)

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_read_each_kind_is_its_wire_command(many, mode):
    port = many.port

    async def main() -> None:
        async with Client(stdio(port), mode=mode) as client:
            scene = contents_json(await client.read_resource("blender://scene", cache_mode="bypass"))
            assert scene == wire(port, "get_scene_info", summary=True)
            for kind, command, name in [
                ("object", "get_object_info", "Cube"),
                ("object", "get_object_info", UNICODE),
                ("material", "get_material_info", "Material"),
                ("material", "get_material_info", UNICODE),
                ("collection", "get_collection_info", "Collection"),
                ("collection", "get_collection_info", "Res Things"),
                ("collection", "get_collection_info", UNICODE),
            ]:
                r = await client.read_resource(uri(kind, name), cache_mode="bypass")
                assert r.contents[0].uri == uri(kind, name)
                got = contents_json(r)
                assert got == wire(port, command, name=name), (kind, name)
                assert got["name"] == name
            # A collection's resource is its first page (100) of objects, with the total.
            things = contents_json(
                await client.read_resource(uri("collection", "Res Things"), cache_mode="bypass")
            )
            assert things["object_count"] == 251 and len(things["objects"]) == 100 and things["truncated"]
            # Unencoded Unicode is taken as it is (a raw '/' too); '?' and '#' must be encoded.
            raw = contents_json(await client.read_resource("blender://object/Res 007", cache_mode="bypass"))
            assert raw["name"] == "Res 007"
            # Naming the (pinned) instance is allowed.
            again = await client.read_resource(f"blender://object/Cube?instance={port}", cache_mode="bypass")
            assert contents_json(again)["name"] == "Cube"

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_unknown_resources_are_not_found(served, mode):
    async def main() -> None:
        async with Client(stdio(served.port), mode=mode) as client:
            for bad, says in [
                ("blender://object/NoSuchObject", "Object not found"),
                ("blender://material/Materia", "did you mean 'Material'"),
                ("blender://collection/Nope", "Collection not found"),
                ("blender://mesh/Cube", "the kinds are"),
                ("blender://object/", "needs a name"),
                ("blender://object/%E2%9C", "UTF-8"),
                ("file:///etc/passwd", "resources are blender://scene"),
                ("blender://scene?port=1", "instance=PORT_OR_ID"),
            ]:
                with pytest.raises(MCPError) as e:
                    await client.read_resource(bad, cache_mode="bypass")
                assert e.value.code == NOT_FOUND[mode], (bad, e.value.error)
                assert says in e.value.error.message, (bad, e.value.error.message)
            with pytest.raises(MCPError) as e:
                await client.read_resource("blender://scene?instance=1", cache_mode="bypass")
            assert "pinned" in e.value.error.message
            # Still serving.
            assert contents_json(await client.read_resource("blender://object/Cube", cache_mode="bypass"))

    asyncio.run(main())


class Changes:
    """Counts notifications/resources/list_changed from the client's message handler; `wait` blocks on an
    event (no sleep loop) until one more arrives or the timeout passes."""

    def __init__(self) -> None:
        self.count = 0
        self.times: list[float] = []
        self._event = anyio.Event()

    async def handler(self, message) -> None:
        if getattr(message, "method", None) == "notifications/resources/list_changed":
            self.count += 1
            self.times.append(time.monotonic())
            self._event.set()
            self._event = anyio.Event()

    async def wait(self, seen: int, timeout: float = 10.0) -> bool:
        with anyio.move_on_after(timeout):
            while self.count <= seen:
                await self._event.wait()
            return True
        return False


def test_list_changed_after_add_and_remove_and_debounced(served):
    changes = Changes()

    async def main() -> None:
        async with Client(stdio(served.port), mode="legacy", message_handler=changes.handler) as client:
            # What the session has seen: a change after this listing is always told.
            await client.list_resources(cache_mode="bypass")
            n = changes.count
            r = await client.call_tool(
                "execute_blender_code",
                {
                    "code": "import bpy\nbpy.context.scene.collection.objects.link(bpy.data.objects.new('LC Added', None))"
                },
            )
            assert not r.is_error
            assert await changes.wait(n), "no list_changed after an object was added"
            assert uri("object", "LC Added") in {u for p in await walk(client) for u in p}
            n = changes.count
            r = await client.call_tool(
                "execute_blender_code",
                {"code": "import bpy\nbpy.data.objects.remove(bpy.data.objects['LC Added'])"},
            )
            assert not r.is_error
            assert await changes.wait(n), "no list_changed after an object was removed"

            assert uri("object", "LC Added") not in {u for p in await walk(client) for u in p}

            # Code that changes no list: no notification.
            n = changes.count
            await client.call_tool(
                "execute_blender_code", {"code": "import bpy\nbpy.context.scene.frame_set(7)"}
            )
            assert not await changes.wait(n, timeout=1.5), "list_changed without a change"

            # A burst: 50 additions, one call each, as fast as they go.
            n = changes.count
            started = time.monotonic()
            for i in range(50):
                r = await client.call_tool(
                    "execute_blender_code",
                    {
                        "code": f"import bpy\nbpy.context.scene.collection.objects.link(bpy.data.objects.new('LC {i}', None))"
                    },
                )
                assert not r.is_error
            took = time.monotonic() - started
            assert await changes.wait(n)
            # The last change of the burst is told too; then it goes quiet.
            while await changes.wait(changes.count, timeout=1.0):
                pass
            burst = changes.count - n
            # At most one per 500 ms while it lasted, plus the one after it.
            assert 1 <= burst <= int(took / 0.5) + 2, (burst, took)
            assert burst < 25, (burst, took)
            gaps = [b - a for a, b in zip(changes.times, changes.times[1:])]
            assert all(g >= 0.45 for g in gaps[-burst:][1:]), gaps
            print(f"burst of 50 additions in {took:.2f} s -> {burst} list_changed")
            pages = await walk(client)
            assert uri("object", "LC 49") in {u for p in pages for u in p}

    asyncio.run(main())


def test_list_changed_over_subscriptions_listen(served):
    """2026-07-28: no spontaneous notifications; a `subscriptions/listen` for resourcesListChanged gets them."""

    async def main() -> None:
        async with Client(stdio(served.port), mode="2026-07-28") as client:
            await client.list_resources(cache_mode="bypass")  # what the session has seen
            async with client.listen(resources_list_changed=True) as sub:
                assert sub.honored.resources_list_changed is True
                r = await client.call_tool(
                    "execute_blender_code", {"code": "import bpy\nbpy.data.materials.new('LC Listen')"}
                )
                assert not r.is_error
                with anyio.fail_after(10):
                    event = await sub.__anext__()
                assert type(event).__name__ == "ResourcesListChanged", event
                r = await client.call_tool(
                    "execute_blender_code",
                    {"code": "import bpy\nbpy.data.materials.remove(bpy.data.materials['LC Listen'])"},
                )
                with anyio.fail_after(10):
                    event = await sub.__anext__()
                assert type(event).__name__ == "ResourcesListChanged", event

    asyncio.run(main())
