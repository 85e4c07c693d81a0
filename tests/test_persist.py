"""The persist store's bounds (issue 14, "persist data"), against a real headless Blender started with small
limits: one value's size, the total bytes, the number of keys and a key's length each get a clear error
naming the limit; nothing is stored by a refused put; the connection keeps serving and the service stays
healthy. Also: values round-trip unchanged, a replaced value counts only once, and removing frees room."""

from __future__ import annotations

import json

import pytest
from helpers import BlenderProcess, Conn, blender_env, err, ok, runtime_argv

VALUE_LIMIT = 1000
TOTAL_LIMIT = 4000
KEY_LIMIT = 5

SMALL = (
    "import bld_remote\n"
    f"bld_remote.start_mcp_service(port=0, persist_max_value_bytes={VALUE_LIMIT},\n"
    f"    persist_max_total_bytes={TOTAL_LIMIT}, persist_max_keys={KEY_LIMIT})\n"
    "bld_remote.keep_alive()\n"
)


@pytest.fixture(scope="module")
def small(user_scripts):
    b = BlenderProcess(runtime_argv(SMALL), blender_env(user_scripts))
    try:
        b.wait_ready()
        yield b
    finally:
        b.kill()


def healthy(c: Conn) -> None:
    assert ok(c.request("ping"))["pong"] is True
    assert ok(c.request("get_scene_info"))["object_count"] >= 0


def text_of(n: int) -> str:
    """A string whose JSON encoding is exactly n bytes."""
    return "x" * (n - 2)


def test_limits_are_reported_by_get_status(small):
    with Conn(small.port) as c:
        limits = ok(c.request("get_status"))["limits"]
        assert limits["persist_max_value_bytes"] == VALUE_LIMIT
        assert limits["persist_max_total_bytes"] == TOTAL_LIMIT
        assert limits["persist_max_keys"] == KEY_LIMIT


def test_each_limit_is_a_clear_error_and_the_service_stays_healthy(small):
    with Conn(small.port) as c:
        for k in ("a", "b", "c", "d", "e", "f", "big", "k" * 1025):
            c.request("remove_persist_data", key=k)
        # One value: exactly at the limit is stored, one byte more is refused and not stored.
        ok(c.request("put_persist_data", key="a", data=text_of(VALUE_LIMIT)))
        r = c.request("put_persist_data", key="big", data=text_of(VALUE_LIMIT + 1))
        assert "persist value too large" in err(r) and str(VALUE_LIMIT) in r["message"], r
        assert ok(c.request("get_persist_data", key="big"))["found"] is False
        # A key's length.
        r = c.request("put_persist_data", key="k" * 1025, data=1)
        assert "persist key too long" in err(r) and "1024" in r["message"], r
        # Total bytes: a, b, c at ~1000 each fill most of 4000; a fourth big one does not fit.
        for k in ("b", "c"):
            ok(c.request("put_persist_data", key=k, data=text_of(VALUE_LIMIT)))
        r = c.request("put_persist_data", key="d", data=text_of(VALUE_LIMIT))
        assert "persist store full" in err(r) and "persist_max_total_bytes" in r["message"], r
        assert ok(c.request("get_persist_data", key="d"))["found"] is False
        # Replacing a key counts its old value out first: this fits.
        ok(c.request("put_persist_data", key="c", data=text_of(VALUE_LIMIT - 10)))
        # The number of keys: small values up to the key limit, then one more is refused.
        ok(c.request("put_persist_data", key="d", data=1))
        ok(c.request("put_persist_data", key="e", data=2))
        r = c.request("put_persist_data", key="f", data=3)
        assert "persist_max_keys" in err(r) and str(KEY_LIMIT) in r["message"], r
        status = ok(c.request("get_status"))["persist"]
        assert status["keys"] == KEY_LIMIT and status["bytes"] <= TOTAL_LIMIT, status
        # Removing frees room: the refused key now fits.
        assert ok(c.request("remove_persist_data", key="e"))["removed"] is True
        ok(c.request("put_persist_data", key="f", data=3))
        healthy(c)
    # And a fresh connection is served too.
    with Conn(small.port) as c:
        healthy(c)
        assert ok(c.request("get_persist_data", key="f"))["data"] == 3


def test_values_round_trip_exactly_and_pipelined(small):
    values = [
        None,
        True,
        0,
        -(2**63),
        2**64 - 1,
        1.5e300,
        'é😀\n"\\',
        [1, [2, {"x": None}]],
        {"nested": {"list": [1.25, "s"]}},
    ]
    with Conn(small.port) as c:
        for k in ("a", "b", "c", "d", "e", "f"):
            c.request("remove_persist_data", key=k)
        frames = []
        for i, v in enumerate(values):
            frames.append({"id": f"p{i}", "type": "put_persist_data", "params": {"key": "a", "data": v}})
            frames.append({"id": f"g{i}", "type": "get_persist_data", "params": {"key": "a"}})
        c.send("".join(json.dumps(f) for f in frames).encode())
        replies = {r["id"]: r for r in (c.reply() for _ in frames)}
        for i, v in enumerate(values):
            ok(replies[f"p{i}"])
            got = ok(replies[f"g{i}"])
            assert got == {"data": v, "found": True}, (v, got)
        # A missing key gives the default back.
        c.request("remove_persist_data", key="a")
        assert ok(c.request("get_persist_data", key="a", default={"d": 1})) == {
            "data": {"d": 1},
            "found": False,
        }
        # Bad keys are errors, the connection goes on.
        assert "'key' must be a string" in err(c.request("get_persist_data", key=5))
        assert "missing parameter 'key'" in err(c.request("put_persist_data", data=1))
        healthy(c)


def test_bad_limit_settings_are_refused(start_blender):
    cases = [("persist_max_value_bytes", 0), ("persist_max_total_bytes", -1), ("persist_max_keys", 2**64)]
    code = "import bld_remote\n"
    for kwarg, value in cases:
        code += (
            "try:\n"
            f"    bld_remote.start_mcp_service(port=0, {kwarg}={value})\n"
            "    print('STARTED', flush=True)\n"
            "except (ValueError, TypeError, OverflowError) as e:\n"
            "    print('REFUSED', type(e).__name__, e, flush=True)\n"
        )
    b = start_blender(code, wait=False)
    assert b.wait_exit(60) == 0
    refused = [line for line in b.output.splitlines() if line.startswith("REFUSED")]
    assert "STARTED" not in b.output and len(refused) == len(cases), b.output
    for (kwarg, _), line in zip(cases, refused, strict=True):
        assert kwarg in line, line
