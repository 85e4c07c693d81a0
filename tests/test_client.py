"""`bld_remote.Client` as installed from the wheel (run in a fresh venv's Python, so the source tree can never
be imported by mistake), against a real headless Blender 3.4.1: execute, typed exceptions, any reply size."""

from __future__ import annotations

import json
import subprocess
import time

from helpers import Started, cli_env, free_port


def client(installed, code: str, port: int, timeout: float = 120, env: dict | None = None) -> dict:
    """Run `code` with `c = Client(port=PORT)` in the installed package's Python; it prints one JSON line."""
    prelude = (
        "import json, time, bld_remote\n"
        "from bld_remote import Client, RemoteError, BlenderConnectionError, BlenderTimeoutError\n"
        f"c = Client(port={port})\n"
    )
    r = subprocess.run(
        [str(installed / "python"), "-P", "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_execute_returns_stdout_stderr_result_duration(installed, served):
    out = client(
        installed,
        (
            'r = c.execute(\'import sys\\nprint("hi")\\nprint("e", file=sys.stderr)\\n'
            'result = {"n": len(bpy.data.objects), "loc": bpy.data.objects["Cube"].location}\')\n'
            "print(json.dumps({'stdout': r.stdout, 'stderr': r.stderr, 'result': r.result, 'duration': r.duration,\n"
            "    'item': r['stdout'], 'none': c.execute('x = 1').result, 'repr': repr(r)[:11]}))\n"
        ),
        served.port,
    )
    assert out["stdout"] == "hi\n" and out["stderr"] == "e\n" and out["item"] == "hi\n"
    assert out["result"] == {"n": 3, "loc": [0.0, 0.0, 0.0]}
    assert 0 <= out["duration"] < 5
    assert out["none"] is None
    assert out["repr"] == "ExecResult("


def test_call_scene_info_object_info_status(installed, served):
    out = client(
        installed,
        (
            "print(json.dumps({'scene': c.scene_info()['object_count'], 'cube': c.object_info('Cube')['mesh'],\n"
            "  'ping': c.call('ping'), 'persist': (c.call('put_persist_data', key='k', data=[1]),\n"
            "  c.call('get_persist_data', key='k')), 'status': c.status()['port'], 'p': c.ping(),\n"
            "  'repr': repr(c)}))\n"
        ),
        served.port,
    )
    assert out["scene"] == 3
    assert out["cube"] == {"vertices": 8, "edges": 12, "polygons": 6}
    assert out["ping"]["pong"] is True and out["p"] is True
    assert out["persist"][1] == {"data": [1], "found": True}
    assert out["status"] == served.port
    assert out["repr"] == f'Client(host="127.0.0.1", port={served.port}, timeout=60)'


def test_remote_error_carries_traceback_type_and_partial_output(installed, served):
    out = client(
        installed,
        (
            'try:\n    c.execute(\'print("before")\\nraise KeyError("nope")\')\n'
            "except RuntimeError as e:\n"
            "    print(json.dumps({'cls': type(e).__name__, 'is_remote': isinstance(e, RemoteError),\n"
            "      'exc': e.exception, 'tb': e.traceback, 'out': e.output, 'msg': str(e), 'm': e.message}))\n"
        ),
        served.port,
    )
    assert out["cls"] == "RemoteError" and out["is_remote"] is True
    assert out["exc"] == "KeyError"
    assert 'File "<bld_remote>", line 2' in out["tb"] and "KeyError: 'nope'" in out["tb"]
    assert out["out"]["stdout"] == "before\n"
    assert "KeyError" in out["msg"] and out["m"] == out["msg"]
    out = client(
        installed,
        (
            "errs = []\n"
            "for f in (lambda: c.object_info('Nope'), lambda: c.call('make_coffee')):\n"
            "    try:\n        f()\n    except RemoteError as e:\n        errs.append(str(e))\n"
            "errs.append(c.ping())\n"  # the connection survives error replies
            "print(json.dumps(errs))\n"
        ),
        served.port,
    )
    assert out == ["Object not found: Nope", "Unknown command type: make_coffee", True]


def test_connection_refused_is_a_connection_error(installed):
    port = free_port()
    out = client(
        installed,
        (
            "try:\n    c.ping()\n"
            "except ConnectionError as e:\n"
            "    print(json.dumps([type(e).__name__, str(e), e.address, e.reason]))\n"
        ),
        port,
    )
    assert out[0] == "BlenderConnectionError"
    assert "connection refused" in out[1] and out[2] == f"127.0.0.1:{port}" and out[3] == "ConnectionRefused"


def test_timeout_is_a_timeout_error_and_the_client_recovers(installed, served):
    out = client(
        installed,
        (
            "c.timeout = 0.5\nt0 = time.monotonic()\n"
            "try:\n    c.execute('import time; time.sleep(1.5)')\n"
            "except TimeoutError as e:\n    err = [type(e).__name__, str(e), time.monotonic() - t0, e.ran]\n"
            "c.timeout = 30\n"
            "print(json.dumps(err + [c.execute('print(7)').stdout]))\n"
        ),
        served.port,
    )
    assert out[0] == "BlenderTimeoutError"
    assert "timed out" in out[1]
    assert out[2] < 5
    assert out[3] is True  # it had started: the service said so
    assert out[4] == "7\n"


def test_timeout_while_queued_never_runs(installed, served):
    out = client(
        installed,
        (
            "import threading\n"
            "busy = threading.Thread(target=lambda: Client(port=c.port).execute('import time; time.sleep(1.0)'))\n"
            "busy.start(); time.sleep(0.3)\n"
            "c.timeout = 0.3\n"
            "try:\n    c.execute('bpy.context.scene[\"late\"] = 1')\n"
            "except TimeoutError as e:\n    ran = e.ran\n"
            "busy.join(); c.timeout = 30\n"
            "print(json.dumps([ran, c.execute('result = \"late\" in bpy.context.scene').result]))\n"
        ),
        served.port,
    )
    assert out == [False, False]


def test_50_mb_stdout_round_trip(installed, served):
    out = client(
        installed,
        (
            "t0 = time.perf_counter()\n"
            'r = c.execute(\'import sys\\nsys.stdout.write("x" * 50_000_000)\\nprint("END")\')\n'
            "dt = time.perf_counter() - t0\n"
            "ok = len(r.stdout) == 50_000_004 and r.stdout.endswith('xEND\\n') and r.stdout.count('x') == 50_000_000\n"
            "print(json.dumps({'ok': ok, 'len': len(r.stdout), 'seconds': dt, 'after': c.execute('print(1)').stdout}))\n"
        ),
        served.port,
        timeout=300,
    )
    assert out["ok"] is True, out
    assert out["after"] == "1\n"
    print(f"50 MB stdout round trip: {out['seconds']:.2f} s")


def test_client_finds_the_only_instance_and_shutdown_stops_it(installed, tmp_path):
    """Client() without a port uses the descriptor of the only live instance; shutdown() ends Blender."""
    runtime = tmp_path / "rt"
    runtime.mkdir()
    env = cli_env(runtime)
    s = Started(installed, ["--background", "--port", "0"], env)
    try:
        s.wait_ready()
        r = subprocess.run(
            [
                str(installed / "python"),
                "-P",
                "-c",
                "import json, bld_remote\nc = bld_remote.Client()\n"
                "print(json.dumps([c.port, c.execute('print(3)').stdout, c.shutdown()]))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        port, stdout, reply = json.loads(r.stdout)
        assert (port, stdout) == (s.port, "3\n") and "shutting down" in reply["message"]
        assert s.proc.wait(timeout=30) == 0, s.output
    finally:
        s.kill()
    t0 = time.monotonic()
    while list(runtime.iterdir()) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert list(runtime.iterdir()) == []


def test_one_client_shared_by_threads(installed, served):
    """Calls from several threads are serialised; reading host/port/timeout while another thread waits on
    the network must not deadlock (the waiting thread takes the GIL to poll for signals)."""
    out = client(
        installed,
        (
            "import threading\n"
            "res = []\n"
            "ts = [threading.Thread(target=lambda i=i: res.append(c.execute(f'import time; time.sleep(0.3); print({i})').stdout))\n"
            "      for i in range(4)]\n"
            "[t.start() for t in ts]\n"
            "t0 = time.monotonic(); n = 0\n"
            "while any(t.is_alive() for t in ts) and time.monotonic() - t0 < 20:\n"
            "    n += bool(c.port and repr(c) and c.timeout and c.host); time.sleep(0.01)\n"
            "[t.join() for t in ts]\n"
            "print(json.dumps([sorted(res), n > 10]))\n"
        ),
        served.port,
    )
    assert out == [["0\n", "1\n", "2\n", "3\n"], True]
