"""bld_remote.ray on a real two-node Ray cluster started here, on loopback (never a mock), with real headless
Blenders (Debian's 3.4.1) owned by Ray actors. Every Blender and Ray process is stopped by PID at the end.

The cluster is started by this module. Each test's Ray driver is a script run in the Python that has the built
wheels installed (with -P and a working directory of its own, so the source tree cannot shadow the package),
as a user's program would be; it prints what it saw as JSON, and the asserts are here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# Ray must use 127.0.0.1 for every node (BLENDER-FACTS.md): set before Ray is imported or started.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
from ray.cluster_utils import Cluster

DRIVER = """\
import json, os, pathlib, signal, sys, threading, time
import ray
from bld_remote import RemoteError, BlenderTimeoutError
from bld_remote import ray as br
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
out = {}
def wait_for(path, limit=120):
    deadline = time.monotonic() + limit
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return out
    for k in kids:
        out.append(k)
        out.extend(_descendants(k))
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    runtime = tmp_path_factory.mktemp("ray_runtime")
    old = os.environ.get("BLD_REMOTE_RUNTIME_DIR")
    # The Ray nodes (and so the actors, and the Blenders they start) inherit this: descriptors go to a
    # folder of this test's own.
    os.environ["BLD_REMOTE_RUNTIME_DIR"] = str(runtime)
    work = tmp_path_factory.mktemp("ray_cwd")
    here = os.getcwd()
    # The nodes (and their workers) start in a folder of their own, never the source tree.
    os.chdir(work)
    try:
        c = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
        )
        nodes = [c.head_node, c.add_node(num_cpus=1, node_ip_address="127.0.0.1")]
    finally:
        os.chdir(here)
    procs = {p.process.pid for n in nodes for ps in n.all_processes.values() for p in ps}
    try:
        c.wait_for_nodes()
        yield {"address": c.address, "runtime": runtime, "cwd": work, "nodes": len(nodes)}
    finally:
        tree = {d for p in procs for d in _descendants(p)} | procs
        c.shutdown()
        # Whatever is left (a Blender whose actor was killed, a driver's child), by PID.
        for pid in tree | set(_STARTED):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if old is None:
            os.environ.pop("BLD_REMOTE_RUNTIME_DIR", None)
        else:
            os.environ["BLD_REMOTE_RUNTIME_DIR"] = old


_STARTED: list[int] = []


def drive(cluster: dict, body: str, timeout: float = 300) -> dict:
    """Run a Ray driver (DRIVER + body, which fills `out`) against the module's cluster; return `out`. The
    Blenders its actors start are recorded for the module's clean-up, whatever happens to the driver."""
    script = DRIVER + textwrap.dedent(body) + "\nprint('OUT ' + json.dumps(out, default=repr))\n"
    env = dict(os.environ, RAY_ADDRESS=cluster["address"], PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [sys.executable, "-P", "-c", script],
        cwd=cluster["cwd"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    for d in Path(cluster["runtime"]).glob("*.json"):
        try:
            _STARTED.append(int(json.loads(d.read_text())["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    lines = [line for line in stdout.splitlines() if line.startswith("OUT ")]
    assert p.returncode == 0 and lines, (
        f"driver failed (rc {p.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    )
    return json.loads(lines[-1][4:])


def _descriptors_of(cluster: dict, pids) -> list[Path]:
    found = []
    for d in Path(cluster["runtime"]).glob("*.json"):
        try:
            if int(json.loads(d.read_text())["pid"]) in set(pids):
                found.append(d)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _gone(pids, limit: float = 60) -> bool:
    deadline = time.monotonic() + limit
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_map_spreads_over_both_nodes_keeps_item_order_and_renders_come_back(cluster):
    out = drive(
        cluster,
        """
        actors = [br.BlenderActor.options(num_cpus=1).remote() for _ in range(2)]
        infos = ray.get([a.info.remote() for a in actors], timeout=180)
        out["infos"] = infos
        out["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        code = "import os\\nresult = {'square': item * item, 'pid': os.getpid()}"
        out["map"] = br.map(code, range(8), actors=actors)
        renders = ray.get([a.render_image.remote(width=64, height=48) for a in actors], timeout=180)
        out["renders"] = [
            {"png": r["data"][:8] == b"\\x89PNG\\r\\n\\x1a\\n", "bytes": len(r["data"]),
             "file_left": bool(r.get("filepath")) and pathlib.Path(r["filepath"]).exists()}
            for r in renders
        ]
        br._stop_actors(actors)
        """,
    )
    infos = out["infos"]
    assert len(out["nodes"]) == 2
    # One actor per node (each node has one CPU, each actor takes one).
    assert sorted(i["node_id"] for i in infos) == out["nodes"]
    assert [r["square"] for r in out["map"]] == [i * i for i in range(8)]
    # Both Blenders ran items: the work really went over both nodes.
    assert {r["pid"] for r in out["map"]} == {i["pid"] for i in infos}
    for r in out["renders"]:
        assert r["png"] and r["bytes"] > 100 and not r["file_left"], r
    # Stopped: every Blender, and its descriptor.
    assert _gone([i["pid"] for i in infos])
    assert not _descriptors_of(cluster, [i["pid"] for i in infos])


def test_failures_stay_in_their_slot_or_raise_the_first_after_the_rest(cluster, tmp_path):
    out = drive(
        cluster,
        f"""
        actors = [br.BlenderActor.options(num_cpus=1).remote() for _ in range(2)]
        code = (
            "import pathlib\\n"
            "pathlib.Path({str(tmp_path)!r}, str(item)).write_text('ran')\\n"
            "if item % 3 == 0:\\n    raise ValueError(f'bad item {{item}}')\\n"
            "result = item"
        )
        got = br.map(code, range(6), actors=actors, return_exceptions=True)
        out["slots"] = [
            {{"error": type(r).__name__, "message": r.message, "exception": r.exception}}
            if isinstance(r, BaseException) else r
            for r in got
        ]
        try:
            br.map(code, range(6), actors=actors)
        except RemoteError as e:
            out["raised"] = e.message
        out["ran"] = sorted(p.name for p in pathlib.Path({str(tmp_path)!r}).iterdir())
        br._stop_actors(actors)
        """,
    )
    for i, r in enumerate(out["slots"]):
        if i % 3 == 0:
            assert r["error"] == "RemoteError" and f"bad item {i}" in r["message"], r
            assert r["exception"] == "ValueError"
        else:
            assert r == i
    # Without return_exceptions: the first failure in item order, raised once every item had run.
    assert "bad item 0" in out["raised"]
    assert out["ran"] == [str(i) for i in range(6)]


def test_a_blender_killed_mid_item_is_outcome_unknown_never_replayed_unless_retries(cluster, tmp_path):
    out = drive(
        cluster,
        f"""
        actors = [br.BlenderActor.options(num_cpus=1).remote() for _ in range(2)]
        marker = pathlib.Path({str(tmp_path)!r}, "started")
        runs = pathlib.Path({str(tmp_path)!r}, "runs")
        runs.mkdir()
        # Item 2 announces its Blender's pid, then waits; the driver kills that Blender with SIGKILL.
        code = (
            "import os, pathlib, time\\n"
            f"pathlib.Path({{str(runs)!r}}, f'{{{{item}}}}-{{{{time.monotonic_ns()}}}}').touch()\\n"
            f"m = pathlib.Path({{str(marker)!r}})\\n"
            "if item == 2 and not m.exists():\\n"
            "    m.write_text(str(os.getpid()))\\n"
            "    time.sleep(120)\\n"
            "result = item"
        )
        killed = []
        def killer():
            pid = int(wait_for(marker))
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)
        for attempt, retries in (("no_retry", 0), ("retry", 1)):
            if marker.exists():
                marker.unlink()
            for p in runs.iterdir():
                p.unlink()
            t = threading.Thread(target=killer)
            t.start()
            got = br.map(code, range(5), actors=actors, retries=retries, return_exceptions=True)
            t.join()
            out[attempt] = {{
                "slots": [type(r).__name__ if isinstance(r, BaseException) else r for r in got],
                "item2_runs": len([p for p in runs.iterdir() if p.name.startswith("2-")]),
            }}
        out["killed"] = killed
        out["infos"] = ray.get([a.info.remote() for a in actors], timeout=180)
        br._stop_actors(actors)
        """,
    )
    no, yes = out["no_retry"], out["retry"]
    assert no["slots"] == [0, 1, "OutcomeUnknown", 3, 4], no
    # Not replayed: item 2 ran exactly once.
    assert no["item2_runs"] == 1
    # With retries=1 (the code says it is idempotent) it ran again, on a new Blender, and succeeded.
    assert yes["slots"] == [0, 1, 2, 3, 4], yes
    assert yes["item2_runs"] == 2
    # Each kill was followed by a new Blender in that actor.
    assert len(out["killed"]) == 2
    assert not set(out["killed"]) & {i["pid"] for i in out["infos"]}
    assert sum(i["launches"] for i in out["infos"]) == 4
    assert _gone(out["killed"]) and _gone([i["pid"] for i in out["infos"]])


def test_an_actor_process_killed_mid_item_is_outcome_unknown_and_ray_restarts_it(cluster, tmp_path):
    out = drive(
        cluster,
        f"""
        a = br.BlenderActor.options(num_cpus=1).remote()
        first = ray.get(a.info.remote(), timeout=180)
        marker = pathlib.Path({str(tmp_path)!r}, "started")
        code = (
            "import pathlib, time\\n"
            f"m = pathlib.Path({{str(marker)!r}})\\n"
            "if item == 1 and not m.exists():\\n"
            "    m.write_text('x')\\n"
            "    time.sleep(8)\\n"
            "result = item"
        )
        def killer():
            wait_for(marker)
            os.kill(first["actor_pid"], signal.SIGKILL)  # the actor's own process, as an OOM killer would
        t = threading.Thread(target=killer)
        t.start()
        got = br.map(code, range(3), actors=[a], return_exceptions=True)
        t.join()
        out["slots"] = [type(r).__name__ if isinstance(r, BaseException) else r for r in got]
        out["first"] = first
        out["again"] = ray.get(a.info.remote(), timeout=180)
        br._stop_actors([a])
        """,
    )
    assert out["slots"] == [0, "OutcomeUnknown", 2], out
    # Ray restarted the actor (max_restarts): a new process owning a new Blender.
    assert out["again"]["actor_pid"] != out["first"]["actor_pid"]
    assert out["again"]["pid"] != out["first"]["pid"]
    # The killed actor's Blender did not outlive it: its supervisor got SIGTERM as the actor died, and
    # stopped it once its job (8 s) ended.
    assert _gone([out["first"]["pid"], out["again"]["pid"]], limit=90)


def test_bad_input_and_timeouts_are_clear_and_owned_actors_are_stopped(cluster):
    out = drive(
        cluster,
        """
        actors = [br.BlenderActor.options(num_cpus=1).remote()]
        out["empty"] = br.map("result = item", [], actors=actors)
        errors = {}
        for name, kwargs in {
            "not_json": dict(items=[1, object()]),
            "no_actors": dict(items=[1], actors=[]),
            "retries": dict(items=[1], retries=-1),
            "timeout": dict(items=[1], timeout=float("nan")),
            "num_actors": dict(items=[1], actors=None, num_actors=0),
        }.items():
            kw = {"actors": actors, **kwargs}
            items = kw.pop("items")
            try:
                br.map("result = item", items, **kw)
            except (TypeError, ValueError) as e:
                errors[name] = f"{type(e).__name__}: {e}"
        out["errors"] = errors
        # A per-item timeout: item 0 (3 s) times out having started; item 1, queued behind it in the same
        # Blender, times out without having run. Then the actor serves again.
        got = br.map(
            "import time\\nif item == 0:\\n    time.sleep(3)\\nresult = item",
            [0, 1],
            actors=actors,
            timeout=0.5,
            return_exceptions=True,
        )
        out["timeout_slots"] = [[type(r).__name__, getattr(r, "ran", "-")] for r in got]
        out["after"] = br.map("result = item", [5], actors=actors)
        br._stop_actors(actors)
        # Actors made by map itself (num_cpus=0: any node) are stopped with their Blenders when it ends.
        out["owned_pids"] = br.map("import os\\nresult = os.getpid()", range(2), num_actors=2,
                                   actor_options={"num_cpus": 0})
        """,
    )
    assert out["empty"] == []
    e = out["errors"]
    assert e["not_json"].startswith("TypeError: item 1 is not JSON"), e
    assert "no actors" in e["no_actors"] and "retries" in e["retries"] and "timeout" in e["timeout"], e
    assert "num_actors" in e["num_actors"], e
    assert out["timeout_slots"] == [["BlenderTimeoutError", True], ["BlenderTimeoutError", False]], out
    assert out["after"] == [5]
    assert len(out["owned_pids"]) == 2 and _gone(out["owned_pids"])
    # Their descriptors are gone. (A Blender killed with SIGKILL by an earlier test cannot remove its own:
    # only descriptors naming these pids are checked.)
    assert not _descriptors_of(cluster, out["owned_pids"])


def test_without_ray_running_map_says_so():
    # A driver with no cluster to join (ray.init not called): a clear error, nothing started.
    code = (
        "from bld_remote import ray as br\n"
        "try:\n    br.map('result = item', [1])\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    p = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ERR Ray is not initialised" in p.stdout, p.stdout + p.stderr
