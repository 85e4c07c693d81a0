"""Read-only tokens (issue 16, section 6), against a real headless Blender 3.4.1 over real sockets.

One Blender serves with a full token and ``read_token=auto``: the read token (from its owner-only
descriptor) reads through both auth paths (a plain ``token`` field and the HMAC handshake of
``bld_remote.Client``), and every write is refused on the network thread with "forbidden: read-only
token", nothing run (a refused ``execute_code`` that would create a file leaves no file), the connection
kept. The full token still does everything. Every Blender is started by the shared fixtures and killed by
PID."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import Conn, cli_env, err, ok

FORBIDDEN = "forbidden: read-only token ("


@pytest.fixture
def both(start_blender, runtime_dir):
    b = start_blender(
        env={
            "BLD_REMOTE_RUNTIME_DIR": str(runtime_dir),
            "BLD_REMOTE_TOKEN": "full-token-for-tests",
            "BLD_REMOTE_READ_TOKEN": "auto",
        }
    )
    [path] = [p for p in runtime_dir.glob("bld_remote-*.json") if f"-{b.pid}-" in p.name]
    d = json.loads(path.read_text())
    return b, path, d


def test_auto_read_token_is_kept_in_the_owner_only_descriptor(both):
    _, path, d = both
    assert d["auth"] is True and d["token"] == "full-token-for-tests"
    assert isinstance(d["read_token"], str) and len(d["read_token"]) >= 32
    assert d["read_token"] != d["token"]
    assert path.stat().st_mode & 0o777 == 0o600


def test_plain_read_token_reads_and_every_write_is_refused_with_nothing_run(both, tmp_path):
    b, _, d = both
    read = d["read_token"]
    c = Conn(b.port)
    status = ok(c.request({"type": "get_status", "params": {}, "token": read}))
    assert status["role"] == "read" and status["read_token_set"] is True
    assert ok(c.request({"type": "ping", "params": {}, "token": read}))["pong"] is True
    scene = ok(c.request({"type": "get_scene_info", "params": {}, "token": read}))
    assert scene["object_count"] >= 1
    marker = tmp_path / "written"
    writes = [
        ("execute_code", {"code": f"open({str(marker)!r}, 'w').write('x')"}),
        ("submit_code_job", {"code": f"open({str(marker)!r}, 'w').write('x')"}),
        ("put_persist_data", {"key": "k", "data": 1}),
        ("remove_persist_data", {"key": "k"}),
        ("cancel_job", {"job_id": "bld-job-1"}),
        ("export_scene", {"format": "glb"}),
        ("server_shutdown", {}),
        ("no_such_command", {}),
        ("render_image", {"filepath": str(marker)}),
    ]
    for command, params in writes:
        reply = c.request({"type": command, "params": params, "token": read})
        message = err(reply)
        assert message.startswith(FORBIDDEN) and command in message, (command, reply)
        assert reply.get("ran") is False, reply
    # The legacy form runs code: refused too.
    c.send({"code": f"open({str(marker)!r}, 'w').write('x')", "token": read})
    assert FORBIDDEN in c.reply().get("message", "")
    # The connection is kept, and nothing ran: no file, the service still up, no persisted key.
    assert ok(c.request({"type": "ping", "params": {}, "token": read}))["pong"] is True
    assert not marker.exists()
    got = ok(c.request({"type": "get_persist_data", "params": {"key": "k"}, "token": read}))
    assert got["found"] is False
    # The full token does everything, also on a read connection (that request only).
    done = ok(c.request({"type": "execute_code", "params": {"code": "print(1)"}, "token": d["token"]}))
    assert done["executed"] is True
    # No token, or a wrong one: refused (auth, not forbidden).
    assert "authentication required" in err(c.request("ping"))
    assert "wrong token" in err(c.request({"type": "ping", "params": {}, "token": "nope"}))


CLIENT = """
import json
from bld_remote import Client, RemoteError
c = Client(port={port}, token={read!r})
out = {{"role": c.call("get_status")["role"], "cube": c.call("get_object_info", name="Cube")["name"]}}
try:
    c.execute("open({marker!r}, 'w').write('x')")
    out["error"] = None
except RemoteError as e:
    out["error"] = str(e)
out["after"] = c.call("ping")["pong"]
out["full_role"] = Client(port={port}, token={full!r}).call("get_status")["role"]
print(json.dumps(out))
"""


def test_client_handshake_with_the_read_token(both, installed: Path, runtime_dir, tmp_path):
    b, _, d = both
    marker = tmp_path / "written"
    code = CLIENT.format(port=b.port, read=d["read_token"], full=d["token"], marker=str(marker))
    r = subprocess.run(
        [str(installed / "python"), "-P", "-c", code],
        env=cli_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["role"] == "read" and out["cube"] == "Cube" and out["after"] is True, out
    assert out["error"] and "forbidden: read-only token" in out["error"], out
    assert out["full_role"] == "full"
    assert not marker.exists()


def test_cli_exec_with_the_read_token_fails_clearly(both, installed: Path, runtime_dir, tmp_path):
    b, _, d = both
    marker = tmp_path / "written"
    env = cli_env(runtime_dir, BLD_REMOTE_TOKEN=d["read_token"])
    code = f"open({str(marker)!r}, 'w').write('x')"
    r = subprocess.run(
        [str(installed / "bld-remote"), "exec", "--port", str(b.port), "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode not in (0, 5), (r.returncode, r.stderr)
    assert FORBIDDEN in r.stderr, r.stderr
    assert not marker.exists()
    r = subprocess.run(
        [str(installed / "bld-remote"), "status", "--port", str(b.port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def test_read_token_equal_to_token_is_a_usage_error(installed: Path, runtime_dir):
    r = subprocess.run(
        [str(installed / "bld-remote"), "start", "--background", "--token", "same", "--read-token", "same"],
        env=cli_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "read_token" in r.stderr and "differ" in r.stderr


def test_mcp_with_the_read_token_lists_only_read_tools(both, installed: Path, runtime_dir, tmp_path):
    mcp = pytest.importorskip("mcp")
    import asyncio

    from mcp.client.stdio import StdioServerParameters

    b, _, d = both
    marker = tmp_path / "written"
    env = cli_env(runtime_dir, BLD_REMOTE_TOKEN=d["read_token"])
    params = StdioServerParameters(
        command=str(installed / "bld-remote"), args=["mcp", "--port", str(b.port), "--timeout", "20"], env=env
    )

    async def main():
        async with mcp.Client(params, mode="legacy") as client:
            listed = await client.list_tools()
            tools = {t.name: t for t in listed.tools}
            r = await client.call_tool(
                "execute_blender_code", {"code": f"open({str(marker)!r}, 'w').write('x')"}
            )
            text = "\n".join(c.text for c in r.content if getattr(c, "type", None) == "text")
            return tools, bool(r.is_error), text

    tools, failed, text = asyncio.run(main())
    assert "get_scene_info" in tools and "render_image" in tools, sorted(tools)
    for hidden in ("execute_blender_code", "put_persist_data", "remove_persist_data"):
        assert hidden not in tools, sorted(tools)
    assert all(t.annotations and t.annotations.read_only_hint is True for t in tools.values())
    assert failed and FORBIDDEN in text, text
    assert not marker.exists()


def test_mcp_read_only_flag_uses_the_read_token_and_refuses_writes_itself(
    both, installed: Path, runtime_dir, tmp_path
):
    """`bld-remote mcp --read-only` with no token of its own: the descriptor's read token (role "read" at the
    service), only read-only tools listed, and a write tool called anyway refused by the MCP server, nothing
    run. With the full token given explicitly it still lists and calls only the read-only tools."""
    mcp = pytest.importorskip("mcp")
    import asyncio

    from mcp.client.stdio import StdioServerParameters

    b, _, d = both
    marker = tmp_path / "written"

    async def session(env: dict[str, str], *extra: str):
        params = StdioServerParameters(
            command=str(installed / "bld-remote"),
            args=["mcp", "--port", str(b.port), "--timeout", "20", "--read-only", *extra],
            env=env,
        )
        async with mcp.Client(params, mode="legacy") as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            status = await client.call_tool("check_connection_status", {})
            scene = await client.call_tool("get_scene_info", {})
            r = await client.call_tool(
                "execute_blender_code", {"code": f"open({str(marker)!r}, 'w').write('x')"}
            )
            text = "\n".join(c.text for c in r.content if getattr(c, "type", None) == "text")
            return tools, status.structured_content, scene.is_error, bool(r.is_error), text

    for env, extra, role in [
        (cli_env(runtime_dir), (), "read"),
        (cli_env(runtime_dir), ("--token", d["token"]), "full"),
    ]:
        tools, status, scene_failed, failed, text = asyncio.run(session(env, *extra))
        assert status["connected"] is True and status["role"] == role, status
        assert "get_scene_info" in tools and "execute_blender_code" not in tools, sorted(tools)
        assert "put_persist_data" not in tools, sorted(tools)
        assert not scene_failed
        assert failed and "--read-only" in text and "forbidden" in text, text
        assert not marker.exists()
