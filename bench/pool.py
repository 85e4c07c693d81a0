"""Pool benchmarks (issue 15): scaling over 1 and 2 instances, and the map's overhead per item.

    .venv/bin/python -P bench/pool.py [--items 8] [--work 0.4] [--rounds 3] [--batch 300] [--batches 10] [--json F]

Launches two headless Blenders with ``Pool.start(2)`` (the installed wheels: run ``bash scripts/setup.sh``
first), then, in the same run, so that the ratios share the machine's noise:

- **scaling**: ``--items`` CPU-bound, single-threaded items (a pure-Python loop of about ``--work`` seconds
  each) mapped over a pool of one of the two instances, then over both; rounds alternate 1, 2, 1, 2...
  Ratio = median time with 1 / median time with 2 (target >= 1.7 on 2 cores).
- **overhead**: tiny items (``result = item * 2``) through ``Pool.map`` over one instance, against a plain
  ``Client`` loop sending the same code with ``item`` bound the same way (one ``execute`` each), in
  ``--batches`` alternating batches of ``--batch`` items. Ratio = median per-item time of the map batches /
  of the loop batches (target <= 1.1); the quartiles of the per-pair ratios show the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from bld_remote import Client, Pool

WORK = """
import time
t = time.perf_counter()
n = 0
while time.perf_counter() - t < item["work"]:
    for i in range(1000):
        n += i
result = n
"""
SMALL = "result = item * 2"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--work", type=float, default=0.4)
    ap.add_argument("--batch", type=int, default=300)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Linux {platform.release()}",
        "python": sys.version.split()[0],
        "args": vars(a),
    }
    with Pool.start(2) as owned:
        (h1, p1), (h2, p2) = [(i["host"], i["port"]) for i in owned.instances]
        one, two = Pool([(h1, p1)]), Pool([(h1, p1), (h2, p2)])
        heavy = [{"i": i, "work": a.work} for i in range(a.items)]
        # Warm both (first-run imports, the compile cache).
        two.map(WORK, [{"i": 0, "work": 0.01}] * 4)
        t1, t2 = [], []
        for _ in range(a.rounds):
            t1.append(timed(lambda: one.map(WORK, heavy)))
            t2.append(timed(lambda: two.map(WORK, heavy)))
        out["scaling"] = {
            "one_s": [round(t, 3) for t in t1],
            "two_s": [round(t, 3) for t in t2],
            "ratio": round(statistics.median(t1) / statistics.median(t2), 3),
        }

        # Interleaved in short batches (map, loop, map, loop...) so that both see the same load.
        small = list(range(a.batch))
        client = Client(host=h1, port=p1, timeout=60)

        def loop() -> None:
            for item in small:
                client.execute(f"item = {json.dumps(item)}\n{SMALL}").result

        one.map(SMALL, small)
        loop()
        tm, tl = [], []
        for _ in range(a.batches):
            tm.append(timed(lambda: one.map(SMALL, small)) / len(small))
            tl.append(timed(loop) / len(small))
        per_map = statistics.median(tm) * 1e3
        per_loop = statistics.median(tl) * 1e3
        out["overhead"] = {
            "map_ms_per_item": round(per_map, 4),
            "loop_ms_per_item": round(per_loop, 4),
            "ratio": round(per_map / per_loop, 3),
            "batch_ratios_p25_p75": [
                round(q, 3) for q in statistics.quantiles([m / lp for m, lp in zip(tm, tl)], n=4)[::2]
            ],
            "map_two_ms_per_item": round(
                timed(lambda: two.map(SMALL, small * 4)) / (4 * len(small)) * 1e3, 4
            ),
        }
        client.close()
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
