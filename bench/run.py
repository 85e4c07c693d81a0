"""bld_remote benchmarks against a same-run baseline: ``python bench/run.py [--quick] [--json FILE]``.

Starts a real headless Blender serving bld_remote from the built wheel (the newest ``dist/*.whl``, or
``--wheel``/``$BLD_REMOTE_WHEEL``), and in the same invocation a plain-Python threaded echo server
(bench/echo_server.py) as the baseline, and an emulation of the reference projects' approach. Every
measurement runs baseline and subject interleaved (A B A B ...), because this machine is shared and
noisy: compare the ratios, not the absolute times. Prints Markdown tables (docs/BENCHMARKS.md is made from
them). ``--quick`` finishes in well under 2 minutes; the default takes about 4.

The client side is Python for both servers (the same code, the same cost), and requests end with a
newline (harmless to bld_remote; the echo server needs it). Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import BlenderProcess, blender_env, built_wheel, runtime_argv  # noqa: E402

MB = 1 << 20
# The service plus one bench-only command: a handler that does nothing, so the main thread's cost per
# request is the service's own (pump, conversion, dispatch) and nothing else.
SERVE_BENCH = (
    "import bld_remote\n"
    "from bld_remote import commands\n"
    "commands.HANDLERS['bench_noop'] = lambda params: None\n"
    "bld_remote.start_mcp_service(port=0)\n"
    "bld_remote.keep_alive()\n"
)


def req(command: str, params: dict | None = None, rid: int | None = None) -> bytes:
    obj: dict = {"type": command}
    if params is not None:
        obj["params"] = params
    if rid is not None:
        obj["id"] = rid
    return json.dumps(obj).encode() + b"\n"


PING = req("ping")
SCENE = req("get_scene_info")
PASS = req("execute_code", {"code": "pass"})
NOOP = req("bench_noop")


# --- processes under test ------------------------------------------------------------------------
class Echo:
    def __init__(self, mode: str = "echo"):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--mode", mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "listening" not in line:
            raise RuntimeError(f"echo server did not start: {line!r}")
        self.port = int(line.split(":")[1].split()[0])
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def start_blender(wheel: Path, scripts: Path) -> BlenderProcess:
    addons = scripts / "addons"
    addons.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("bld_remote/"):
                zf.extract(name, addons)
    b = BlenderProcess(runtime_argv(SERVE_BENCH), blender_env(scripts))
    b.wait_ready()
    return b


# --- client primitives ---------------------------------------------------------------------------
def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def roundtrip(s: socket.socket, payload: bytes) -> int:
    """Send one request, read until its reply's newline (the only raw newline in a JSON line)."""
    s.sendall(payload)
    data = s.recv(1 << 16)
    n = len(data)
    while not data.endswith(b"\n"):
        data = s.recv(1 << 22)
        if not data:
            raise ConnectionError("closed mid-reply")
        n += len(data)
    return n


def latency_persistent(subjects: list[tuple[str, int, bytes]], n: int) -> dict[str, list[float]]:
    """Round trips on one persistent connection per subject, interleaved request by request (the order
    rotates each time), so every subject sees the same moment of this noisy machine."""
    conns = [connect(port) for _, port, _ in subjects]
    try:
        for c, (_, _, payload) in zip(conns, subjects):
            for _ in range(20):
                roundtrip(c, payload)
        out: dict[str, list[float]] = {name: [] for name, _, _ in subjects}
        k = len(subjects)
        for i in range(n):
            for j in range(k):
                c, (name, _, payload) = conns[(i + j) % k], subjects[(i + j) % k]
                t0 = time.perf_counter()
                roundtrip(c, payload)
                out[name].append(time.perf_counter() - t0)
        return out
    finally:
        for c in conns:
            c.close()


def latency_per_connection(subjects: list[tuple[str, int, bytes]], n: int) -> dict[str, list[float]]:
    """Connect, one round trip, close; interleaved like latency_persistent."""
    out: dict[str, list[float]] = {name: [] for name, _, _ in subjects}
    k = len(subjects)
    for i in range(n):
        for j in range(k):
            name, port, payload = subjects[(i + j) % k]
            t0 = time.perf_counter()
            with connect(port) as s:
                roundtrip(s, payload)
            out[name].append(time.perf_counter() - t0)
    return out


def _tp_worker(port: int, payload: bytes, barrier, duration: float, results) -> None:
    s = connect(port)
    for _ in range(5):
        roundtrip(s, payload)
    barrier.wait()
    end = time.perf_counter() + duration
    count = 0
    while time.perf_counter() < end:
        roundtrip(s, payload)
        count += 1
    results.put(count)
    s.close()


def throughput(port: int, payload: bytes, clients: int, duration: float) -> float:
    """Requests/s from `clients` processes, each one request at a time on its own connection."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_tp_worker, args=(port, payload, barrier, duration, results))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=60)
    total = sum(results.get(timeout=duration + 60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return total / duration


def pipelined(port: int, command: str, params: dict | None, window: int, duration: float) -> float:
    """Requests/s on one connection with `window` requests (with ids) in flight."""
    body = json.dumps({"type": command, **({"params": params} if params else {})})[1:]
    make = lambda i: b'{"id":%d,' % i + body.encode() + b"\n"  # noqa: E731
    with connect(port) as s:
        sent = received = 0
        s.sendall(b"".join(make(i) for i in range(window)))
        sent = window
        t0 = time.perf_counter()
        end = t0 + duration
        while received < sent:
            data = s.recv(1 << 20)
            if not data:
                raise ConnectionError("closed")
            k = data.count(b"\n")
            received += k
            if k and time.perf_counter() < end:
                s.sendall(b"".join(make(sent + i) for i in range(k)))
                sent += k
        return received / (time.perf_counter() - t0)


_RECV_BUF = bytearray(8 * MB)


def timed_big(port: int, payload: bytes) -> tuple[float, int, bytes]:
    """Seconds from the first request byte sent to the reply's last byte received; reply size; its ends
    (the whole reply when small). Reads into one reused buffer, so the client's own cost stays small."""
    view = memoryview(_RECV_BUF)
    with connect(port) as s:
        roundtrip(s, PING)
        t0 = time.perf_counter()
        s.sendall(payload)
        total = 0
        head = b""
        while True:
            n = s.recv_into(view)
            if not n:
                raise ConnectionError("closed mid-reply")
            if total < 4096:
                head += bytes(view[: min(n, 4096)])
            total += n
            if view[n - 1] == 10:
                break
        elapsed = time.perf_counter() - t0
        tail = bytes(view[max(0, n - 300) : n])
        return elapsed, total, head if total <= 4096 else head[:300] + b" ... " + tail


# --- /proc readings ------------------------------------------------------------------------------
def thread_runtime_ns(pid: int, tid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


def thread_switches(pid: int, tid: int) -> tuple[int, int]:
    vol = nonvol = 0
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches"):
            nonvol = int(line.split()[1])
    return vol, nonvol


HZ = os.sysconf("SC_CLK_TCK")


def process_ticks(pid: int) -> int:
    """CPU time of the whole process (all threads, living and exited) in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def process_snapshot(pid: int) -> dict:
    """CPU ticks of the whole process, and per thread: name, switches."""
    ticks = process_ticks(pid)
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            threads[int(task.name)] = (name, *thread_switches(pid, int(task.name)))
        except OSError:
            pass
    return {"t": time.monotonic(), "ticks": ticks, "threads": threads}


def idle_delta(a: dict, b: dict, pid: int) -> dict:
    hz = os.sysconf("SC_CLK_TCK")
    secs = b["t"] - a["t"]
    per_thread = {}
    for tid, (name, vol, nonvol) in b["threads"].items():
        if tid in a["threads"]:
            _, v0, n0 = a["threads"][tid]
            if (vol - v0) + (nonvol - n0):
                per_thread[f"{name}/{tid}"] = (vol - v0) + (nonvol - n0)
    main = b["threads"].get(pid), a["threads"].get(pid)
    main_wakeups = (main[0][1] + main[0][2] - main[1][1] - main[1][2]) if all(main) else None
    return {
        "seconds": secs,
        "cpu_percent": 100.0 * (b["ticks"] - a["ticks"]) / hz / secs,
        "main_thread_wakeups": main_wakeups,
        "process_wakeups": sum(per_thread.values()),
        "threads": len(b["threads"]),
        "waking_threads": per_thread,
    }


def main_thread_cost(pid: int, port: int, payload: bytes, n: int, pipelined_: bool) -> dict:
    """Main-thread CPU time (schedstat, ns) and wake-ups per request over n requests."""
    with connect(port) as s:
        for _ in range(50):
            roundtrip(s, payload)
        ns0, sw0 = thread_runtime_ns(pid, pid), sum(thread_switches(pid, pid))
        t0 = time.perf_counter()
        if pipelined_:
            sender = threading.Thread(target=s.sendall, args=(payload * n,))
            sender.start()
            got = 0
            while got < n:
                data = s.recv(1 << 20)
                if not data:
                    raise ConnectionError("closed")
                got += data.count(b"\n")
            sender.join()
        else:
            for _ in range(n):
                roundtrip(s, payload)
        wall = time.perf_counter() - t0
        ns1, sw1 = thread_runtime_ns(pid, pid), sum(thread_switches(pid, pid))
    return {
        "us_per_request": (ns1 - ns0) / n / 1000,
        "wakeups_per_request": (sw1 - sw0) / n,
        "requests_per_s": n / wall,
    }


# --- statistics and output -----------------------------------------------------------------------
def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(x: float) -> str:
    return f"{x * 1000:.3f}"


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.data: dict = {}
        self.verdicts: list[tuple[str, str, str, str, bool | None, str]] = []

    def p(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.p("| " + " | ".join(header) + " |")
        self.p("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            self.p("| " + " | ".join(r) + " |")
        self.p()

    def verdict(self, target: str, value: str, baseline: str, ratio: str, met: bool | None, note: str = ""):
        self.verdicts.append((target, value, baseline, ratio, met, note))


# --- the sections --------------------------------------------------------------------------------
def bench_latency(rep: Report, echo: Echo, bld: BlenderProcess, cfg: dict) -> None:
    subjects = [
        ("echo: ping", echo.port, PING),
        ("bld_remote: ping", bld.port, PING),
        ("bld_remote: get_scene_info", bld.port, SCENE),
        ('bld_remote: execute_code("pass")', bld.port, PASS),
    ]
    for mode, fn, n in (
        ("persistent connection", latency_persistent, cfg["lat_n"]),
        ("a connection per request", latency_per_connection, cfg["lat_conn_n"]),
    ):
        samples = fn(subjects, n)
        base50 = pct(samples["echo: ping"], 0.5)
        rows = []
        for name, _, _ in subjects:
            p50, p99 = pct(samples[name], 0.5), pct(samples[name], 0.99)
            rows.append([name, ms(p50), ms(p99), f"{p50 / base50:.2f}×", str(len(samples[name]))])
            rep.data[f"latency/{mode}/{name}"] = {"p50": p50, "p99": p99, "n": len(samples[name])}
        rep.p(f"### Round trip, {mode} (ms; ratio = p50 / echo ping p50)")
        rep.p()
        rep.table(["request", "p50", "p99", "ratio", "samples"], rows)
        if mode == "persistent connection":
            for name, limit, label in (
                ("bld_remote: ping", 1.0, "ping p50 ≤ 1× echo"),
                ("bld_remote: get_scene_info", 2.0, "get_scene_info p50 ≤ 2× echo ping"),
                ('bld_remote: execute_code("pass")', 2.0, 'execute_code("pass") p50 ≤ 2× echo ping'),
            ):
                p50 = pct(samples[name], 0.5)
                rep.verdict(
                    label, f"{ms(p50)} ms", f"{ms(base50)} ms", f"{p50 / base50:.2f}×", p50 / base50 <= limit
                )


def bench_throughput(rep: Report, echo: Echo, bld: BlenderProcess, cfg: dict) -> None:
    subjects = [
        ("echo: ping", echo.port, PING),
        ("bld_remote: ping", bld.port, PING),
        ('bld_remote: execute_code("pass")', bld.port, PASS),
    ]
    rows = []
    for clients in (1, 8, 32):
        got: dict[str, list[float]] = {name: [] for name, _, _ in subjects}
        for r in range(cfg["tp_rounds"]):
            order = subjects if r % 2 == 0 else list(reversed(subjects))
            for name, port, payload in order:
                got[name].append(throughput(port, payload, clients, cfg["tp_seconds"]))
        base = statistics.median(got["echo: ping"])
        for name, _, _ in subjects:
            v = statistics.median(got[name])
            rep.data[f"throughput/{clients}/{name}"] = got[name]
            rows.append([str(clients), name, f"{v:,.0f}", f"{v / base:.2f}×"])
        if clients == 8:
            v = statistics.median(got["bld_remote: ping"])
            rep.verdict(
                "8 client processes: ping ≥ echo",
                f"{v:,.0f}/s",
                f"{base:,.0f}/s",
                f"{v / base:.2f}×",
                v >= base,
            )
            v = statistics.median(got['bld_remote: execute_code("pass")'])
            rep.verdict(
                '8 client processes: execute_code("pass") ≥ ⅓ echo',
                f"{v:,.0f}/s",
                f"{base:,.0f}/s",
                f"{v / base:.2f}×",
                v >= base / 3,
            )
    rep.p("### Throughput: N client processes, one request at a time each (requests/s; ratio to echo ping)")
    rep.p()
    rep.table(["clients", "request", "req/s (median)", "ratio"], rows)

    rows = []
    window = 64
    subjects_p = [
        ("echo: ping", echo.port, "ping", None),
        ("bld_remote: ping", bld.port, "ping", None),
        ('bld_remote: execute_code("pass")', bld.port, "execute_code", {"code": "pass"}),
        ("bld_remote: get_scene_info", bld.port, "get_scene_info", None),
    ]
    got = {name: [] for name, *_ in subjects_p}
    for r in range(cfg["tp_rounds"]):
        order = subjects_p if r % 2 == 0 else list(reversed(subjects_p))
        for name, port, command, params in order:
            got[name].append(pipelined(port, command, params, window, cfg["tp_seconds"]))
    base = statistics.median(got["echo: ping"])
    for name, *_ in subjects_p:
        v = statistics.median(got[name])
        rep.data[f"pipelined/{name}"] = got[name]
        rows.append([name, f"{v:,.0f}", f"{v / base:.2f}×"])
    rep.p(f"### Pipelined: one connection, {window} requests with ids in flight (requests/s)")
    rep.p()
    rep.table(["request", "req/s (median)", "ratio to echo ping"], rows)


EXEC_REQUEST = 'bld_remote: execute_code request (code = "#xxx…"), end to end'
EXEC_INGEST = "bld_remote: the same, minus the handler's compile + run (`duration`)"
PERSIST = "bld_remote: put_persist_data request (network thread only)"
ECHO_REQUEST = "echo: request (parsed, small reply)"
ECHO_REPLY = "echo: reply of N bytes"
PRINT_PLAIN = "bld_remote: execute_code printing N bytes (`'x' * N`), end to end"
PRINT_LINES = "bld_remote: execute_code printing N bytes in 100-byte lines, end to end"
MINUS_RUN = "bld_remote: the same, minus the handler's run (`duration`)"

_DURATION = re.compile(rb'"duration":\s*([0-9.eE+-]+)')


def handler_duration(ends: bytes) -> float:
    """The `duration` (seconds of compile + run in Blender) an execute_code reply reports, found in the
    reply's ends (big replies are not kept whole), or 0."""
    m = _DURATION.search(ends)
    return float(m.group(1)) if m else 0.0


def bench_payloads(rep: Report, echo: Echo, bld: BlenderProcess, cfg: dict) -> None:
    sizes = cfg["sizes_mb"]

    # Requests are N MB on the wire minus 256 bytes: the default request limit is exactly 64 MiB.
    def exec_comment(n: int) -> bytes:
        return req("execute_code", {"code": "#" + "x" * (n - 256)})

    def persist(n: int) -> bytes:
        return req("put_persist_data", {"key": "bench", "data": "x" * (n - 256)})

    def echo_reply(n: int) -> bytes:
        return req("blob", {"reply_bytes": n})

    def exec_print(n: int) -> bytes:
        return req("execute_code", {"code": f"import sys\nsys.stdout.write('x' * {n})"})

    def exec_print_lines(n: int) -> bytes:
        # Real output has newlines, which JSON must escape: the reply cannot be sent from the output's
        # own buffer as plain text is.
        return req("execute_code", {"code": f"import sys\nsys.stdout.write(('x' * 99 + '\\n') * {n // 100})"})

    kinds = [
        ("request", ECHO_REQUEST, echo.port, exec_comment),
        ("request", EXEC_REQUEST, bld.port, exec_comment),
        ("request", PERSIST, bld.port, persist),
        ("reply", ECHO_REPLY, echo.port, echo_reply),
        ("reply", PRINT_PLAIN, bld.port, exec_print),
        ("reply", PRINT_LINES, bld.port, exec_print_lines),
    ]
    # Series derived from an end-to-end one by subtracting the `duration` its replies report: what the
    # service itself spends (reading, splitting, parsing, handing over; or capturing, encoding, writing).
    derived = {
        EXEC_REQUEST: EXEC_INGEST,
        PRINT_PLAIN: f"{MINUS_RUN} (plain)",
        PRINT_LINES: f"{MINUS_RUN} (lines)",
    }
    times: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    wire: dict[tuple[str, int], int] = {}
    for size in sizes:
        n = size * MB
        payloads = {name: make(n) for _, name, _, make in kinds}
        # Small sizes are cheap and noisier: more samples for them (the linearity check divides by 4 MB).
        for r in range(cfg["payload_reps"] * (1 if size >= 64 else 3)):
            order = kinds if r % 2 == 0 else list(reversed(kinds))
            for _, name, port, _ in order:
                # Warm: each sample follows an unmeasured request of its own kind and size. This VM hands
                # memory freed in large blocks back to its host after ~2 s (virtio-balloon free page
                # reporting), and the next 64 MB request then pays for the host faulting it back in
                # (2-3x the time; measured by `bench_cold`). Warm, every size and both servers are
                # measured in the same memory state.
                timed_big(port, payloads[name])
                ticks0 = process_ticks(bld.pid)
                t, total, ends = timed_big(port, payloads[name])
                if port == bld.port:
                    # Blender's CPU for this request, all threads (after its connection has closed and
                    # its buffers are freed).
                    time.sleep(0.05)
                    cpu.setdefault((name, size), []).append((process_ticks(bld.pid) - ticks0) / HZ)
                if b'"success"' not in ends:
                    raise RuntimeError(f"{name} {size} MB failed: {ends!r}")
                times.setdefault((name, size), []).append(t)
                wire[(name, size)] = total
                if name in derived:
                    times.setdefault((derived[name], size), []).append(t - handler_duration(ends))
                    wire[(derived[name], size)] = total
        del payloads
    shown = {
        "request": [ECHO_REQUEST, EXEC_REQUEST, EXEC_INGEST, PERSIST],
        "reply": [ECHO_REPLY, PRINT_PLAIN, derived[PRINT_PLAIN], PRINT_LINES, derived[PRINT_LINES]],
    }
    med = lambda name, size: statistics.median(times[(name, size)])  # noqa: E731
    for direction, names in shown.items():
        rows = []
        base_name = names[0]
        for name in names:
            for size in sizes:
                t, tb = med(name, size), med(base_name, size)
                rep.data[f"payload/{name}/{size}"] = {
                    "seconds": times[(name, size)],
                    "reply_bytes": wire[(name, size)],
                }
                rows.append(
                    [
                        name,
                        str(size),
                        f"{t * 1000:,.1f}",
                        f"{size / t:,.0f}",
                        f"{tb / t:.2f}×",
                        f"{wire[(name, size)] / MB:,.1f}",
                    ]
                )
        rep.p(
            f"### {'Requests' if direction == 'request' else 'Replies'} of N MB (one connection; time from first byte sent to last byte "
            "received; MB/s = N / time; ratio = MB/s / echo MB/s)"
        )
        rep.p()
        rep.table(["what", "MB", "ms (median)", "MB/s", "ratio", "reply MB on the wire"], rows)

    # CPU per request: sums over the samples (ticks are 10 ms; a 4 MB request takes a few).
    rows = []
    for name in [k[1] for k in kinds if k[2] == bld.port]:
        per = {size: sum(cpu[(name, size)]) / len(cpu[(name, size)]) for size in sizes}
        rep.data[f"payload-cpu/{name}"] = per
        rows.append(
            [name]
            + [f"{per[size] * 1000:,.1f}" for size in sizes]
            + [f"{per[64] / per[4]:.1f}×" if 64 in per and 4 in per and per[4] else "–"]
        )
    rep.p("### Blender's CPU per request, all threads (ms; `/proc/PID/stat`, mean over the measured samples)")
    rep.p()
    rep.table(["what"] + [f"{size} MB" for size in sizes] + ["64 MB / 4 MB"], rows)
    if not (max(sizes) == 64 and 4 in sizes and 16 in sizes):
        return
    # Blender's own allocator, for reference: Python making a str of N MB inside Blender (what handing
    # a request's code to Python costs, besides the service). jemalloc serves >= 8 MiB from fresh pages.
    code = (
        "import json, time, statistics\nout = {}\nfor mb in %r:\n    b = b'x' * (mb << 20)\n    ts = []\n"
        "    for _ in range(7):\n        time.sleep(0.1)\n        t = time.perf_counter(); s = b.decode()\n"
        "        ts.append(time.perf_counter() - t); del s\n    out[mb] = statistics.median(ts)\n"
        "print(json.dumps(out))\n"
    ) % (tuple(sizes),)
    with connect(bld.port) as conn:
        conn.sendall(req("execute_code", {"code": code}))
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed mid-reply")
            reply += chunk
    pystr = {int(k): v for k, v in json.loads(json.loads(reply)["result"]["result"]).items()}
    rep.data["payload/python-str"] = pystr
    rep.p("### Python making a str of N MB inside Blender (reference: Blender's allocator, not the service)")
    rep.p()
    rep.table(
        ["what"] + [f"{size} MB" for size in sizes] + ["64 MB / 4 MB"],
        [
            ["`bytes.decode()` of N MB, ms (median of 7)"]
            + [f"{pystr[size] * 1000:,.2f}" for size in sizes]
            + [f"{pystr[64] / pystr[4]:.1f}×"]
        ],
    )
    c64, c4 = (sum(cpu[(PERSIST, n)]) / len(cpu[(PERSIST, n)]) for n in (64, 4))
    rep.verdict(
        "64 MB request's CPU in Blender ≤ ~16× the 4 MB one (put_persist_data: the service alone)",
        f"{c64 * 1000:,.0f} ms",
        f"4 MB: {c4 * 1000:,.1f} ms",
        f"{c64 / c4:.1f}×",
        c64 / c4 <= 16 * 1.15,
    )
    # Cold: the same 64 MB requests after idle. After 3 s, the memory either server freed has gone back
    # to the VM's host (see the warm-up note above); 12 s shows whether anything changes with a longer
    # idle. Not part of any verdict: it is this machine's cost, and the price of giving memory back.
    rows = []
    for name, port, make in ((ECHO_REQUEST, echo.port, exec_comment), (PERSIST, bld.port, persist)):
        payload = make(64 * MB)
        warm = med(name, 64)
        row = [name, f"{warm * 1000:,.0f}"]
        for idle in (3.0, 12.0):
            cold = []
            for _ in range(cfg["cold_reps"]):
                time.sleep(idle)
                cold.append(timed_big(port, payload)[0])
            rep.data[f"payload-cold/{name}/64/{idle:.0f}s"] = {"seconds": cold}
            row += [f"{statistics.median(cold) * 1000:,.0f}", f"{statistics.median(cold) / warm:.1f}×"]
        rows.append(row)
    rep.p(
        "### 64 MB requests after idle (3 s and 12 s: memory freed by either server is back with the VM host)"
    )
    rep.p()
    rep.table(
        ["what", "warm ms (table above)", "after 3 s ms", "/ warm", "after 12 s ms", "/ warm"],
        rows,
    )
    tb = med(ECHO_REQUEST, 64)
    for label, name in (
        ("execute_code without compile + run", EXEC_INGEST),
        ("put_persist_data: reading + parsing only", PERSIST),
    ):
        t = med(name, 64)
        rep.verdict(
            f"64 MB request ingested ≥ echo's speed ({label})",
            f"{64 / t:,.0f} MB/s",
            f"{64 / tb:,.0f} MB/s",
            f"{tb / t:.2f}×",
            t <= tb,
        )
    t = med(EXEC_REQUEST, 64)
    rep.verdict(
        "64 MB execute_code request end to end (incl. Python compiling 64 MB), for reference",
        f"{64 / t:,.0f} MB/s",
        f"{64 / tb:,.0f} MB/s",
        f"{tb / t:.2f}×",
        None,
        "compile() of the source is Python's own cost, not the service's",
    )
    te = med(ECHO_REPLY, 64)
    for name in (PRINT_PLAIN, PRINT_LINES):
        tr = med(name, 64)
        rep.verdict(
            f"64 MB reply ≥ 150 MB/s ({name.split(': ', 1)[1]})",
            f"{64 / tr:,.0f} MB/s",
            f"echo {64 / te:,.0f} MB/s",
            f"{te / tr:.2f}× echo",
            64 / tr >= 150,
        )
    # Linear: the service's own cost of 64 MB within 4.6× its cost of 16 MB (4× plus 15 % for noise; the
    # issue's target), 64 / 4 MB shown too. End-to-end
    # figures include Python's own work (compiling the source, running the code that makes the output),
    # which is shown for reference.
    e_req, e_rep = med(ECHO_REQUEST, 64) / med(ECHO_REQUEST, 4), med(ECHO_REPLY, 64) / med(ECHO_REPLY, 4)
    # execute_code's code becomes a Python str on the main thread: Blender's allocator (jemalloc) hands
    # out fresh pages for each 64 MB str but warm ones for 4 MB, so that step alone scales ~35x (the
    # `bytes.decode()` table, same process, same run). The service's own part is the rest.
    py_str = {n: pystr[n] for n in (4, 16, 64)}
    for label, name, own, echo_ratio, minus in (
        ("request (put_persist_data)", PERSIST, True, e_req, None),
        (
            "request (execute_code minus Python's part: making the code's str, compile, run)",
            EXEC_INGEST,
            True,
            e_req,
            py_str,
        ),
        ("reply (plain output, minus run)", derived[PRINT_PLAIN], True, e_rep, None),
        ("reply (output in lines, minus run)", derived[PRINT_LINES], True, e_rep, None),
        (
            "request (execute_code minus compile + run, with Python making the str)",
            EXEC_INGEST,
            False,
            e_req,
            None,
        ),
        ("request (execute_code end to end)", EXEC_REQUEST, False, e_req, None),
        ("reply (plain output end to end)", PRINT_PLAIN, False, e_rep, None),
        ("reply (output in lines end to end)", PRINT_LINES, False, e_rep, None),
    ):
        t64, t16, t4 = (med(name, n) - (minus[n] if minus else 0.0) for n in (64, 16, 4))
        note = f"64 MB / 4 MB: {t64 / t4:.1f}× (16 if linear); echo's own 64 / 4 MB: {echo_ratio:.1f}×"
        if minus:
            note += (
                f"; Python making the str (subtracted): {minus[64] * 1000:,.0f} ms at 64 MB, "
                f"{minus[4] * 1000:,.1f} ms at 4 MB ({minus[64] / minus[4]:.0f}×)"
            )
        elif name in (EXEC_INGEST, EXEC_REQUEST):
            note += (
                f"; includes Python making the code's str: {py_str[64] * 1000:,.0f} ms at 64 MB, "
                f"{py_str[4] * 1000:,.1f} ms at 4 MB"
            )
        rep.verdict(
            f"64 MB {label} ≤ 4.6× the 16 MB one (linear)" + ("" if own else ", for reference"),
            f"{t64 * 1000:,.0f} ms",
            f"16 MB: {t16 * 1000:,.1f} ms",
            f"{t64 / t16:.2f}×",
            (t64 / t16 <= 4 * 1.15) if own else None,
            note,
        )


def bench_main_thread(rep: Report, bld: BlenderProcess, cfg: dict) -> None:
    n = cfg["mt_n"]
    rows = []
    for label, payload in (
        ("bench_noop (handler does nothing)", NOOP),
        ('execute_code("pass")', PASS),
        ("get_scene_info", SCENE),
    ):
        for mode, pipe in (("pipelined", True), ("one at a time", False)):
            k = n if pipe else max(500, n // 5)
            runs = [main_thread_cost(bld.pid, bld.port, payload, k, pipe) for _ in range(cfg["mt_reps"])]
            us = statistics.median(r["us_per_request"] for r in runs)
            wk = statistics.median(r["wakeups_per_request"] for r in runs)
            rate = statistics.median(r["requests_per_s"] for r in runs)
            rep.data[f"main_thread/{label}/{mode}"] = runs
            rows.append([label, mode, f"{us:.1f}", f"{wk:.2f}", f"{rate:,.0f}"])
            if label.startswith("bench_noop") and pipe:
                rep.verdict(
                    "≤ 20 µs main-thread time per no-op request",
                    f"{us:.1f} µs",
                    "20 µs",
                    f"{us / 20:.2f}×",
                    us <= 20,
                )
    rep.p(
        f"### Main-thread cost per request ({n} requests on one connection; Blender's main thread's "
        "own CPU time from /proc/PID/task/PID/schedstat)"
    )
    rep.p()
    rep.table(
        ["request", "sent", "µs of main-thread CPU / request", "main-thread wake-ups / request", "req/s"],
        rows,
    )


def bench_fairness(rep: Report, bld: BlenderProcess, cfg: dict) -> None:
    """A fresh client's get_scene_info while another connection keeps `window` execute_code jobs of
    `job_ms` each queued: with round-robin lanes it waits for the job running now, not for the queue."""
    job_s, window, n = cfg["fair_job_ms"] / 1000, cfg["fair_window"], cfg["fair_n"]
    job = req("execute_code", {"code": f"import time; time.sleep({job_s})"})

    def probe(count: int) -> list[float]:
        out = []
        with connect(bld.port) as s:
            roundtrip(s, PING)
            for i in range(count):
                t0 = time.perf_counter()
                roundtrip(s, SCENE)
                out.append(time.perf_counter() - t0)
                # Spread the probes over the job's phase (not in lockstep with the flood's jobs).
                time.sleep(job_s * ((i * 7919) % 13) / 13)
        return out

    idle = probe(n)
    with connect(bld.port) as s:
        one_job = []
        for _ in range(max(5, n // 10)):
            t0 = time.perf_counter()
            roundtrip(s, job)
            one_job.append(time.perf_counter() - t0)
    stop = threading.Event()
    flood_replies = [0]

    def flood() -> None:
        body = job[1:]
        make = lambda i: b'{"id":%d,' % i + body  # noqa: E731
        with connect(bld.port) as s:
            s.sendall(b"".join(make(i) for i in range(window)))
            sent = window
            while not stop.is_set():
                data = s.recv(1 << 20)
                if not data:
                    return
                k = data.count(b"\n")
                flood_replies[0] += k
                s.sendall(b"".join(make(sent + i) for i in range(k)))
                sent += k

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while flood_replies[0] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    flooded = probe(n)
    stop.set()
    t.join(timeout=30)
    job_med = statistics.median(one_job)
    extra_p50 = statistics.median(flooded) - statistics.median(idle)
    extra_p95 = pct(flooded, 0.95) - statistics.median(idle)
    rep.data["fairness"] = {"idle": idle, "flooded": flooded, "one_job": one_job, "window": window}
    rep.p(
        f"### Fairness: a fresh client's get_scene_info while another connection keeps {window} "
        f"execute_code jobs of {cfg['fair_job_ms']} ms queued ({n} probes; ms)"
    )
    rep.p()
    rep.table(
        ["", "p50", "p95", "max"],
        [
            ["get_scene_info, idle service", ms(statistics.median(idle)), ms(pct(idle, 0.95)), ms(max(idle))],
            ["one flood job alone (round trip)", ms(job_med), ms(pct(one_job, 0.95)), ms(max(one_job))],
            [
                "get_scene_info while flooded",
                ms(statistics.median(flooded)),
                ms(pct(flooded, 0.95)),
                ms(max(flooded)),
            ],
        ],
    )
    rep.p(
        f"Extra wait while flooded: p50 {ms(extra_p50)} ms, p95 {ms(extra_p95)} ms; one job {ms(job_med)} ms. "
        f"First-in first-out, the probe would wait for the whole window: about {window * job_s * 1000:.0f} ms."
    )
    rep.p()
    rep.verdict(
        "fresh client's wait while another floods ≤ about one job (p95 extra ≤ 1.25 × one job)",
        f"{ms(extra_p95)} ms",
        f"{ms(job_med)} ms",
        f"{extra_p95 / job_med:.2f}×",
        extra_p95 <= 1.25 * job_med,
    )


def bench_idle(rep: Report, bld: BlenderProcess, ref: Echo, cfg: dict) -> None:
    secs = cfg["idle_seconds"]
    rows = []
    for label, hold in (("no client connected", False), ("one idle client connection open", True)):
        conn = connect(bld.port) if hold else None
        if conn is not None:
            roundtrip(conn, PING)
            roundtrip(conn, PASS)
        time.sleep(1.0)
        a, ra = process_snapshot(bld.pid), process_snapshot(ref.pid)
        time.sleep(secs)
        b, rb = process_snapshot(bld.pid), process_snapshot(ref.pid)
        if conn is not None:
            conn.close()
        d, rd = idle_delta(a, b, bld.pid), idle_delta(ra, rb, ref.pid)
        rep.data[f"idle/{label}"] = d
        rep.data[f"idle/reference/{label}"] = rd
        waking = ", ".join(f"{k}: {v}" for k, v in sorted(d["waking_threads"].items())) or "none"
        rows.append(
            [
                "bld_remote in Blender, " + label,
                f"{d['seconds']:.1f}",
                f"{d['cpu_percent']:.2f}",
                str(d["main_thread_wakeups"]),
                str(d["process_wakeups"]),
                waking,
            ]
        )
        if not hold:
            rows.append(
                [
                    "reference emulation (sleep(0.05) loop)",
                    f"{rd['seconds']:.1f}",
                    f"{rd['cpu_percent']:.2f}",
                    str(rd["main_thread_wakeups"]),
                    str(rd["process_wakeups"]),
                    "",
                ]
            )
            rep.verdict(
                "zero wake-ups idle headless (Blender's main thread)",
                f"{d['main_thread_wakeups']} in {d['seconds']:.0f} s",
                f"reference: {rd['main_thread_wakeups']}",
                "",
                d["main_thread_wakeups"] == 0,
                f"whole process: {d['process_wakeups']}",
            )
    rep.p(
        f"### Idle, headless ({secs:.0f} s windows; CPU from /proc/PID/stat, wake-ups = voluntary + "
        "involuntary context switches from /proc/PID/task/TID/status)"
    )
    rep.p()
    rep.table(
        ["process", "s", "CPU %", "main-thread wake-ups", "all threads' wake-ups", "which threads woke"], rows
    )


def bench_reference(rep: Report, echo: Echo, ref: Echo, bld: BlenderProcess, cfg: dict) -> None:
    rows = []
    n = cfg["ref_n"]
    for name, port in (("reference emulation", ref.port), ("echo", echo.port), ("bld_remote", bld.port)):
        s = latency_persistent([(name, port, req("ping") if name != "bld_remote" else SCENE)], n)[name]
        rows.append(
            [
                f"{name}: {'get_scene_info' if name == 'bld_remote' else 'request'} p50",
                f"{ms(pct(s, 0.5))} ms",
            ]
        )
        rep.data[f"reference/latency/{name}"] = pct(s, 0.5)
    for size in cfg["ref_sizes_mb"]:
        payload = req("execute_code", {"code": "#" + "x" * (size * MB - 256)}).rstrip(b"\n")
        for name, port in (("reference emulation", ref.port), ("bld_remote", bld.port)):
            t, _, first = timed_big(port, payload)
            rows.append([f"{name}: {size} MB request", f"{t * 1000:,.0f} ms ({size / t:,.1f} MB/s)"])
            rep.data[f"reference/request/{name}/{size}"] = t
    rep.p(
        "### The reference projects' approach, emulated (bench/echo_server.py --mode reference: recv(8192) "
        "and re-parse the whole buffer per chunk; a main loop that sleeps 0.05 s between polls)"
    )
    rep.p()
    rep.table(["measurement", "value"], rows)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples; < 2 minutes")
    ap.add_argument("--wheel", type=Path, help="the bld_remote wheel (default: newest dist/*.whl)")
    ap.add_argument(
        "--only", default="", help="comma list: latency,throughput,payloads,main,fairness,idle,reference"
    )
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()
    quick = args.quick
    cfg = {
        "rounds": 2 if quick else 4,
        "lat_n": 1000 if quick else 5000,
        "lat_conn_n": 300 if quick else 1500,
        "tp_rounds": 2 if quick else 3,
        "tp_seconds": 1.0 if quick else 2.0,
        "sizes_mb": [1, 4, 16, 64],
        "payload_reps": 3 if quick else 7,
        "cold_reps": 2 if quick else 3,
        "mt_n": 5000 if quick else 20000,
        "mt_reps": 1 if quick else 3,
        "idle_seconds": 10.0,
        "ref_n": 10 if quick else 40,
        "ref_sizes_mb": [1] if quick else [1, 4],
        "fair_job_ms": 20,
        "fair_window": 64,
        "fair_n": 100 if quick else 300,
    }
    only = set(filter(None, args.only.split(",")))
    want = lambda s: not only or s in only  # noqa: E731
    wheel = args.wheel or built_wheel()
    started = time.monotonic()
    rep = Report()
    tmp = Path(tempfile.mkdtemp(prefix="bld_remote_bench_"))
    echo = ref = bld = None
    try:
        echo = Echo("echo")
        ref = Echo("reference")
        bld = start_blender(wheel, tmp / "scripts")
        version = subprocess.run(["blender", "--version"], capture_output=True, text=True).stdout.splitlines()
        rep.p(f"## Headless results ({'--quick' if quick else 'full run'})")
        rep.p()
        rep.p(
            f"- command: `python bench/run.py{' --quick' if quick else ''}"
            f"{' --only ' + args.only if args.only else ''}`; date: "
            f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
        )
        rep.p(f"- machine: {machine()}; {version[0] if version else 'blender ?'} headless (`-b`)")
        rep.p(
            f"- wheel: {wheel.name} ({_dt.datetime.fromtimestamp(wheel.stat().st_mtime):%Y-%m-%d %H:%M}); "
            "baseline: bench/echo_server.py (threaded, one thread per connection) in its own process"
        )
        rep.p()
        if want("latency"):
            bench_latency(rep, echo, bld, cfg)
        if want("throughput"):
            bench_throughput(rep, echo, bld, cfg)
        if want("payloads"):
            bench_payloads(rep, echo, bld, cfg)
        if want("main"):
            bench_main_thread(rep, bld, cfg)
        if want("fairness"):
            bench_fairness(rep, bld, cfg)
        if want("reference"):
            bench_reference(rep, echo, ref, bld, cfg)
        if want("idle"):
            bench_idle(rep, bld, ref, cfg)
        rep.p("### Verdicts")
        rep.p()
        rep.table(
            ["target", "measured", "baseline", "ratio", "verdict", "note"],
            [
                [t, v, b, r, "met" if m else ("missed" if m is False else "–"), note]
                for t, v, b, r, m, note in rep.verdicts
            ],
        )
        rep.p(f"(bench took {time.monotonic() - started:.0f} s)")
    finally:
        if bld is not None:
            bld.kill()
        for e in (echo, ref):
            if e is not None:
                e.stop()
    if args.json:
        args.json.write_text(
            json.dumps({"cfg": cfg, "data": rep.data, "verdicts": rep.verdicts}, indent=1, default=str)
        )


if __name__ == "__main__":
    main()
