"""`bld-remote mcp` driven by the official Python MCP SDK (`mcp`) against a real headless Blender, over stdio
and over Streamable HTTP, in both protocol eras (the 2025-11-25 initialize handshake, "legacy" in the SDK, and
the stateless 2026-07-28 revision): list the tools, call each, decode the PNG from render_image, see progress
notifications while it renders, cancel a queued request and see that it never ran, be refused with a bad
Origin, a bad Host or a missing bearer token. Every process started here is stopped by its PID."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import anyio
import pytest
from helpers import free_port

mcp = pytest.importorskip("mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: E402

MODES = ["legacy", "2026-07-28"]
TOOLS = {
    "check_connection_status",
    "execute_blender_code",
    "export_scene",
    "get_object_info",
    "get_persist_data",
    "get_scene_info",
    "get_viewport_screenshot",
    "list_instances",
    "look",
    "lookup_bpy_api",
    "put_persist_data",
    "remove_persist_data",
    "render_image",
}
# A hand-written 2025-11-25 initialize, for the tests that speak to the server without the SDK.
RAW_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}


def bld_remote() -> str:
    exe = Path(sys.executable).with_name("bld-remote")
    assert exe.exists(), f"{exe} missing: pip install the built wheel into this venv"
    return str(exe)


def stdio(port: int, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=bld_remote(), args=["mcp", "--port", str(port), *extra])


def text(result) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


def decode_png(data: bytes) -> tuple[int, int]:
    """A real decode: signature, IHDR, every IDAT inflated to exactly the size the header promises."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert ihdr is not None
    width, height, depth, color = ihdr[:4]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + width * channels * depth // 8)
    return width, height


class HttpServer:
    """`bld-remote mcp --http` in a subprocess; stopped by PID."""

    def __init__(self, blender_port: int, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc = subprocess.Popen(
            [bld_remote(), "mcp", "--port", str(blender_port), "--http", f"127.0.0.1:{self.port}", *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr.append(line)
                if "serving MCP over Streamable HTTP" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(30):
            self.stop()
            raise AssertionError(f"bld-remote mcp --http did not start: {''.join(self.stderr)}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture
def http_server(served):
    servers: list[HttpServer] = []

    def start(*extra: str) -> HttpServer:
        s = HttpServer(served.port, *extra)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


async def exercise_every_tool(client: Client) -> None:
    tools = (await client.list_tools()).tools
    by_name = {t.name: t for t in tools}
    assert set(by_name) == TOOLS
    for t in tools:
        assert t.description and len(t.description) > 20, t.name
        assert t.input_schema["type"] == "object", t.name
        assert t.annotations is not None, t.name
    assert by_name["execute_blender_code"].input_schema["required"] == ["code"]
    assert by_name["execute_blender_code"].annotations.destructive_hint is True
    assert by_name["execute_blender_code"].annotations.read_only_hint is False
    for name in ("get_scene_info", "get_object_info", "render_image", "get_persist_data"):
        assert by_name[name].annotations.read_only_hint is True, name
    assert set(by_name["render_image"].input_schema["properties"]) >= {"width", "height", "engine"}

    r = await client.call_tool("check_connection_status", {})
    assert not r.is_error and json.loads(text(r))["connected"] is True
    # Pinned with --port: list_instances says so (the instances themselves: tests/test_mcp_instances.py).
    r = await client.call_tool("list_instances", {})
    assert not r.is_error and "pinned to 127.0.0.1:" in json.loads(text(r))["pinned"], text(r)

    r = await client.call_tool("get_scene_info", {})
    assert not r.is_error, text(r)
    assert {o["name"] for o in json.loads(text(r))["objects"]} >= {"Cube", "Camera", "Light"}

    r = await client.call_tool("get_object_info", {"name": "Cube"})
    assert not r.is_error and json.loads(text(r))["mesh"]["vertices"] == 8
    r = await client.call_tool("get_object_info", {"name": "NoSuchObject"})
    assert r.is_error and "NoSuchObject" in text(r)

    r = await client.call_tool(
        "execute_blender_code", {"code": "print('hello from blender')\nresult = 6 * 7"}
    )
    assert not r.is_error, text(r)
    assert "hello from blender" in text(r) and "result = 42" in text(r)
    r = await client.call_tool("execute_blender_code", {"code": "print('before')\n1 / 0"})
    assert r.is_error
    assert "ZeroDivisionError" in text(r) and "Traceback" in text(r) and "before" in text(r)

    r = await client.call_tool("put_persist_data", {"key": "k", "data": {"a": [1, 2]}})
    assert not r.is_error, text(r)
    r = await client.call_tool("get_persist_data", {"key": "k"})
    assert json.loads(text(r)) == {"data": {"a": [1, 2]}, "found": True}
    r = await client.call_tool("remove_persist_data", {"key": "k"})
    assert json.loads(text(r)) == {"removed": True}
    r = await client.call_tool("get_persist_data", {"key": "k", "default": 5})
    assert json.loads(text(r)) == {"data": 5, "found": False}

    r = await client.call_tool("get_viewport_screenshot", {})
    assert r.is_error and "render_image" in text(r) and "background" in text(r)

    r = await client.call_tool("render_image", {"width": 96, "height": 64})
    assert not r.is_error, text(r)
    images = [c for c in r.content if c.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    assert decode_png(base64.b64decode(images[0].data)) == (96, 64)


@pytest.mark.parametrize("mode", MODES)
def test_stdio_every_tool(served, mode):
    async def main() -> None:
        async with Client(stdio(served.port), mode=mode) as client:
            await exercise_every_tool(client)

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_http_every_tool(http_server, mode):
    server = http_server()

    async def main() -> None:
        async with Client(server.url, mode=mode) as client:
            await exercise_every_tool(client)

    asyncio.run(main())


def test_stdout_carries_only_mcp(served):
    """Raw stdio: every stdout line is a JSON-RPC message; EOF on stdin ends the server with rc 0."""
    proc = subprocess.Popen(
        [bld_remote(), "mcp", "--port", str(served.port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, _err = proc.communicate(json.dumps(RAW_INITIALIZE) + "\n", timeout=30)
        assert proc.returncode == 0
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines, "no reply on stdout"
        for line in lines:
            assert json.loads(line)["jsonrpc"] == "2.0"
        assert json.loads(lines[0])["result"]["protocolVersion"] == "2025-11-25"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_render_image_sends_progress_notifications(served, http_server, transport):
    target = stdio(served.port) if transport == "stdio" else http_server().url

    async def main() -> list[tuple[float, float | None, str | None]]:
        seen: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, total, message))

        async with Client(target, mode="legacy" if transport == "stdio" else "2026-07-28") as client:
            r = await client.call_tool(
                "render_image",
                {"width": 160, "height": 120, "engine": "CYCLES", "samples": 8},
                progress_callback=on_progress,
            )
            assert not r.is_error, text(r)
            image = next(c for c in r.content if c.type == "image")
            assert decode_png(base64.b64decode(image.data)) == (160, 120)
        return seen

    seen = asyncio.run(main())
    assert len(seen) >= 3, seen
    values = [p for p, _, _ in seen]
    assert values == sorted(values) and len(set(values)) == len(values), "progress must increase"
    messages = [m for _, _, m in seen]
    assert any(m and "CYCLES" in m for m in messages), messages
    assert "render finished" in messages, messages


def test_cancel_queued_request_never_runs(served, tmp_path):
    """A runs for 3 s on Blender's main thread; B is queued behind it and cancelled: B must never run."""
    marker = tmp_path / "b_ran"

    async def main() -> None:
        async with Client(stdio(served.port), mode="legacy") as client:
            a_result = {}

            async def call_a() -> None:
                a_result["r"] = await client.call_tool(
                    "execute_blender_code", {"code": "import time\ntime.sleep(3)\nprint('a done')"}
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(call_a)
                await anyio.sleep(0.5)
                with anyio.move_on_after(1.0) as scope:
                    await client.call_tool(
                        "execute_blender_code", {"code": f"open({str(marker)!r}, 'w').write('ran')"}
                    )
                assert scope.cancelled_caught, "B should still be queued behind A when cancelled"
            assert "a done" in text(a_result["r"])
            # The queue is drained: a later request runs, and B still has not.
            r = await client.call_tool("execute_blender_code", {"code": "print('after')"})
            assert "after" in text(r)

    asyncio.run(main())
    time.sleep(0.5)
    assert not marker.exists(), "the cancelled request ran"


def test_blender_down_then_back_is_a_tool_error_then_works(start_blender):
    port = free_port()

    async def main() -> None:
        async with Client(stdio(port, "--timeout", "20"), mode="legacy") as client:
            r = await client.call_tool("check_connection_status", {})
            status = json.loads(text(r))
            assert status["connected"] is False and "not reachable" in status["reason"]
            t0 = time.monotonic()
            r = await client.call_tool("get_scene_info", {})
            assert r.is_error and "not reachable" in text(r) and str(port) in text(r)
            assert time.monotonic() - t0 < 10

            blender = await anyio.to_thread.run_sync(lambda: start_blender(port=port))
            r = await client.call_tool("execute_blender_code", {"code": "print('up')"})
            assert not r.is_error and "up" in text(r), text(r)

            # Blender dies while a request runs: the call fails saying so, and nothing hangs.
            async with anyio.create_task_group() as tg:
                result = {}

                async def slow() -> None:
                    result["r"] = await client.call_tool(
                        "execute_blender_code", {"code": "import time\ntime.sleep(30)"}
                    )

                tg.start_soon(slow)
                await anyio.sleep(1.0)
                os.kill(blender.pid, signal.SIGKILL)
            r = result["r"]
            assert r.is_error and ("lost" in text(r) or "closed" in text(r)), text(r)

            # Back again on the same port: the next call reconnects.
            await anyio.to_thread.run_sync(lambda: start_blender(port=port))
            r = await client.call_tool("execute_blender_code", {"code": "print('back')"})
            assert not r.is_error and "back" in text(r), text(r)

    asyncio.run(main())


def raw_post(url: str, headers: dict[str, str]) -> tuple[int, str]:
    body = json.dumps(RAW_INITIALIZE).encode()
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            **headers,
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_http_refuses_bad_origin_and_bad_host(http_server):
    server = http_server()
    status, body = raw_post(server.url, {"Origin": "http://evil.example.com"})
    assert status == 403 and "Origin" in body, (status, body)
    status, body = raw_post(server.url, {"Host": "evil.example.com"})
    assert status == 403 and "Host" in body, (status, body)
    # Loopback origins and no Origin at all (non-browser clients) are served.
    status, _ = raw_post(server.url, {"Origin": f"http://localhost:{server.port}"})
    assert status == 200
    status, _ = raw_post(server.url, {})
    assert status == 200


def test_http_bearer_token(http_server):
    server = http_server("--http-token", "s3cret")
    status, body = raw_post(server.url, {})
    assert status == 401, (status, body)
    status, _ = raw_post(server.url, {"Authorization": "Bearer wrong"})
    assert status == 401
    status, _ = raw_post(server.url, {"Authorization": "Bearer s3cret"})
    assert status == 200

    async def main() -> None:
        http = create_mcp_http_client(headers={"Authorization": "Bearer s3cret"})
        async with (
            http,
            Client(streamable_http_client(server.url, http_client=http), mode="legacy") as client,
        ):
            r = await client.call_tool("get_scene_info", {})
            assert not r.is_error, text(r)

    asyncio.run(main())


def test_http_refuses_public_bind_without_token(served):
    proc = subprocess.run(
        [bld_remote(), "mcp", "--port", str(served.port), "--http", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert re.search(r"without a token", proc.stderr), proc.stderr


def test_sigterm_stops_the_http_server(http_server):
    server = http_server()
    assert server.stop() == 0


# --- the HTTP server's bounds: header-read timeout, idle keep-alive timeout, connection cap ---------------


def closed_after(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closes `sock` (EOF or reset), reading and discarding; None if still open at
    `limit`."""
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < limit:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return None


def test_http_half_sent_headers_are_closed_within_the_header_timeout(http_server):
    server = http_server("--http-header-timeout", "1", "--http-idle-timeout", "30")
    silent = socket.create_connection(("127.0.0.1", server.port))
    half = socket.create_connection(("127.0.0.1", server.port))
    half.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
    drip = socket.create_connection(("127.0.0.1", server.port))
    started = time.monotonic()
    results: dict[str, float | None] = {}

    def dripper() -> None:
        # A slowloris: a byte of headers every 0.2 s. The timeout counts from the first byte, so it is cut too.
        for b in b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n":
            try:
                drip.sendall(bytes([b]))
            except OSError:
                return
            time.sleep(0.2)

    t = threading.Thread(target=dripper, daemon=True)
    t.start()
    for name, s in (("silent", silent), ("half", half), ("drip", drip)):
        left = 5 - (time.monotonic() - started)
        took = closed_after(s, left)
        results[name] = None if took is None else time.monotonic() - started
        s.close()
    t.join(10)
    for name, took in results.items():
        assert took is not None and 0.9 <= took <= 2.5, (name, took, results)
    # The server still serves a whole request at once.
    status, _ = raw_post(server.url, {})
    assert status == 200


def test_http_idle_keep_alive_connection_is_closed_after_the_idle_timeout(http_server):
    server = http_server("--http-header-timeout", "1", "--http-idle-timeout", "3")
    s = socket.create_connection(("127.0.0.1", server.port))
    # One complete request on a keep-alive connection, answered (404: not the endpoint).
    s.sendall(b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    s.settimeout(10)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 404"), head
    answered = time.monotonic()
    # Idle from here: not cut by the 1 s header timeout, cut at the 3 s idle timeout.
    took = closed_after(s, 8)
    s.close()
    assert took is not None and 2.8 <= took <= 4.5, took
    assert time.monotonic() - answered >= 2.8


def test_http_connections_beyond_the_cap_get_503_and_a_real_client_still_works(http_server):
    server = http_server("--http-max-connections", "3", "--http-header-timeout", "30")
    holders = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    try:
        # Wait until all three are counted (the accept loop runs asynchronously), by probing until a 503.
        deadline = time.monotonic() + 10
        refused = b""
        while time.monotonic() < deadline:
            extra = socket.create_connection(("127.0.0.1", server.port))
            extra.settimeout(5)
            extra.sendall(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            refused = b""
            try:
                while chunk := extra.recv(4096):
                    refused += chunk
            except (TimeoutError, ConnectionResetError):
                pass
            extra.close()
            if refused.startswith(b"HTTP/1.1 503"):
                break
        assert refused.startswith(b"HTTP/1.1 503") and b"too many connections (limit 3)" in refused, refused
    finally:
        for h in holders:
            h.close()

    # The slots come back: a real MCP client is served (retrying while the holders' tasks wind down).
    async def main() -> None:
        async with Client(streamable_http_client(server.url), mode="legacy") as client:
            r = await client.call_tool("get_scene_info", {})
            assert not r.is_error, text(r)

    deadline = time.monotonic() + 10
    while True:
        try:
            asyncio.run(main())
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_http_long_tool_call_is_not_cut_by_the_timeouts(http_server):
    server = http_server("--http-header-timeout", "1", "--http-idle-timeout", "1")

    async def main() -> None:
        async with Client(streamable_http_client(server.url), mode="legacy") as client:
            r = await client.call_tool(
                "execute_blender_code", {"code": "import time; time.sleep(2.5); print('slept')"}
            )
            assert not r.is_error and "slept" in text(r), text(r)

    asyncio.run(main())
