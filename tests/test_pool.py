"""The local pool against real headless Blender 3.4.1: `bld-remote start --background --instances N` (ready
lines, own ports/descriptors/tokens, SIGTERM cleanup, restart on the same port), `bld_remote.Pool` (owned and
attached; ordered results spread over instances, return_exceptions, a Blender killed with SIGKILL mid-map:
OutcomeUnknown and never a replay unless retries > 0, bad input) and `bld-remote map` (piped output).

Pool code runs in the installed wheels' Python (a fresh venv: the source tree is never imported). Every process
a test starts carries a marker in its environment (Blender inherits it through the supervisor), and the
`marked` fixture kills each marked PID at the end, even when the test fails."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers import (
    SERVE,
    BlenderProcess,
    blender_env,
    children_of,
    cli_env,
    free_port,
    pid_alive,
    port_is_free,
    runtime_argv,
)

MARK = "POOL_TEST_MARK"
POOL_READY = re.compile(
    r"^bld_remote listening on 127\.0\.0\.1:(?P<port>\d+) \(pid (?P<pid>\d+)\) instance=(?P<k>\d+)/(?P<n>\d+) "
    r"restarts=(?P<r>\d+)$"
)


def marked_pids(mark: str) -> list[int]:
    needle = f"{MARK}={mark}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


@pytest.fixture
def marked(runtime_dir):
    """An environment for the pool's processes (isolated runtime dir, a unique marker); every process that
    still carries the marker at the end is killed by its PID."""
    mark = uuid.uuid4().hex
    yield cli_env(runtime_dir, **{MARK: mark})
    for pid in marked_pids(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descriptors(runtime_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runtime_dir.glob("bld_remote-*.json"))]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def py(installed: Path, code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Run `code` in the installed package's Python (from a neutral folder)."""
    return subprocess.Popen(
        [str(installed / "python"), "-P", "-c", code],
        env=env,
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result_of(proc: subprocess.Popen[str], timeout: float = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:] + err[-6000:]
    return json.loads(out.strip().splitlines()[-1])


PRELUDE = """\
import json, os, sys, time
import bld_remote
from bld_remote import Pool, RemoteError, OutcomeUnknown, BlenderConnectionError, BlenderTimeoutError
def describe(x):
    if isinstance(x, BaseException):
        return {"error": type(x).__name__, "item": getattr(x, "item", None), "exception": getattr(x, "exception", None),
                "ran": getattr(x, "ran", "n/a"), "conn": isinstance(x, ConnectionError)}
    return x
out = {}
"""

# Blocks item `i` == d["kill"] on its first run (until the test kills its Blender); appends each run to `runs`.
KILLABLE = r"""
import os, pathlib, time
d = pathlib.Path(item["dir"])
with open(d / "runs", "a") as f:
    f.write("%d\n" % item["i"])
if item["i"] == item["kill"] and not (d / "killed").exists():
    (d / "started.tmp").write_text(str(os.getpid()))
    os.replace(d / "started.tmp", d / "started")
    time.sleep(120)
time.sleep(0.1)
result = [item["i"], os.getpid()]
"""


def kill_when_started(d: Path, proc: subprocess.Popen[str], timeout: float = 180) -> int:
    """Wait until the blocking item has started (its file), then SIGKILL the Blender running it."""
    started = d / "started"
    wait_for(lambda: started.exists() or proc.poll() is not None, timeout, f"{started}")
    assert started.exists(), proc.communicate()
    pid = int(started.read_text())
    (d / "killed").write_text("1")
    os.kill(pid, signal.SIGKILL)
    return pid


# --- the supervisor --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--background", "--instances", "0"],
        ["--background", "--instances", "-1"],
        ["--background", "--instances", "65"],
        ["--background", "--instances", "100000000000"],
        ["--background", "--instances", "many"],
        ["--instances", "2"],
        ["--background", "--instances", "2", "--port", "7000"],
        ["--background", "--instances", "2", "--max-restarts", "-1"],
    ],
)
def test_start_instances_bounds_are_usage_errors(installed, marked, args):
    r = subprocess.run(
        [str(installed / "bld-remote"), "start", *args],
        env=marked,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() and "panicked" not in r.stderr
    assert r.stdout == ""


def test_start_instances_ready_lines_own_tokens_and_sigterm_cleanup(installed, runtime_dir, marked):
    sup = subprocess.Popen(
        [str(installed / "bld-remote"), "start", "--background", "--instances", "2", "--token", "auto"],
        env=marked,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert sup.stdout is not None
    for line in sup.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("bld_remote pool ready:"):
            break
    ready = [m for m in map(POOL_READY.match, lines) if m]
    assert [(m["k"], m["n"], m["r"]) for m in sorted(ready, key=lambda m: m["k"])] == [
        ("1", "2", "0"),
        ("2", "2", "0"),
    ], lines
    ports = {int(m["port"]) for m in ready}
    pids = {int(m["pid"]) for m in ready}
    assert len(ports) == 2 and len(pids) == 2
    assert pids == set(children_of(sup.pid))
    assert (
        lines[-1]
        == f"bld_remote pool ready: 2 instances (ports {','.join(m['port'] for m in sorted(ready, key=lambda m: m['k']))})"
    )
    # Blender's own lines are tagged with their instance.
    assert any(line.startswith("[1] Blender") for line in lines) and any(
        line.startswith("[2] ") for line in lines
    )

    descs = descriptors(runtime_dir)
    assert {(d["pid"], d["port"]) for d in descs} == {(int(m["pid"]), int(m["port"])) for m in ready}
    assert all(d["auth"] for d in descs)
    tokens = {d["token"] for d in descs}
    assert len(tokens) == 2 and all(len(t) >= 32 for t in tokens)
    for port in ports:
        r = subprocess.run(
            [
                str(installed / "bld-remote"),
                "exec",
                "--port",
                str(port),
                "-c",
                "import os; print(os.getpid())",
            ],
            env=marked,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) in pids

    t0 = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=60)
    assert sup.returncode == 0, err
    assert time.monotonic() - t0 < 30
    assert not any(pid_alive(p) for p in pids)
    assert descriptors(runtime_dir) == []
    assert all(port_is_free(p) for p in ports)


# --- Pool.start: owned instances ---------------------------------------------------------------------------


def test_owned_pool_map_orders_results_spreads_items_and_reports_failures(installed, runtime_dir, marked):
    code = (
        PRELUDE
        + r"""
with Pool.start(2, token="auto") as pool:
    out["n"] = len(pool)
    out["owned"] = pool.owned
    out["instance_pids"] = sorted(i["pid"] for i in pool.instances)
    r = pool.map("import os, time\ntime.sleep(0.1)\nresult = [item * item, os.getpid()]", list(range(10)))
    out["squares"] = [x[0] for x in r]
    out["used"] = sorted({x[1] for x in r})
    out["rx"] = [describe(x) for x in pool.map("result = 1 / item", [1, 0, 2], return_exceptions=True)]
    try:
        pool.map("result = 1 / item", [0, 1, 0, 4])
        out["raised"] = None
    except RemoteError as e:
        out["raised"] = {"item": e.item, "exception": e.exception, "results": [describe(x) for x in e.results],
                         "tb": e.traceback}
    out["no_result"] = pool.map("x = item", [1, 2])
    out["bad"] = []
    for bad in ([1, object()], [float("nan")]):
        try:
            pool.map("result = 1", bad)
        except (TypeError, ValueError) as e:
            out["bad"].append("%s: %s" % (type(e).__name__, e))
    out["empty"] = pool.map("result = 1", [])
    for kw in ({"retries": -1}, {"timeout": 0}, {"timeout": float("inf")}):
        try:
            pool.map("result = 1", [1], **kw)
        except ValueError as e:
            out.setdefault("bad_kw", []).append(str(e))
    sup = pool._supervisor.proc
    out["sup_pid"] = sup.pid
out["rc"] = sup.returncode
print(json.dumps(out))
"""
    )
    out = result_of(py(installed, code, marked))
    assert out["n"] == 2 and out["owned"] is True
    assert out["squares"] == [i * i for i in range(10)]
    assert out["used"] == out["instance_pids"], "both instances ran items"
    assert out["rx"][0] == 1.0 and out["rx"][2] == 0.5
    assert out["rx"][1]["error"] == "RemoteError" and out["rx"][1]["exception"] == "ZeroDivisionError"
    assert out["rx"][1]["item"] == 1
    # The first failure in item order, raised after the others finished; the whole list rides along.
    assert out["raised"]["item"] == 0 and out["raised"]["exception"] == "ZeroDivisionError"
    assert out["raised"]["results"][1] == 1.0 and out["raised"]["results"][3] == 0.25
    assert out["raised"]["results"][2]["error"] == "RemoteError"
    assert 'File "<map item>", line 1' in out["raised"]["tb"], out["raised"]["tb"]
    assert out["no_result"] == [None, None]
    assert out["bad"][0].startswith("TypeError: items[1] is not JSON") and out["bad"][1].startswith(
        "ValueError: items[0]"
    )
    assert out["empty"] == []
    assert len(out["bad_kw"]) == 3 and "retries" in out["bad_kw"][0]
    # The with block stopped everything: rc 0, no process, no descriptor.
    assert out["rc"] == 0
    assert not pid_alive(out["sup_pid"]) and not any(pid_alive(p) for p in out["instance_pids"])
    assert descriptors(runtime_dir) == []


def test_owned_pool_blender_killed_mid_map_is_outcome_unknown_restarted_and_replayed_only_with_retries(
    installed, runtime_dir, marked, tmp_path
):
    d1, d2 = tmp_path / "p1", tmp_path / "p2"
    d1.mkdir()
    d2.mkdir()
    code = (
        PRELUDE
        + f"KILLABLE = {KILLABLE!r}\nD1, D2 = {str(d1)!r}, {str(d2)!r}\n"
        + r"""
with Pool.start(2) as pool:
    before = {i["port"]: i["pid"] for i in pool.instances}
    items = [{"i": i, "kill": 3, "dir": D1} for i in range(8)]
    out["p1"] = [describe(x) for x in pool.map(KILLABLE, items, return_exceptions=True)]
    # The supervisor restarts the killed Blender on its port: its new ready line says restarts=1.
    deadline = time.monotonic() + 120
    while "restarts=1" not in pool.log and time.monotonic() < deadline:
        time.sleep(0.05)
    out["log"] = pool.log
    r = pool.map("import os, time\ntime.sleep(0.1)\nresult = os.getpid()", list(range(8)))
    after = {i["port"]: i["pid"] for i in pool.instances}
    out["same_ports"] = sorted(before) == sorted(after)
    out["changed"] = sorted(p for p in before if before[p] != after[p])
    out["used_after"] = sorted(set(r)) == sorted(after.values())
    items = [{"i": i, "kill": 2, "dir": D2} for i in range(6)]
    out["p2"] = [describe(x) for x in pool.map(KILLABLE, items, retries=1)]
    out["pids"] = sorted(set(before.values()) | set(after.values()) | {i["pid"] for i in pool.instances})
    sup = pool._supervisor.proc
out["rc"] = sup.returncode
print(json.dumps(out))
"""
    )
    proc = py(installed, code, marked)
    killed1 = kill_when_started(d1, proc)
    killed2 = kill_when_started(d2, proc)
    out = result_of(proc)
    p1 = out["p1"]
    assert p1[3]["error"] == "OutcomeUnknown" and p1[3]["item"] == 3 and p1[3]["ran"] is None, p1
    assert p1[3]["conn"] is True  # a BlenderConnectionError (ConnectionError) too
    assert [x[0] for i, x in enumerate(p1) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
    # Never replayed: item 3 ran exactly once.
    assert (d1 / "runs").read_text().split().count("3") == 1
    assert "restarts=1" in out["log"] and f"pid {killed1}" in out["log"], out["log"]
    assert out["same_ports"] and len(out["changed"]) == 1 and out["used_after"]
    # retries=1: the item whose Blender died is sent again (once), and the map has every value.
    assert [x[0] for x in out["p2"]] == list(range(6))
    assert (d2 / "runs").read_text().split().count("2") == 2
    assert killed2 != killed1
    assert out["rc"] == 0
    assert not any(pid_alive(p) for p in out["pids"])
    assert descriptors(runtime_dir) == []


def test_owned_pool_stops_on_garbage_collection_and_interpreter_exit_and_reports_a_failed_start(
    installed, runtime_dir, marked
):
    code = (
        PRELUDE
        + r"""
import gc
pool = Pool.start(1)
out["gc_pids"] = [pool._supervisor.proc.pid] + [i["pid"] for i in pool.instances]
del pool
gc.collect()
try:
    Pool.start(1, blender="/nonexistent/blender", ready_timeout=30)
    out["bad"] = None
except BlenderConnectionError as e:
    out["bad"] = str(e)
try:
    Pool.start(0)
except ValueError as e:
    out["zero"] = str(e)
# Left open on purpose: interpreter exit must stop it too.
kept = Pool.start(1)
out["exit_pids"] = [kept._supervisor.proc.pid] + [i["pid"] for i in kept.instances]
print(json.dumps(out), flush=True)
"""
    )
    out = result_of(py(installed, code, marked))
    assert not any(pid_alive(p) for p in out["gc_pids"]), out
    assert (
        "exited (status 1) before 1 instances were ready" in out["bad"]
        and "/nonexistent/blender" in out["bad"]
    )
    assert "n must be an integer from 1 to 64" in out["zero"]
    wait_for(
        lambda: not any(pid_alive(p) for p in out["exit_pids"]), 30, "the unclosed pool's processes to exit"
    )
    assert descriptors(runtime_dir) == []


# --- attached pools and `bld-remote map` over instances the test started ---------------------------------------


@pytest.fixture(scope="module")
def trio(user_scripts, tmp_path_factory):
    """Three headless Blenders started by the test (the third needs a token), their descriptors in one
    runtime dir. Killed by PID at the end."""
    rt = tmp_path_factory.mktemp("pool_runtime")
    procs = []
    try:
        for extra in ({}, {}, {"BLD_REMOTE_TOKEN": "s3cret-token"}):
            b = BlenderProcess(
                runtime_argv(SERVE.format(port=0)),
                blender_env(user_scripts, BLD_REMOTE_RUNTIME_DIR=str(rt), **extra),
            )
            procs.append(b)
        for b in procs:
            b.wait_ready()
        yield rt, procs
    finally:
        for b in procs:
            b.kill()


def test_map_cli_piped_prints_json_lines_in_order(installed, trio, tmp_path):
    rt, (a, b, _) = trio
    env = cli_env(rt)
    script = tmp_path / "job.py"
    script.write_text("import os, time\ntime.sleep(0.05)\nresult = {'sq': item * item, 'pid': os.getpid()}\n")
    items = tmp_path / "items.json"
    items.write_text(json.dumps(list(range(8))))
    base = [
        str(installed / "bld-remote"),
        "map",
        str(script),
        "--items",
        str(items),
        "--port",
        str(a.port),
        "--port",
        str(b.port),
    ]
    r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["item"] for x in lines] == list(range(8)) and all(x["ok"] for x in lines)
    assert [x["result"]["sq"] for x in lines] == [i * i for i in range(8)]
    assert {x["result"]["pid"] for x in lines} == {a.pid, b.pid}
    # Piped: plain progress lines, no terminal control codes.
    assert r.stderr.count("map: item ") == 8 and "\x1b" not in r.stderr, r.stderr
    assert "(8/8 done, 0 failed)" in r.stderr

    # A failing item: its line says why, the others are there, rc 1. JSON lines as items, --array output.
    items.write_text("1\n0\n\n2\n")
    script.write_text("result = 1 / item\n")
    r = subprocess.run([*base, "--array", "-q"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    arr = json.loads(r.stdout)
    assert [x["ok"] for x in arr] == [True, False, True] and arr[2]["result"] == 0.5
    assert arr[1]["error"]["kind"] == "remote" and arr[1]["error"]["exception"] == "ZeroDivisionError"
    assert arr[1]["error"]["ran"] is True and "map: item" not in r.stderr
    assert "1 of 3 items failed" in r.stderr

    # Without --port: every running instance (the token of the third comes from its descriptor).
    script.write_text("import os\nresult = os.getpid()\n")
    items.write_text(json.dumps(list(range(9))))
    r = subprocess.run(base[:5], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 9

    # Bad input: items that are not JSON (rc 2), no instance (rc 3), an instance that refuses the token (rc 3).
    items.write_text("[1, 2")
    r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a JSON array" in r.stderr, r.stderr
    items.write_text("[1]")
    empty = tmp_path / "empty_rt"
    empty.mkdir()
    r = subprocess.run(base[:5], env=cli_env(empty), capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "no running bld_remote instance" in r.stderr, r.stderr
    r = subprocess.run(
        [*base[:5], "--port", str(trio[1][2].port), "--token", "wrong"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3 and "refused" in r.stderr, r.stderr


def test_attached_pool_uses_every_instance_refuses_bad_input_and_drops_a_killed_one(
    installed, trio, tmp_path, runtime_dir
):
    rt, (a, b, c) = trio
    d = tmp_path / "k"
    d.mkdir()
    code = (
        PRELUDE
        + f"KILLABLE = {KILLABLE!r}\nD = {str(d)!r}\nA, B, C = {a.port}, {b.port}, {c.port}\nFREE = {free_port()}\n"
        + f"EMPTY_RT = {str(runtime_dir)!r}\n"
        + r"""
pool = Pool()
out["n"] = len(pool)
out["all"] = sorted(set(pool.map("import os, time\ntime.sleep(0.1)\nresult = os.getpid()", list(range(9)))))
t0 = time.monotonic()
for label, make in (("refused", lambda: Pool([("127.0.0.1", C)], token="wrong")),
                    ("nothing", lambda: Pool([("127.0.0.1", FREE)]))):
    try:
        make().map("result = 1", [1])
        out[label] = None
    except BlenderConnectionError as e:
        out[label] = [str(e), e.ran]
os.environ["BLD_REMOTE_RUNTIME_DIR"] = EMPTY_RT
try:
    Pool()
    out["empty"] = None
except BlenderConnectionError as e:
    out["empty"] = str(e)
out["bad_fast"] = time.monotonic() - t0 < 20
p2 = Pool([("127.0.0.1", A), ("127.0.0.1", B)])
items = [{"i": i, "kill": 1, "dir": D} for i in range(6)]
out["killed"] = [describe(x) for x in p2.map(KILLABLE, items, return_exceptions=True)]
out["left"] = [i["port"] for i in p2.instances]
out["again"] = p2.map("result = item", [1, 2, 3])
# A timed-out item: its error says it ran; the next item waits until the instance is idle, then runs.
t0 = time.monotonic()
out["timeout"] = [
    describe(x) for x in p2.map("import time\ntime.sleep(item)\nresult = item", [0, 3, 0], timeout=1, return_exceptions=True)
]
out["timeout_s"] = time.monotonic() - t0
print(json.dumps(out))
"""
    )
    proc = py(installed, code, cli_env(rt))
    killed = kill_when_started(d, proc)
    out = result_of(proc)
    assert out["n"] == 3 and out["all"] == sorted([a.pid, b.pid, c.pid])
    assert (
        "refused" in out["refused"][0]
        and "no item was run" in out["refused"][0]
        and out["refused"][1] is False
    )
    assert f"127.0.0.1:{c.port}" in out["refused"][0]
    assert "none of the pool's 1 instances answers" in out["nothing"][0]
    assert "no running bld_remote instance found" in out["empty"]
    assert out["bad_fast"]
    k = out["killed"]
    assert k[1]["error"] == "OutcomeUnknown" and k[1]["item"] == 1, k
    assert [x[0] for i, x in enumerate(k) if i != 1] == [0, 2, 3, 4, 5]
    assert (d / "runs").read_text().split().count("1") == 1
    survivor = a if killed == b.pid else b
    assert killed in (a.pid, b.pid) and out["left"] == [survivor.port]
    assert out["again"] == [1, 2, 3]
    t = out["timeout"]
    assert t[0] == 0 and t[2] == 0, t
    assert t[1]["error"] == "BlenderTimeoutError" and t[1]["ran"] is True and t[1]["item"] == 1, t
    assert 2.5 < out["timeout_s"] < 30, out["timeout_s"]
