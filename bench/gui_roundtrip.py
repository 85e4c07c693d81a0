"""GUI round trip and idle cost of bld_remote in an interactive Blender (Xvfb), beside same-run baselines.

    python bench/gui_roundtrip.py [--requests 300] [--idle-seconds 10] [--json out.json]

Starts, from the newest dist/*.whl (as the tests do):
  1. a headless Blender serving through keep_alive() (the baseline for round trips);
  2. an interactive Blender under `xvfb-run` with the add-on enabled and started (timer pump);
  3. an interactive Blender without the add-on (the baseline for idle CPU).
Measures, on one persistent connection each, `ping` (answered on network threads) and `get_scene_info`
(answered on Blender's main thread) p50/p99 over --requests requests after a warm-up; the first request after
the pump has backed off to its idle interval; the same through the keeper modal operator; and the idle CPU of
each Blender (utime+stime from /proc over --idle-seconds). Prints a Markdown table for docs/BENCHMARKS.md.
Every Blender is killed by its process group, also on failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import SERVE, BlenderProcess, Conn, blender_binary, blender_env, built_wheel, free_port  # noqa: E402
from test_gui import ENABLE_ADDON, GuiBlender  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
NO_ADDON = """
import bpy
bpy.context.preferences.view.show_splash = False
def ready():
    print("bld_remote listening on none:0 (pid %d)" % __import__("os").getpid(), flush=True)
bpy.app.timers.register(ready, first_interval=0.5)
"""


def user_scripts(root: Path) -> Path:
    addons = root / "addons"
    addons.mkdir(parents=True)
    with zipfile.ZipFile(built_wheel()) as wheel:
        for name in wheel.namelist():
            if name.startswith("bld_remote/"):
                wheel.extract(name, addons)
    return root


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def idle_cpu(pid: int, seconds: float) -> float:
    """Percent of one core used by `pid` over `seconds`."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def round_trips(port: int, command: str, n: int, warmup: int = 30, **params) -> list[float]:
    with Conn(port) as c:
        for _ in range(warmup):
            assert c.request(command, **params)["status"] == "success"
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.request(command, **params)
            out.append((time.perf_counter() - t0) * 1000)
            assert r["status"] == "success", r
    return out


def first_after_idle(port: int, samples: int, idle: float) -> list[float]:
    out = []
    with Conn(port) as c:
        for _ in range(samples):
            time.sleep(idle)
            t0 = time.perf_counter()
            assert c.request("get_scene_info")["status"] == "success"
            out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p99": pct(values, 0.99), "n": len(values)}


def execute(port: int, code: str) -> str:
    with Conn(port) as c:
        r = c.request("execute_code", code=code, undo=False)
    assert r["status"] == "success", r
    return r["result"]["output"]["stdout"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bld_remote_bench_"))
    scripts = user_scripts(tmp / "scripts")
    started: list[BlenderProcess] = []
    results: dict[str, object] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "requests": args.requests,
    }
    try:
        # 1. headless baseline
        headless = BlenderProcess(
            [blender_binary(), "-b", "--factory-startup", "--python-expr", SERVE.format(port=0)],
            blender_env(scripts),
        )
        started.append(headless)
        headless.wait_ready()
        # 2. GUI with the service (timer pump)
        port = free_port()
        script = tmp / "gui.py"
        script.write_text(ENABLE_ADDON)
        gui = GuiBlender(
            script, blender_env(scripts, BLD_REMOTE_MCP_START_NOW="1", BLD_REMOTE_MCP_PORT=str(port))
        )
        started.append(gui)
        gui.wait_ready()
        # 3. GUI without the add-on (idle baseline)
        plain_script = tmp / "plain.py"
        plain_script.write_text(NO_ADDON)
        plain = GuiBlender(plain_script, blender_env(scripts))
        started.append(plain)
        plain.wait_ready()
        time.sleep(3)  # let both windows finish their first draws

        rt: dict[str, dict[str, float]] = {}
        for name, p in (("headless", headless.port), ("gui", gui.port)):
            for command in ("ping", "get_scene_info"):
                rt[f"{name} {command}"] = summary(round_trips(p, command, args.requests))
        # The keeper modal operator as the driver instead of the timer pump.
        execute(gui.port, "bpy.ops.wm.bld_remote_keeper('INVOKE_DEFAULT')")
        time.sleep(0.5)  # the pump's last tick is over: from now on only the keeper runs jobs
        state = execute(gui.port, "from bld_remote import gui\nprint(gui.pump_is_armed(), gui.KEEPER.active)")
        assert state == "False True\n", state
        rt["gui keeper get_scene_info"] = summary(round_trips(gui.port, "get_scene_info", args.requests))
        execute(gui.port, "from bld_remote import gui\ngui.request_keeper_shutdown()")
        time.sleep(0.5)
        rt["gui first get_scene_info after 3 s idle"] = summary(first_after_idle(gui.port, 8, 3.0))
        results["round_trip_ms"] = rt

        time.sleep(3)  # past the pump's active window: it has backed off to its idle interval
        cpu = {
            "headless with service": idle_cpu(headless.pid, args.idle_seconds),
            "gui with service (adaptive pump)": idle_cpu(gui.blender_pid, args.idle_seconds),
            "gui without bld_remote": idle_cpu(plain.blender_pid, args.idle_seconds),
        }
        # The same pump never backing off (interval 0 = every event-loop pass), for comparison.
        idle_interval = execute(gui.port, "from bld_remote import gui\nprint(gui.IDLE_INTERVAL)").strip()
        execute(gui.port, "from bld_remote import gui\ngui.IDLE_INTERVAL = 0.0")
        time.sleep(3)
        cpu["gui with service (pump at interval 0)"] = idle_cpu(gui.blender_pid, args.idle_seconds)
        execute(gui.port, f"from bld_remote import gui\ngui.IDLE_INTERVAL = {idle_interval}")
        results["idle_interval"] = float(idle_interval)
        results["idle_cpu_percent"] = cpu
    finally:
        for b in reversed(started):
            b.kill()

    print(f"\n{results['date']} — {results['machine']}, {args.requests} requests per row\n")
    print("| round trip (persistent connection) | p50 ms | p99 ms | p50 vs headless |")
    print("|---|---|---|---|")
    for name, s in rt.items():
        command = name.split()[-1] if "after" not in name else "get_scene_info"
        base = rt.get(f"headless {command}")
        ratio = f"{s['p50'] / base['p50']:.1f}×" if base and not name.startswith("headless") else "1×"
        print(f"| {name} | {s['p50']:.3f} | {s['p99']:.3f} | {ratio} |")
    print(f"\npump idle interval {results['idle_interval']} s\n")
    print("| idle CPU over %.0f s | %% of one core |" % args.idle_seconds)
    print("|---|---|")
    for name, v in cpu.items():
        print(f"| {name} | {v:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
