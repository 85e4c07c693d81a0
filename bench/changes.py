"""What `execute_code`'s `changes` report costs: ``python bench/changes.py [--quick] [--sizes N,M]``.

Starts one real headless Blender serving bld_remote from the built wheel (newest ``dist/*.whl``, or
``--wheel``), and in the same run, on the same connection, sends the same `execute_code` with
``changes: false`` (the baseline) and with the report on (the default for framed requests), interleaved
A B A B, on the default scene (3 objects) and then on scenes grown to each of ``--sizes`` objects (1,000
and 10,000 by default, to show the cost is linear: linked duplicates of one mesh made with
``bpy.data.objects.new``, which takes well under a second). Three codes: ``pass`` (nothing changes: the snapshot twice and a diff of equal columns), moving
one object (the diff finds one row), and adding one object (every row after it shifts). Also times the
snapshot and the diff inside Blender (``time.perf_counter`` around ``bld_remote.changes``), which the
round trips cannot show as precisely on a shared machine. Prints Markdown for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import SERVE, BlenderProcess, blender_env, built_wheel, runtime_argv  # noqa: E402

MOVE = "o = bpy.data.objects['Cube']\no.location.x = 1.0 - o.location.x"
# Adds an object named so that it sorts first (every row after it shifts), then removes it again in the
# next call of the pair (the scene stays the size it was).
ADD = (
    "if 'AAA_bench' in bpy.data.objects:\n"
    "    bpy.data.objects.remove(bpy.data.objects['AAA_bench'])\n"
    "else:\n"
    "    bpy.context.scene.collection.objects.link(bpy.data.objects.new('AAA_bench', None))"
)
BUILD = (
    "mesh = bpy.data.objects['Cube'].data\n"
    "coll = bpy.context.scene.collection\n"
    "new = bpy.data.objects.new\n"
    "for i in range({start}, {stop}):\n"
    "    coll.objects.link(new(f'Dup{{i:05d}}', mesh))\n"
    "result = len(bpy.data.objects)"
)
INSIDE = (
    "import time\n"
    "from bld_remote import changes as ch\n"
    "snaps, diffs = [], []\n"
    "for _ in range({reps}):\n"
    "    t = time.perf_counter(); b = ch.snapshot(bpy); snaps.append(time.perf_counter() - t)\n"
    "    a = ch.snapshot(bpy)\n"
    "    t = time.perf_counter(); ch.diff(b, a); diffs.append(time.perf_counter() - t)\n"
    "result = [min(snaps), sorted(snaps)[len(snaps) // 2], min(diffs), sorted(diffs)[len(diffs) // 2]]"
)


class Conn:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.id = 0

    def call(self, code: str, **params) -> dict:
        self.id += 1
        req = {"type": "execute_code", "params": {"code": code, **params}, "id": self.id}
        self.sock.sendall(json.dumps(req).encode())
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        reply = json.loads(line)
        if reply.get("status") != "success":
            raise RuntimeError(reply)
        return reply["result"]


def interleaved(conn: Conn, code: str, n: int) -> tuple[list[float], list[float]]:
    """Round-trip times (s) of `code` with changes off (A) and on (B), alternating, after a warm-up."""
    off: list[float] = []
    on: list[float] = []
    for _ in range(3):
        conn.call(code, changes=False)
        conn.call(code)
    for k in range(n):
        for flag, sink in ((False, off), (True, on)) if k % 2 == 0 else ((True, on), (False, off)):
            t = time.perf_counter()
            r = conn.call(code, changes=flag)
            sink.append(time.perf_counter() - t)
            assert ("changes" in r) == flag
    return off, on


def us(x: float) -> str:
    return f"{x * 1e6:,.0f}"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, load {os.getloadavg()[0]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--sizes", default="1000,10000", help="scene sizes (objects) after the default scene")
    ap.add_argument("--wheel", type=Path, help="the bld_remote wheel (default: newest dist/*.whl)")
    args = ap.parse_args()
    n_small, n_large, reps_inside = (100, 10, 50) if args.quick else (400, 40, 200)
    wheel = args.wheel or built_wheel()
    tmp = Path(tempfile.mkdtemp(prefix="bld_remote_bench_changes_"))
    addons = tmp / "scripts" / "addons"
    addons.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("bld_remote/"):
                zf.extract(name, addons)
    bld = BlenderProcess(runtime_argv(SERVE.format(port=0)), blender_env(tmp / "scripts"))
    try:
        port = bld.wait_ready()
        conn = Conn(port)
        version = conn.call("import bpy\nresult = bpy.app.version_string")["value"]
        print("## What changed: the cost of `changes` (bench/changes.py)\n")
        print(
            f"- command: `python bench/changes.py{' --quick' if args.quick else ''}"
            f"{f' --sizes {args.sizes}' if args.sizes != '1000,10000' else ''}`; date: "
            f"{_dt.datetime.now():%Y-%m-%d %H:%M}"
        )
        print(f"- machine: {machine()}; Blender {version} headless; wheel {wheel.name}")
        print(
            "- round trips: the same `execute_code` on one framed connection, `changes: false` (A) and on "
            "(B) interleaved; medians, and B − A\n"
        )
        rows = []
        inside = []
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
        scenes = [("default scene (3 objects)", n_small, None)] + [(None, n_large, size) for size in sizes]
        made = 0
        for label, n, build in scenes:
            if build:
                add = max(0, build - 3 - made)
                total = conn.call(BUILD.format(start=made, stop=made + add), changes=False)["value"]
                made += add
                label = f"{total:,} objects"
            for what, code in (("`pass`", "pass"), ("move one object", MOVE), ("add/remove one object", ADD)):
                off, on = interleaved(conn, code, n)
                a, b = statistics.median(off), statistics.median(on)
                rows.append(f"| {label} | {what} | {n} | {us(a)} | {us(b)} | {us(b - a)} | {b / a:.2f}× |")
            r = conn.call(INSIDE.format(reps=reps_inside if not build else max(10, reps_inside // 10)))
            inside.append((label, r["value"]))
        print("| scene | code | pairs | A: changes off (µs) | B: on (µs) | B − A (µs) | B / A |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        print("\nInside Blender (`bld_remote.changes`, min / median of repeated calls):\n")
        print("| scene | one snapshot (µs) | diff of two equal snapshots (µs) |")
        print("|---|---|---|")
        for label, (smin, smed, dmin, dmed) in inside:
            print(f"| {label} | {us(smin)} / {us(smed)} | {us(dmin)} / {us(dmed)} |")
    finally:
        bld.kill()


if __name__ == "__main__":
    main()
