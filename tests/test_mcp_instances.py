"""One `bld-remote mcp` for several Blenders, driven by the official Python MCP SDK (`mcp`) against two real
headless Blenders whose descriptors share one runtime dir (the second needs a token, which the MCP server
finds in its descriptor): list_instances shows both; a tool without `instance` is an error listing both;
`instance` as a port (number or string) or as the id `bld-remote ls` prints reaches that Blender; an
unknown instance is an error listing the known ones; with one instance the argument may be left out, and
an instance that appears later makes leaving it out an error; `--port` pins the server. Every Blender
started here is stopped by its PID."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import anyio
import pytest
from helpers import SERVE, BlenderProcess, blender_env, cli_env, free_port, runtime_argv

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

PID = "import os\nresult = os.getpid()"


def server(runtime_dir: Path, *args: str) -> StdioServerParameters:
    exe = Path(sys.executable).with_name("bld-remote")
    assert exe.exists(), f"{exe} missing: pip install the built wheel into this venv"
    return StdioServerParameters(command=str(exe), args=["mcp", *args], env=cli_env(runtime_dir))


def text(result) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


@pytest.fixture(scope="module")
def pair(user_scripts, tmp_path_factory):
    """Two headless Blenders, descriptors in one runtime dir; the second requires a token. Killed by PID."""
    rt = tmp_path_factory.mktemp("mcp_runtime")
    procs: list[BlenderProcess] = []
    try:
        for extra in ({}, {"BLD_REMOTE_TOKEN": "pair-s3cret-token"}):
            procs.append(
                BlenderProcess(
                    runtime_argv(SERVE.format(port=0)),
                    blender_env(user_scripts, BLD_REMOTE_RUNTIME_DIR=str(rt), **extra),
                )
            )
        for b in procs:
            b.wait_ready()
        assert len(list(rt.glob("bld_remote-*.json"))) == 2
        yield rt, procs
    finally:
        for b in procs:
            b.kill()


async def pid_of(client: Client, instance) -> int:
    r = await client.call_tool("execute_blender_code", {"code": PID, "instance": instance})
    assert not r.is_error, text(r)
    line = next(x for x in text(r).splitlines() if x.startswith("result = "))
    return int(line.removeprefix("result = "))


def test_list_instances_shows_both_and_no_instance_is_an_error_listing_both(pair):
    rt, (a, b) = pair

    async def main() -> None:
        async with Client(server(rt), mode="legacy") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert "list_instances" in tools
            for name, t in tools.items():
                if name != "list_instances":
                    assert "instance" in t.input_schema["properties"], name
                    assert "instance" not in t.input_schema.get("required", []), name

            r = await client.call_tool("list_instances", {})
            assert not r.is_error, text(r)
            listed = json.loads(text(r))["instances"]
            assert {(i["port"], i["pid"], i["id"], i["instance"]) for i in listed} == {
                (p.port, p.pid, p.pid, p.port) for p in (a, b)
            }
            for i in listed:
                assert i["answers"] is True, i
                assert i["host"] == "127.0.0.1" and i["mode"] == "background", i
                assert i["blender_version"].startswith("3."), i
                assert "token" not in i, "list_instances must never show a token"
            assert {i["port"]: i["token_required"] for i in listed} == {a.port: False, b.port: True}

            for tool, args in (
                ("execute_blender_code", {"code": PID}),
                ("get_scene_info", {}),
                ("check_connection_status", {}),
                ("render_image", {"width": 8, "height": 8}),
            ):
                r = await client.call_tool(tool, args)
                assert r.is_error, (tool, text(r))
                msg = text(r)
                assert "2 Blender instances are running" in msg and "`instance`" in msg, msg
                for p in (a, b):
                    assert f"instance {p.port} (id {p.pid}," in msg, msg

    asyncio.run(main())


def test_instance_by_port_or_id_reaches_that_blender(pair):
    rt, (a, b) = pair

    async def main() -> None:
        async with Client(server(rt), mode="legacy") as client:
            for p in (a, b):
                assert await pid_of(client, p.port) == p.pid
                assert await pid_of(client, str(p.port)) == p.pid
                assert await pid_of(client, p.pid) == p.pid
                assert await pid_of(client, str(p.pid)) == p.pid
                assert await pid_of(client, f"127.0.0.1:{p.port}") == p.pid
                r = await client.call_tool("check_connection_status", {"instance": p.port})
                status = json.loads(text(r))
                assert status["connected"] is True and status["pid"] == p.pid, status
                assert status["address"] == f"127.0.0.1:{p.port}", status
            # State is per instance: a value put in one Blender is not in the other.
            r = await client.call_tool("put_persist_data", {"key": "who", "data": "a", "instance": a.port})
            assert not r.is_error, text(r)
            r = await client.call_tool("get_persist_data", {"key": "who", "instance": b.pid})
            assert json.loads(text(r))["found"] is False
            r = await client.call_tool("get_persist_data", {"key": "who", "instance": a.pid})
            assert json.loads(text(r)) == {"data": "a", "found": True}
            r = await client.call_tool("remove_persist_data", {"key": "who", "instance": str(a.port)})
            assert json.loads(text(r)) == {"removed": True}
            r = await client.call_tool("get_scene_info", {"instance": b.port})
            assert not r.is_error and "Cube" in text(r), text(r)

            # One connection per instance: a slow call in one Blender does not hold up the other.
            done: dict[str, float] = {}

            async def slow() -> None:
                r = await client.call_tool(
                    "execute_blender_code",
                    {"code": "import time\ntime.sleep(4)\nresult = 1", "instance": a.port},
                )
                assert not r.is_error, text(r)
                done["slow"] = time.monotonic()

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                t0 = time.monotonic()
                assert await pid_of(client, b.port) == b.pid
                done["fast"] = time.monotonic()
            assert done["fast"] < done["slow"] and done["fast"] - t0 < 3, (done, t0)

    asyncio.run(main())


@pytest.mark.parametrize("bad", ["nope", 1, "127.0.0.1:1"])
def test_unknown_instance_is_an_error_listing_the_known_ones(pair, bad):
    rt, (a, b) = pair
    if bad == 1:
        bad = free_port()  # a port no instance has
        while bad in (a.pid, b.pid):
            bad = free_port()

    async def main() -> None:
        async with Client(server(rt), mode="legacy") as client:
            r = await client.call_tool("execute_blender_code", {"code": PID, "instance": bad})
            assert r.is_error
            msg = text(r)
            assert f"no Blender instance {json.dumps(str(bad))}" in msg and "list_instances" in msg, msg
            for p in (a, b):
                assert f"instance {p.port} (id {p.pid}," in msg, msg

    asyncio.run(main())


def test_instance_of_the_wrong_type_is_refused(pair):
    rt, _ = pair

    async def main() -> None:
        async with Client(server(rt), mode="legacy") as client:
            for bad in (-3, 1.5, True, "", [6688]):
                try:
                    r = await client.call_tool("get_scene_info", {"instance": bad})
                except mcp.McpError as e:  # rmcp refuses bad arguments as invalid params
                    msg = str(e)
                else:
                    assert r.is_error, (bad, text(r))
                    msg = text(r)
                assert "instance must be a port or an id" in msg, (bad, msg)

    asyncio.run(main())


def test_one_instance_needs_no_argument_and_a_second_one_appearing_makes_it_needed(pair, tmp_path):
    """A runtime dir holding one of the pair's descriptors: one instance. Then the other's descriptor is
    added while the server runs: the instance is chosen on every call, so leaving it out is now an error."""
    rt, (a, b) = pair
    solo = tmp_path / "solo"
    solo.mkdir(mode=0o700)
    by_port = {json.loads(p.read_text())["port"]: p for p in rt.glob("bld_remote-*.json")}
    shutil.copy2(by_port[a.port], solo / by_port[a.port].name)

    async def main() -> None:
        async with Client(server(solo), mode="legacy") as client:
            r = await client.call_tool("execute_blender_code", {"code": PID})
            assert not r.is_error and f"result = {a.pid}" in text(r), text(r)
            assert await pid_of(client, a.port) == a.pid
            r = await client.call_tool("list_instances", {})
            assert [i["port"] for i in json.loads(text(r))["instances"]] == [a.port]

            dst = solo / by_port[b.port].name
            shutil.copy2(by_port[b.port], dst)
            os.chmod(dst, 0o600)
            r = await client.call_tool("execute_blender_code", {"code": PID})
            assert r.is_error and "2 Blender instances are running" in text(r), text(r)
            assert await pid_of(client, b.pid) == b.pid  # the token comes from the new descriptor

    asyncio.run(main())


def test_port_pins_the_server(pair):
    rt, (a, b) = pair

    async def main() -> None:
        async with Client(server(rt, "--port", str(a.port)), mode="legacy") as client:
            assert await pid_of(client, None) == a.pid
            assert await pid_of(client, a.port) == a.pid
            assert await pid_of(client, a.pid) == a.pid
            for other in (b.port, b.pid, "nope"):
                r = await client.call_tool("execute_blender_code", {"code": PID, "instance": other})
                assert r.is_error, text(r)
                assert f"pinned to 127.0.0.1:{a.port}" in text(r), text(r)
            r = await client.call_tool("list_instances", {})
            listed = json.loads(text(r))
            assert {i["port"] for i in listed["instances"]} == {a.port, b.port}
            assert f"pinned to 127.0.0.1:{a.port}" in listed["pinned"], listed

    asyncio.run(main())


def test_a_stopped_instance_is_listed_as_not_answering_and_still_counts(pair):
    """SIGSTOP one Blender: list_instances reports it as not answering within its 2 s check (the other
    answers), a call without `instance` is still refused (never a guess), the other is reached by name."""
    rt, (a, b) = pair

    async def main() -> None:
        async with Client(server(rt), mode="legacy") as client:
            assert await pid_of(client, b.port) == b.pid
            os.kill(b.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                r = await client.call_tool("list_instances", {})
                took = time.monotonic() - t0
                listed = {i["port"]: i for i in json.loads(text(r))["instances"]}
                assert listed[a.port]["answers"] is True, listed
                assert listed[b.port]["answers"] is False and listed[b.port]["problem"], listed
                assert 1.5 < took < 5, took
                t0 = time.monotonic()
                r = await client.call_tool("get_scene_info", {})
                assert r.is_error and "2 Blender instances are running" in text(r), text(r)
                assert time.monotonic() - t0 < 1
                assert await pid_of(client, a.pid) == a.pid
            finally:
                os.kill(b.pid, signal.SIGCONT)
            assert await pid_of(client, b.port) == b.pid  # the kept connection works again

    asyncio.run(main())


def test_an_instance_that_dies_drops_out(pair, start_blender, tmp_path):
    """A third Blender beside one of the pair, in a runtime dir of their own; killed with SIGKILL after a
    call: naming it is then an unknown instance (its descriptor pruned), and the survivor is the only one."""
    rt, (a, _) = pair
    own = tmp_path / "own"
    own.mkdir(mode=0o700)
    src = next(p for p in rt.glob("bld_remote-*.json") if json.loads(p.read_text())["port"] == a.port)
    shutil.copy2(src, own / src.name)
    c = start_blender(env={"BLD_REMOTE_RUNTIME_DIR": str(own)})

    async def main() -> None:
        async with Client(server(own), mode="legacy") as client:
            assert await pid_of(client, c.port) == c.pid
            os.kill(c.pid, signal.SIGKILL)
            await anyio.to_thread.run_sync(lambda: c.proc.wait(10))
            r = await client.call_tool("execute_blender_code", {"code": PID, "instance": c.port})
            assert r.is_error and f"no Blender instance {json.dumps(str(c.port))}" in text(r), text(r)
            assert f"instance {a.port} (id {a.pid}," in text(r), text(r)
            r = await client.call_tool("list_instances", {})
            assert [i["port"] for i in json.loads(text(r))["instances"]] == [a.port]
            r = await client.call_tool("execute_blender_code", {"code": PID})
            assert not r.is_error and f"result = {a.pid}" in text(r), text(r)

    asyncio.run(main())
