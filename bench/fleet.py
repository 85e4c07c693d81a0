"""Fleet benchmarks (issue 15): a job's round trip against execute_code, and bld_remote.ray.map against
Pool.map for the same items.

    .venv/bin/python -P bench/fleet.py [--n 300] [--batches 10] [--items 40] [--rounds 3] [--only jobs|ray]
        [--json F]

Uses the installed wheels (run ``bash scripts/setup.sh`` first). In the same run, so ratios share the noise:

- **job round trip**: ``Pool.start(1)``'s instance; ``--batches`` rotating batches of ``--n`` requests on
  one kept connection: ``execute_code(code)`` against ``submit_code_job`` of the same code followed by
  ``get_job_result`` with a wait: ``Client.submit(code).result()``, which sends both in one go (the client
  chooses the job's id, so the second need not wait for the first's reply). Ratio = median per-request
  time of the job batches / of the execute batches (target <= 1.5). A third kind, acknowledged submission then
  wait (two round trips, as ``Client.submit`` did before), is the before in the same run. Twice: ``result = 1`` (nothing but the
  protocol: two requests and replies where execute_code has one, but one round trip) and 5 ms of work (``--n`` / 10 requests).
- **Ray overhead**: a local two-CPU Ray (``ray.init(num_cpus=2)``, loopback) with two warm ``BlenderActor``s,
  against ``Pool.start(2)``; ``--items`` items of ~20 ms CPU each, ``--rounds`` alternating rounds of
  ``bld_remote.ray.map(actors=...)`` and ``Pool.map``. Ratio = median map time with Ray / with the pool
  (reported; no target in the issue).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from bld_remote import Client, Pool

WORK = """
import time
t = time.perf_counter()
n = 0
while time.perf_counter() - t < 0.02:
    n += 1
result = item
"""


SHORT = "result = 1"
FIVE_MS = "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < 0.005:\n    pass\nresult = 1"


def job_round_trip(a: argparse.Namespace, code: str, n: int) -> dict:
    with Pool.start(1) as pool:
        port = pool.instances[0]["port"]
        c = Client(port=port, timeout=60)
        c.call("ping")
        times: dict[str, list[float]] = {"exec": [], "job": [], "two": []}
        kinds = ("exec", "job", "two")
        for b in range(a.batches):
            for kind in kinds[b % 3 :] + kinds[: b % 3]:
                t0 = time.perf_counter()
                for _ in range(n):
                    if kind == "exec":
                        c.execute(code)
                    elif kind == "job":
                        c.submit(code).result(timeout=60)
                    else:
                        # The submission acknowledged before the wait is sent (the way Client.submit worked
                        # before it chose job ids): two round trips.
                        job = c.call("submit_code_job", code=code, changes=False)["job_id"]
                        c.call("get_job_result", job_id=job, wait_timeout_seconds=60)
                times[kind].append((time.perf_counter() - t0) / n)
        c.close()
    e, j, w = (statistics.median(times[k]) for k in kinds)
    return {
        "execute_ms": e * 1000,
        "job_ms": j * 1000,
        "ratio": j / e,
        "target": 1.5,
        "met": j / e <= 1.5,
        "two_round_trips_ms": w * 1000,
        "two_round_trips_ratio": w / e,
    }


def ray_overhead(a: argparse.Namespace) -> dict:
    import ray

    from bld_remote import ray as br

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actors = [br.BlenderActor.options(num_cpus=1).remote() for _ in range(2)]
        ray.get([x.info.remote() for x in actors], timeout=300)
        with Pool.start(2) as pool:
            items = list(range(a.items))
            br.map(WORK, items[:2], actors=actors)
            pool.map(WORK, items[:2])
            rt: list[float] = []
            pt: list[float] = []
            for r in range(a.rounds * 2):
                t0 = time.perf_counter()
                if r % 2 == 0:
                    got = br.map(WORK, items, actors=actors)
                    rt.append(time.perf_counter() - t0)
                else:
                    got = pool.map(WORK, items)
                    pt.append(time.perf_counter() - t0)
                assert got == items
        br._stop_actors(actors)
    finally:
        ray.shutdown()
    rm, pm = statistics.median(rt), statistics.median(pt)
    return {
        "items": a.items,
        "ray_map_s": rm,
        "pool_map_s": pm,
        "ratio": rm / pm,
        "per_item_extra_ms": (rm - pm) / a.items * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=["jobs", "ray"], default=None, help="run one part")
    a = ap.parse_args()
    out: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Linux {platform.release()}",
        "python": sys.version.split()[0],
        "args": vars(a),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if a.only in (None, "jobs"):
        out["job_round_trip"] = job_round_trip(a, SHORT, a.n)
        print(json.dumps(out["job_round_trip"]), flush=True)
        out["job_round_trip_5ms"] = job_round_trip(a, FIVE_MS, max(1, a.n // 10))
        print(json.dumps(out["job_round_trip_5ms"]), flush=True)
    if a.only in (None, "ray"):
        out["ray_overhead"] = ray_overhead(a)
        print(json.dumps(out["ray_overhead"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
