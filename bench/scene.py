"""Scene queries on a 10,000-object scene, against a bare Python loop over ``bpy.data.objects`` doing the
same work in the same Blender, in the same run.

    python bench/scene.py [--objects 10000] [--repeats 60] [--json out.json]

Starts one headless Blender from the newest dist/*.whl (as the tests do), builds the scene with the
bpy.data API (linked duplicates of the default cube's mesh, spread over 10 collections, one nested), then
measures, interleaved (A, B, A, B, ...), each case below two ways:

- **inside Blender** (execute_code, ``time.perf_counter`` around each call): the handler
  ``bld_remote.scene.get_scene_info(params)`` against the bare loop, a plain function that builds the same
  reply from ``bpy.data.objects``;
- **over the wire** (one persistent connection): the ``get_scene_info`` request against an
  ``execute_code`` request that runs the same bare loop and returns the same data as its ``result``.

Cases: (a) ``summary: true``; (b) the first page, ``limit: 200`` with the default fields; (c) every object
without ``limit`` (today's reply, for reference). Prints a Markdown table for docs/BENCHMARKS.md (medians, and
the ratio handler / bare loop). The Blender is killed by its PID, also on failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import SERVE, BlenderProcess, Conn, blender_binary, blender_env, built_wheel  # noqa: E402

BUILD = """
scene = bpy.context.scene
mesh = bpy.data.objects["Cube"].data
colls = []
for i in range(10):
    c = bpy.data.collections.new(f"Group{{i}}")
    (colls[0] if i == 9 else scene.collection).children.link(c)
    colls.append(c)
for i in range({n}):
    o = bpy.data.objects.new(f"Dup.{{i:05d}}", mesh)
    o.location = (i % 100, i // 100, 0)
    colls[i % 10].objects.link(o)
result = len(scene.objects)
"""

# The bare loops: what a script would write to get the same data, straight from bpy.data.objects.
BARE = """
def _common(scene):
    active = bpy.context.view_layer.objects.active
    return {
        "materials_count": len(bpy.data.materials),
        "frame_current": scene.frame_current,
        "frame_start": scene.frame_start,
        "frame_end": scene.frame_end,
        "active_object": None if active is None else active.name,
        "render_engine": scene.render.engine,
        "blend_file": bpy.data.filepath or None,
    }

def bare_summary():
    scene = bpy.context.scene
    objs = bpy.data.objects
    counts = {}
    for o in objs:
        counts[o.type] = counts.get(o.type, 0) + 1
    def node(c):
        return {"name": c.name, "objects": len(c.objects), "children": [node(k) for k in c.children]}
    r = scene.render
    return {
        "name": scene.name, "summary": True, "object_count": len(objs), "total": len(objs),
        "counts_by_type": counts, "collections": node(scene.collection),
        "collection_count": len(bpy.data.collections), "collections_truncated": False,
        "camera": scene.camera.name if scene.camera else None, "fps": r.fps / r.fps_base,
        **_common(scene),
    }

def bare_page(limit=200):
    scene = bpy.context.scene
    objs = bpy.data.objects
    n = len(objs)
    page = objs[0:limit] if limit is not None else objs
    rows = [{"name": o.name, "type": o.type, "location": o.location[:], "visible": o.visible_get()} for o in page]
    return {
        "name": scene.name, "object_count": n, "objects": rows, "total": n, "offset": 0, "limit": limit,
        "truncated": limit is not None and limit < n, **_common(scene),
    }
"""

CASES = {
    "summary": ({"summary": True}, "bare_summary()"),
    "first page (limit 200)": ({"limit": 200}, "bare_page(200)"),
    "every object (no limit)": ({}, "bare_page(None)"),
}

INSIDE = """
import time, statistics
from bld_remote import scene as S
{bare}
out = {{}}
for label, (params, call) in {cases}.items():
    fn = eval("lambda: " + call)
    for _ in range(5):
        S.get_scene_info(params); fn()
    a, b = [], []
    for _ in range({repeats}):
        t = time.perf_counter(); S.get_scene_info(params); a.append(time.perf_counter() - t)
        t = time.perf_counter(); fn(); b.append(time.perf_counter() - t)
    out[label] = [statistics.median(a) * 1e3, statistics.median(b) * 1e3]
result = out
"""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def user_scripts(root: Path) -> Path:
    addons = root / "addons"
    addons.mkdir(parents=True)
    with zipfile.ZipFile(built_wheel()) as wheel:
        for name in wheel.namelist():
            if name.startswith("bld_remote/"):
                wheel.extract(name, addons)
    return root


def ok(reply: dict) -> object:
    assert reply.get("status") == "success", str(reply)[:2000]
    return reply["result"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bld_remote_bench_scene_"))
    blender = BlenderProcess(
        [blender_binary(), "-b", "--factory-startup", "--python-expr", SERVE.format(port=0)],
        blender_env(user_scripts(tmp / "scripts")),
    )
    results: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, nproc {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}, "
        f"{cpu_model()}, {platform.platform()}",
        "objects": args.objects,
        "repeats": args.repeats,
    }
    try:
        blender.wait_ready()
        with Conn(blender.port, timeout=600) as c:
            count = ok(c.request("execute_code", code=BUILD.format(n=args.objects)))["value"]
            results["scene_objects"] = count
            inside = ok(
                c.request("execute_code", code=INSIDE.format(bare=BARE, cases=CASES, repeats=args.repeats))
            )["value"]
            results["inside_ms"] = inside
            wire: dict[str, list[float]] = {}
            for label, (params, call) in CASES.items():
                code = f"{BARE}\nresult = {call}"
                req_a = {"type": "get_scene_info", "params": params}
                req_b = {"type": "execute_code", "params": {"code": code}}
                for _ in range(5):
                    ok(c.request(req_a))
                    ok(c.request(req_b))
                a, b = [], []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    ra = ok(c.request(req_a))
                    a.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    rb = ok(c.request(req_b))
                    b.append(time.perf_counter() - t)
                # Like with like: the same counts and as many objects (bpy.data.objects is in name order,
                # the scene in collection order, so the first 200 are not the same 200).
                assert isinstance(ra, dict) and isinstance(rb, dict)
                assert ra["object_count"] == rb["value"]["object_count"], label
                assert len(ra.get("objects", ())) == len(rb["value"].get("objects", ())), label
                wire[label] = [statistics.median(a) * 1e3, statistics.median(b) * 1e3]
            results["wire_ms"] = wire
    finally:
        blender.kill()

    print(f"\n{results['date']}, {results['machine']}")
    print(f"{results['scene_objects']} objects, {args.repeats} interleaved repeats, medians\n")
    print(
        "| case | handler in Blender (ms) | bare loop (ms) | ratio | get_scene_info round trip (ms) | "
        "execute_code round trip (ms) | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for label in CASES:
        hi, bi = inside[label]
        hw, bw = wire[label]
        print(f"| {label} | {hi:.3f} | {bi:.3f} | {hi / bi:.2f}× | {hw:.3f} | {bw:.3f} | {hw / bw:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
