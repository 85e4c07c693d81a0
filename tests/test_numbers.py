"""Extreme numbers at every place a timeout enters (issue 14, "a number can panic a network thread"): the wire
`"timeout"`, `bld_remote.Client(timeout=)`, `step(timeout=, budget=)` inside Blender, and the CLI's
`--timeout`, `--ready-timeout`, `--wait` and `mcp --timeout`. Each gets a clear error, never a panic, and
the connection or process that received it keeps working."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Conn, cli_env, ok

# Huge, tiny, negative, zero, 2^64, past a Duration's range, and not numbers at all.
EXTREME_JSON = ["1e20", "18446744073709551616", "1e308", "-1", "0", "-0.0", "2592001", '"5"', "true", "[1]"]
EXTREME_PY = ["1e20", "2**64", "1e308", "-1", "0", "float('nan')", "float('inf')", "-float('inf')"]


def test_extreme_request_timeouts_are_error_replies_and_the_connection_goes_on(served):
    frames = [f'{{"id": {i}, "type": "ping", "timeout": {t}}}' for i, t in enumerate(EXTREME_JSON)]
    last = len(frames)
    with Conn(served.port) as c:
        # All pipelined in one write, then a good request: every one is answered, in one connection.
        c.send(("".join(frames) + json.dumps({"id": last, "type": "ping", "timeout": 30})).encode())
        replies = {r["id"]: r for r in (c.reply() for _ in range(last + 1))}
        assert ok(replies.pop(last))["pong"] is True
        for i, t in enumerate(EXTREME_JSON):
            r = replies[i]
            assert r["status"] == "error" and "'timeout'" in r["message"], (t, r)
        # The connection still serves main-thread work with a deadline.
        assert ok(c.request({"type": "get_scene_info", "timeout": 2592000}))["object_count"] >= 0


@pytest.mark.parametrize("bad", EXTREME_PY)
def test_client_timeout_extremes_are_value_errors(installed, bad):
    r = subprocess.run(
        [
            str(installed / "python"),
            "-P",
            "-c",
            f"import bld_remote; bld_remote.Client(port=1, timeout={bad})",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "ValueError: timeout must be a positive number" in r.stderr, r.stderr
    assert "panic" not in r.stderr.lower()


def test_step_timeout_and_budget_extremes_are_value_errors_inside_blender(served):
    code = (
        "import bld_remote\n"
        "from bld_remote import _core\n"
        "out = []\n"
        f"for bad in [{', '.join(EXTREME_PY)}]:\n"
        "    try:\n"
        "        _core.step(1, bad)\n"
        "        out.append('accepted' if bad != 0 else 'zero ok')\n"
        "    except ValueError as e:\n"
        "        out.append('ValueError' if 'timeout' in str(e) else str(e))\n"
        # A good number passes the range check; then the nested pump is refused (issue 14, part 4).
        "    except RuntimeError as e:\n"
        "        out.append(('zero ok' if bad == 0 else 'accepted') if 'inside a request' in str(e) else str(e))\n"
        "    try:\n"
        "        _core.step(1, 0.0, bad)\n"
        "        out.append('accepted')\n"
        "    except ValueError as e:\n"
        "        out.append('ValueError' if 'budget' in str(e) else str(e))\n"
        "    except RuntimeError as e:\n"
        "        out.append('accepted' if 'inside a request' in str(e) else str(e))\n"
        "result = out\n"
    )
    with Conn(served.port) as c:
        got = ok(c.request("execute_code", code=code))["value"]
        pairs = list(zip(got[::2], got[1::2], strict=True))
        for bad, (as_timeout, as_budget) in zip(EXTREME_PY, pairs, strict=True):
            assert as_timeout == ("zero ok" if bad == "0" else "ValueError"), (bad, as_timeout)
            assert as_budget == "ValueError", (bad, as_budget)
        # Blender and the service are still fine.
        assert ok(c.request("ping"))["pong"] is True


@pytest.mark.parametrize(
    "args",
    [
        ["exec", "--port", "1", "--timeout", "1e20", "-c", "pass"],
        ["exec", "--port", "1", "--timeout", "nan", "-c", "pass"],
        ["exec", "--port", "1", "--timeout=-inf", "-c", "pass"],
        ["start", "--background", "--ready-timeout", "1e20"],
        ["start", "--background", "--ready-timeout", "0"],
        ["shutdown", "--port", "1", "--wait", "1e20"],
        ["shutdown", "--port", "1", "--wait=-1"],
        ["mcp", "--port", "1", "--timeout", "1e20"],
        ["mcp", "--port", "1", "--timeout", "inf"],
    ],
)
def test_cli_number_extremes_are_usage_errors(installed, runtime_dir, args):
    r = subprocess.run(
        [str(installed / "bld-remote"), *args],
        env=cli_env(runtime_dir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "seconds" in r.stderr and "panick" not in r.stderr, r.stderr


# --- every numeric field of every command and API, from one table (issue 14: "every number checked where it
# enters"). Add a row when a field is added; each surface runs all its rows against one process.


def whole(lo: int, hi: int, optional: bool = True):
    """Accepts whole numbers (an integral float such as 8.0 counts, a bool does not) from lo to hi."""

    def accepts(v) -> bool:
        if v is None:
            return optional
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
            return False
        return lo <= v <= hi

    return accepts


def whole_int(lo: int, hi: int, optional: bool = True):
    """Like `whole`, but only a Python int (Python APIs: a float is a TypeError)."""

    def accepts(v) -> bool:
        if v is None:
            return optional
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    return accepts


def seconds(lo_exclusive: float, hi: float, zero: bool = False, optional: bool = True):
    def accepts(v) -> bool:
        if v is None:
            return optional
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if zero and v == 0:
            return True
        return math.isfinite(v) and lo_exclusive < v <= hi

    return accepts


def any_id(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or isinstance(v, str)


# Extreme values, as Python values (JSON surfaces send the ones JSON can carry).
EXTREMES = [
    0,
    -0.0,
    1,
    8.0,
    0.5,
    -1,
    -(2**63) - 1,
    2**31,
    2**32,
    2**64 - 1,
    2**64,
    2**200,
    1e-300,
    1e20,
    1e308,
    float("nan"),
    float("inf"),
    -float("inf"),
    "5",
    "",
    True,
    False,
    None,
    [1],
    {"a": 1},
]
JSON_EXTREMES = [v for v in EXTREMES if not (isinstance(v, float) and not math.isfinite(v))]

# (command, field, what the service accepts, a word its error message has for a refused value). Accepted
# values meet a later, harmless refusal (no camera, no UI): nothing is rendered or captured.
WIRE_FIELDS = [
    ("ping", "timeout", seconds(0, 2_592_000), "'timeout'"),
    ("render_image", "width", whole(1, 8192), "width must be an integer from 1 to 8192"),
    ("render_image", "height", whole(1, 8192), "height must be an integer from 1 to 8192"),
    ("render_image", "samples", whole(1, 65536), "samples must be an integer from 1 to 65536"),
    ("get_viewport_screenshot", "max_size", whole(1, 16384), "max_size must be an integer from 1 to 16384"),
    ("cancel", "id", any_id, "cancel needs 'id'"),
]


def wire_request(i: int, command: str, field: str, value) -> dict:
    # String ids: a `cancel` case's numeric id never names another request of the batch.
    req: dict = {"id": f"n{i}", "type": command}
    if field == "timeout":
        if value is not None:
            req["timeout"] = value
    else:
        req["params"] = {field: value} if value is not None else {}
        if command == "cancel" and value is None:
            req["params"] = {"id": None}
    return req


def test_every_wire_number_is_checked_pipelined_and_the_connection_goes_on(served):
    cases = [(f, v) for f in WIRE_FIELDS for v in JSON_EXTREMES]
    with Conn(served.port) as c:
        # Accepted sizes must not render: take the camera away for this test.
        ok(c.request("execute_code", code="import bpy\nbpy.context.scene.camera = None\n"))
        try:
            replies = {}
            # Pipelined 16 at a time: within any per-connection cap on queued jobs.
            for start in range(0, len(cases), 16):
                chunk = list(enumerate(cases))[start : start + 16]
                c.send(b"".join(json.dumps(wire_request(i, f[0], f[1], v)).encode() for i, (f, v) in chunk))
                replies.update((r["id"], r) for r in (c.reply() for _ in chunk))
            bad = []
            for i, ((command, field, accepts, refusal), v) in enumerate(cases):
                r = replies[f"n{i}"]
                refused = r["status"] == "error" and refusal in r["message"]
                if refused == accepts(v):
                    bad.append((command, field, v, r))
            assert not bad, bad
            # Still serving, main thread and network thread alike.
            assert ok(c.request("ping"))["pong"] is True
            assert ok(c.request("get_scene_info"))["object_count"] >= 0
        finally:
            c.request(
                "execute_code", code="import bpy\nbpy.context.scene.camera = bpy.data.objects.get('Camera')\n"
            )


# (call, argument, what it accepts). Run in one Blender, outside any job, with no service running, so that
# an accepted step() returns at once; an accepted start() starts a service on port 0 that is stopped again.
PY_FIELDS = [
    ("step", "max_jobs", whole_int(0, 2**32 - 1, optional=False)),
    ("step", "timeout", seconds(0, 2_592_000, zero=True, optional=False)),
    ("step", "budget", seconds(0, 2_592_000)),
    ("start", "port", whole_int(0, 65535)),
    ("start", "max_request_bytes", whole_int(1024, 2**40)),
    ("start", "max_connections", whole_int(1, 65536)),
    ("start", "queue_capacity", whole_int(1, 2**20)),
    ("start", "max_depth", whole_int(1, 10_000)),
    ("start", "persist_max_value_bytes", whole_int(1, 2**40)),
    ("start", "persist_max_total_bytes", whole_int(1, 2**40)),
    ("start", "persist_max_keys", whole_int(1, 2**32)),
    ("start", "idle_timeout", seconds(0.000999, 86_400, zero=True)),
    ("start", "default_timeout", seconds(0.000999, 86_400, zero=True)),
    ("start", "request_read_timeout", seconds(0.000999, 86_400, zero=True)),
    ("Client", "port", whole_int(0, 65535)),
    ("Client", "timeout", seconds(0, 2_592_000)),
]

PY_RUNNER = r"""
import json
import bld_remote
from bld_remote import _core
cases = json.loads(CASES)
extremes = EXTREMES
out = []
for call, arg, index in cases:
    v = extremes[index]
    try:
        if call == "step":
            kw = {"max_jobs": 1, "timeout": 0.0}
            kw[arg] = v
            _core.step(**kw)
        elif call == "start":
            kw = {"port": 0}
            kw[arg] = v
            try:
                _core.start(lambda c, p: (True, None), [], "background", **kw)
            except (OSError, RuntimeError):
                pass  # accepted, then the port was unusable or taken
            _core.stop()
        else:
            kw = {"port": 1, "timeout": 5.0}
            kw[arg] = v
            try:
                bld_remote.Client(**kw)
            except ConnectionError:
                pass  # accepted: port=None looks for the running instances, and there may be none or several
        out.append("ok")
    except BaseException as e:
        out.append(f"{type(e).__name__}: {e}")
print("RESULTS=" + json.dumps(out), flush=True)
"""


def test_every_python_api_number_is_checked_in_blender(start_blender):
    cases = [(call, arg, i) for call, arg, _ in PY_FIELDS for i in range(len(EXTREMES))]
    extremes_src = (
        "["
        + ", ".join(
            f"float('{v}')" if isinstance(v, float) and not math.isfinite(v) else repr(v) for v in EXTREMES
        )
        + "]"
    )
    b = start_blender(f"CASES = {json.dumps(cases)!r}\nEXTREMES = {extremes_src}\n{PY_RUNNER}", wait=False)
    assert b.wait_exit(120) == 0, b.output
    line = next((x for x in b.output.splitlines() if x.startswith("RESULTS=")), None)
    assert line is not None, b.output
    results = json.loads(line[len("RESULTS=") :])
    accepts = {(call, arg): a for call, arg, a in PY_FIELDS}
    bad = []
    for (call, arg, i), got in zip(cases, results, strict=True):
        v = EXTREMES[i]
        if accepts[(call, arg)](v):
            if got != "ok":
                bad.append((call, arg, v, "refused", got))
        elif not (got.startswith(("ValueError", "TypeError")) and arg in got):
            bad.append((call, arg, v, "not refused by name", got))
        elif got.startswith("ValueError") and not re.search(r"\d", got.split(arg, 1)[1]):
            bad.append((call, arg, v, "no range in the message", got))
    assert not bad, "\n".join(map(repr, bad))
    assert "panick" not in b.output.lower()


# (subcommand and fixed arguments, flag, accepts). Accepted values fail later for another reason (no
# service on port 1, no such Blender), never with the usage status 2.
CLI_VALUES = ["1e20", "-1", "0", "0.5", "1", "65536", "18446744073709551616", "nan", "inf", "-inf", "abc", ""]
CLI_FIELDS = [
    (["exec", "-c", "pass"], "--port", whole(0, 65535, optional=False)),
    (["exec", "--port", "1", "-c", "pass"], "--timeout", seconds(0, 2_592_000, optional=False)),
    (["status", "--port", "1"], "--timeout", seconds(0, 2_592_000, optional=False)),
    (["shutdown", "--port", "1"], "--wait", seconds(0, 2_592_000, zero=True, optional=False)),
    (
        ["start", "--background", "--blender", "/nonexistent"],
        "--ready-timeout",
        seconds(0, 2_592_000, optional=False),
    ),
    (["start", "--background", "--blender", "/nonexistent"], "--port", whole(0, 65535, optional=False)),
    (["mcp", "--port", "1"], "--timeout", seconds(0, 2_592_000, optional=False)),
    (["mcp"], "--port", whole(0, 65535, optional=False)),
    (["mcp", "--port", "1"], "--max-image-bytes", whole(1024, 2**30, optional=False)),
    (["mcp", "--port", "1"], "--http-header-timeout", whole(1, 3600, optional=False)),
    (["mcp", "--port", "1"], "--http-idle-timeout", whole(1, 86_400, optional=False)),
    (["mcp", "--port", "1"], "--http-max-connections", whole(1, 65536, optional=False)),
]


def cli_value(raw: str):
    """What a flag's text means as a number (None when it is none)."""
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        f = float(raw)
    except ValueError:
        return "not a number"
    # Integral-looking floats stay floats: a whole-number flag refuses "1e20" as text, as clap does.
    return f


def test_every_cli_number_is_a_usage_error_when_out_of_range(installed, runtime_dir):
    bad = []
    procs = []
    for base, flag, accepts in CLI_FIELDS:
        for raw in CLI_VALUES:
            argv = [str(installed / "bld-remote"), *base, f"{flag}={raw}"]
            p = subprocess.Popen(
                argv,
                env=cli_env(runtime_dir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append((base, flag, raw, accepts, p))
    for base, flag, raw, accepts, p in procs:
        try:
            _, stderr = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
        v = cli_value(raw)
        # clap's whole-number flags take only integer text; the seconds flags take any float text.
        if accepts.__qualname__.startswith("whole") and not isinstance(v, int):
            want_usage = True
        else:
            want_usage = not accepts(v) if v != "not a number" else True
        if (p.returncode == 2) != want_usage:
            bad.append((base, flag, raw, p.returncode, stderr[-300:]))
        elif want_usage and (flag not in stderr or "panick" in stderr):
            bad.append((base, flag, raw, "message does not name the flag", stderr[-300:]))
    assert not bad, "\n".join(map(repr, bad))


# MCP tool arguments: (tool, argument, accepts).
MCP_FIELDS = [
    ("render_image", "width", whole(1, 8192)),
    ("render_image", "height", whole(1, 8192)),
    ("render_image", "samples", whole(1, 65536)),
    ("get_viewport_screenshot", "max_size", whole(1, 16384)),
]


def test_every_mcp_tool_number_is_checked(served):
    mcp = pytest.importorskip("mcp")
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    exe = Path(sys.executable).with_name("bld-remote")
    params = StdioServerParameters(command=str(exe), args=["mcp", "--port", str(served.port)])
    bad = []

    async def main() -> None:
        async with Client(params, mode="legacy") as client:
            await client.call_tool("execute_blender_code", {"code": "bpy.context.scene.camera = None"})
            try:
                for tool, arg, accepts in MCP_FIELDS:
                    for v in JSON_EXTREMES:
                        try:
                            r = await client.call_tool(tool, {arg: v})
                            message = " ".join(getattr(c, "text", "") for c in r.content)
                            refused = r.is_error and f"{arg} must be a whole number" in message
                        except mcp.McpError as e:
                            message = str(e)
                            refused = f"{arg} must be a whole number" in message
                        if refused == accepts(v):
                            bad.append((tool, arg, v, message[:200]))
                r = await client.call_tool("get_scene_info", {})
                assert not r.is_error
            finally:
                await client.call_tool(
                    "execute_blender_code",
                    {"code": "bpy.context.scene.camera = bpy.data.objects.get('Camera')"},
                )

    asyncio.run(main())
    assert not bad, "\n".join(map(repr, bad))
