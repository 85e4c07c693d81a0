"""Jobs that outlive a connection (blender-remote's job commands, COMPAT.md), against a real headless Blender
3.4.1: submit, status, result, cancel, list, the queue's status; cooperative cancellation and job timeouts;
the store's bounds; `Client.submit` → `Job`; bad input."""

from __future__ import annotations

import json
import subprocess
import time

from helpers import Conn, call, ok

WAIT_FOR = (
    # Code that blocks until a file exists (the test creates it): a job held on the main thread, by state.
    "import os, time\nwhile not os.path.exists({path!r}):\n    time.sleep(0.01)\n"
)


def wait_file(path, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def submit(port: int, code: str, **params) -> dict:
    snap = ok(call(port, "submit_code_job", code=code, **params))
    assert snap["job_id"].startswith("bld-job-") and snap["terminal"] is False, snap
    return snap


def wait_result(port: int, job_id: str) -> dict:
    return ok(call(port, "get_job_result", job_id=job_id, wait_timeout_seconds=60))


def test_a_job_outlives_its_connection_and_its_result_can_be_read_again(served, tmp_path):
    gate = tmp_path / "go"
    with Conn(served.port) as c:
        snap = ok(
            c.request("submit_code_job", code=WAIT_FOR.format(path=str(gate)) + "print('done')\nresult = 42")
        )
    # The submitting connection is gone; the job is still there, and status is answered while it runs.
    job = snap["job_id"]
    for key in ("status", "created_at", "updated_at", "started_at", "completed_at", "cancel_requested"):
        assert key in snap, snap
    status = ok(call(served.port, "get_job_status", job_id=job))
    assert status["found"] is True and status["status"] in ("queued", "running"), status
    assert "result" not in status
    early = ok(call(served.port, "get_job_result", job_id=job))
    assert early["terminal"] is False and "not reached a terminal state" in early["message"], early
    gate.touch()
    for _ in range(2):  # reading does not consume it
        r = wait_result(served.port, job)
        assert r["status"] == "completed" and r["terminal"] is True, r
        assert r["result"]["output"]["stdout"] == "done\n" and r["result"]["value"] == 42, r
        assert r["started_at"] <= r["completed_at"]
    listed = ok(call(served.port, "list_jobs"))
    assert job in [j["job_id"] for j in listed["jobs"]]
    q = ok(call(served.port, "get_queue_status"))
    assert q["job_store"]["jobs"] >= 1 and "queue_length" in q


def test_a_cancelled_queued_job_never_runs_and_a_running_one_stops_at_its_checkpoint(served, tmp_path):
    gate, ran, started = tmp_path / "go", tmp_path / "ran", tmp_path / "started"
    holder = submit(served.port, WAIT_FOR.format(path=str(gate)))
    queued = submit(served.port, f"open({str(ran)!r}, 'w').close()")
    snap = ok(call(served.port, "cancel_job", job_id=queued["job_id"], reason="not needed"))
    assert snap["status"] == "cancelled" and snap["cancel_requested"] is True, snap
    assert snap["metadata"]["cancel_reason"] == "not needed"
    # A running job: it announces itself, then loops on check_cancelled().
    looping = submit(
        served.port,
        f"open({str(started)!r}, 'w').close()\nimport time\nwhile True:\n    check_cancelled()\n    time.sleep(0.01)",
    )
    gate.touch()
    assert wait_result(served.port, holder["job_id"])["status"] == "completed"
    wait_file(started)
    snap = ok(call(served.port, "cancel_job", job_id=looping["job_id"]))
    assert snap["status"] in ("cancelling", "cancelled"), snap
    r = wait_result(served.port, looping["job_id"])
    assert r["status"] == "cancelled" and r["exception"] == "JobCancelled", r
    # The queued one never ran, and stays cancelled.
    assert not ran.exists()
    assert ok(call(served.port, "get_job_status", job_id=queued["job_id"]))["status"] == "cancelled"
    # Cancelling an ended job keeps its status.
    assert ok(call(served.port, "cancel_job", job_id=holder["job_id"]))["status"] == "completed"


def test_job_timeout_failures_and_bad_input(served):
    looping = submit(
        served.port,
        "import time\nwhile True:\n    check_cancelled()\n    time.sleep(0.01)",
        job_timeout_seconds=0.3,
    )
    assert wait_result(served.port, looping["job_id"])["status"] == "timed_out"
    failing = submit(served.port, "print('before')\n1/0")
    r = wait_result(served.port, failing["job_id"])
    assert r["status"] == "failed" and r["exception"] == "ZeroDivisionError", r
    assert "ZeroDivisionError" in r["error"] and "Traceback" in r["traceback"]
    assert r["output"]["stdout"] == "before\n"
    for command in ("get_job_status", "get_job_result", "cancel_job"):
        r = ok(call(served.port, command, job_id="bld-job-999999"))
        assert r["found"] is False, r
    with Conn(served.port) as c:
        for params, words in (
            ({"type": "get_job_status"}, "job_id"),
            ({"type": "get_job_status", "params": {"job_id": 7}}, "job_id"),
            ({"type": "submit_code_job", "params": {}}, "code"),
            ({"type": "submit_code_job", "params": {"code": 5}}, "code"),
            (
                {"type": "submit_code_job", "params": {"code": "pass", "job_timeout_seconds": -1}},
                "job_timeout",
            ),
            (
                {"type": "submit_code_job", "params": {"code": "pass", "job_timeout_seconds": 1e300}},
                "job_timeout",
            ),
            (
                {"type": "submit_code_job", "params": {"code": "pass", "job_timeout_seconds": "x"}},
                "job_timeout",
            ),
            (
                {"type": "get_job_result", "params": {"job_id": "x", "wait_timeout_seconds": -2}},
                "wait_timeout",
            ),
            ({"type": "cancel_job", "params": {"job_id": "x", "reason": 3}}, "reason"),
        ):
            r = c.request(params)
            assert r["status"] == "error" and words in r["message"], (params, r)
        # The same connection still works.
        assert ok(c.request("ping"))["pong"] is True


def test_a_full_store_drops_read_results_first_then_says_busy(start_blender, tmp_path):
    b = start_blender(env={"BLD_REMOTE_MAX_JOBS": "3"})
    ids = [submit(b.port, f"result = {i}")["job_id"] for i in range(3)]
    for i in ids[1:]:
        wait_result(b.port, i)  # two read, one not
    # Full of three: the two read ones may go; the unread one stays.
    submit(b.port, "result = 'a'")
    submit(b.port, "result = 'b'")
    r = call(b.port, "submit_code_job", code="result = 'c'")
    assert r["status"] == "error" and r["message"].startswith("busy") and r["ran"] is False, r
    assert ok(call(b.port, "get_job_status", job_id=ids[0]))["found"] is True
    assert ok(call(b.port, "get_job_status", job_id=ids[1]))["found"] is False


def test_client_submit_returns_a_job(installed, served, tmp_path):
    gate = tmp_path / "go"
    code = (
        "import json, time\n"
        "from bld_remote import Client, Job, JobCancelled, RemoteError, BlenderTimeoutError\n"
        f"c = Client(port={served.port})\n"
        "out = {}\n"
        "j = c.submit('print(6 * 7)\\nresult = [1, 2]')\n"
        "r = j.result(timeout=60)\n"
        "out['id'], out['stdout'], out['result'] = j.id, r.stdout, r.result\n"
        "out['status'] = j.status()['status']\n"
        f"held = c.submit({WAIT_FOR.format(path=str(gate))!r})\n"
        "try:\n    held.result(timeout=0.2)\nexcept BlenderTimeoutError as e:\n    out['still'] = [str(e), e.ran]\n"
        "q = c.submit('result = 1')\n"
        "out['cancel'] = q.cancel('no')['status']\n"
        "try:\n    q.result(timeout=5)\nexcept JobCancelled as e:\n    out['cancelled'] = str(e)\n"
        f"open({str(gate)!r}, 'w').close()\n"
        "held.result(timeout=60)\n"
        "f = c.submit('1/0')\n"
        "try:\n    f.result(timeout=60)\nexcept RemoteError as e:\n    out['failed'] = e.exception\n"
        "try:\n    Client(port=c.port).submit('pass', job_timeout=float('nan'))\n"
        "except ValueError as e:\n    out['bad'] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    p = subprocess.run(
        [str(installed / "python"), "-P", "-c", code], capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["id"].startswith("job-") and len(out["id"]) == 20, out  # chosen by the client
    assert out["stdout"] == "42\n" and out["result"] == [1, 2], out
    assert out["status"] == "completed"
    assert "still" in out["still"][0] and out["still"][1] is None, out
    assert out["cancel"] == "cancelled" and "cancelled" in out["cancelled"], out
    assert out["failed"] == "ZeroDivisionError"
    assert "job_timeout" in out["bad"]


def test_client_chosen_job_ids_on_the_wire(served):
    port = served.port
    snap = ok(call(port, "submit_code_job", code="result = 7", job_id="mine-1.a:b_c"))
    assert snap["job_id"] == "mine-1.a:b_c", snap
    assert wait_result(port, "mine-1.a:b_c")["result"]["value"] == 7
    # The same id again: not run, and the reply names the job that holds it (a resent submission can tell).
    again = call(port, "submit_code_job", code="result = 8", job_id="mine-1.a:b_c")
    assert again["status"] == "error" and again["ran"] is False and again["id_in_use"] is True, again
    assert again["job_id"] == "mine-1.a:b_c" and "already in use" in again["message"], again
    assert wait_result(port, "mine-1.a:b_c")["result"]["value"] == 7  # untouched
    for bad in ("", "x" * 65, "has space", "bld-job-12", "ünï", 5, True, ["a"], {"a": 1}):
        r = call(port, "submit_code_job", code="result = 1", job_id=bad)
        assert r["status"] == "error" and "'job_id'" in r["message"], (bad, r)
    # The service's own form is taken by nobody else, but other bld-job- names are fine.
    assert ok(call(port, "submit_code_job", code="pass", job_id="bld-job-x"))["job_id"] == "bld-job-x"


def test_quiet_submissions_and_waits_that_do_not_hold_the_connection(served, tmp_path):
    gate = tmp_path / "go"
    with Conn(served.port) as c:
        # Quiet and accepted: no reply of its own; the next request's reply comes next.
        c.send(
            {
                "id": 1,
                "type": "submit_code_job",
                "params": {"code": WAIT_FOR.format(path=str(gate)), "job_id": "q-held", "quiet": True},
            }
        )
        c.send({"id": 2, "type": "ping"})
        assert c.reply()["id"] == 2
        # Quiet and refused (the id is taken): its error reply comes, before the next request's.
        c.send(
            {
                "id": 3,
                "type": "submit_code_job",
                "params": {"code": "pass", "job_id": "q-held", "quiet": True},
            }
        )
        c.send({"id": 4, "type": "ping"})
        refused = c.reply()
        assert refused["id"] == 3 and refused["status"] == "error" and refused["id_in_use"] is True, refused
        assert c.reply()["id"] == 4
        bad = c.request({"id": 5, "type": "submit_code_job", "params": {"code": "pass", "quiet": "yes"}})
        assert bad["status"] == "error" and "'quiet' must be true or false" in bad["message"], bad
        # A wait for the held job does not hold the connection: a ping behind it is answered first.
        c.send(
            {"id": 6, "type": "get_job_result", "params": {"job_id": "q-held", "wait_timeout_seconds": 60}}
        )
        c.send({"id": 7, "type": "get_job_status", "params": {"job_id": "q-held"}})
        status = c.reply()
        assert status["id"] == 7 and status["result"]["status"] in ("queued", "running"), status
        # A short wait ends with the snapshot as it is (not terminal), not with a timeout error.
        c.send(
            {"id": 8, "type": "get_job_result", "params": {"job_id": "q-held", "wait_timeout_seconds": 0.2}}
        )
        short = c.reply()
        assert short["id"] == 8 and short["status"] == "success", short
        assert short["result"]["terminal"] is False and short["result"]["found"] is True, short
        gate.touch()
        done = c.reply()
        assert done["id"] == 6 and done["result"]["status"] == "completed", done
        assert done["result"]["metadata"]["result_read"] is True, done


def test_a_submission_rides_with_its_first_request(installed, served, tmp_path):
    # Client.submit does not wait: the job's first call goes out behind it and reads both replies. Replies
    # to submissions not asked about yet are kept through other calls, in any order, and a refusal is
    # raised by the job's first call.
    gate = tmp_path / "go"
    code = (
        "import json\n"
        "from bld_remote import Client, RemoteError, OutcomeUnknown\n"
        f"c = Client(port={served.port}, timeout=60)\n"
        "out = {}\n"
        f"held = c.submit({WAIT_FOR.format(path=str(gate))!r} + 'result = \"held\"')\n"
        "jobs = [c.submit(f'result = {i} * 2') for i in range(50)]\n"
        # Answered on the network thread while the held job keeps Blender busy: reads past 51 acks.
        "out['held'] = held.status()['status']\n"
        "out['ping'] = c.ping()\n"
        f"open({str(gate)!r}, 'w').close()\n"
        "out['exec'] = c.execute('result = \"between\"').result\n"
        "out['results'] = [j.result(timeout=60).result for j in reversed(jobs)]\n"
        "out['ids'] = len({j.id for j in jobs})\n"
        "out['held_result'] = held.result(timeout=60).result\n"
        "out['again'] = jobs[0].result().result\n"
        "print(json.dumps(out))\n"
    )
    p = subprocess.run(
        [str(installed / "python"), "-P", "-c", code], capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["exec"] == "between" and out["ping"] is True and out["ids"] == 50, out
    assert out["results"] == [i * 2 for i in reversed(range(50))], out
    assert out["held"] in ("queued", "running") and out["held_result"] == "held" and out["again"] == 0, out


def test_a_refused_submission_is_raised_by_the_jobs_first_call(installed, start_blender, tmp_path):
    b = start_blender(env={"BLD_REMOTE_MAX_JOBS": "2"})
    gate = str(tmp_path / "go")
    code = (
        "import json\n"
        "from bld_remote import Client, RemoteError\n"
        f"c = Client(port={b.port}, timeout=60)\n"
        f"a, b = c.submit({WAIT_FOR.format(path=gate)!r}), c.submit('pass')\n"
        "third = c.submit('result = 3')\n"
        "out = {}\n"
        "try:\n    third.result(timeout=5)\nexcept RemoteError as e:\n"
        "    out['refused'] = [str(e), e.reply.get('ran')]\n"
        "try:\n    third.status()\nexcept LookupError as e:\n    out['unknown'] = str(e)\n"
        f"open({gate!r}, 'w').close()\n"
        "out['b'] = b.result(timeout=60).result\n"
        "print(json.dumps(out))\n"
    )
    p = subprocess.run(
        [str(installed / "python"), "-P", "-c", code], capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["refused"][0].startswith("busy") and out["refused"][1] is False, out
    assert "unknown job id" in out["unknown"] and out["b"] is None, out


def test_the_job_command(installed, served, tmp_path):
    exe = str(installed / "bld-remote")
    port = ["--port", str(served.port)]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, "job", *args, *port], capture_output=True, text=True, timeout=120)

    sub = run("submit", "-c", "print('from a job')\nresult = 1")
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    assert job.startswith("bld-job-")
    res = run("result", job)
    assert res.returncode == 0 and res.stdout == "from a job\n", res
    st = run("status", job)
    assert st.returncode == 0 and json.loads(st.stdout)["status"] == "completed"
    assert job in [j["job_id"] for j in json.loads(run("list").stdout)["jobs"]]
    gate = tmp_path / "go"
    held = run("submit", "-c", WAIT_FOR.format(path=str(gate))).stdout.strip()
    still = run("result", held, "--wait", "0.2")
    assert still.returncode == 4 and "still" in still.stderr, still
    cancel = run("cancel", held, "--reason", "test")
    assert cancel.returncode == 0 and json.loads(cancel.stdout)["cancel_requested"] is True
    gate.touch()
    failed = run("result", run("submit", "-c", "1/0").stdout.strip())
    assert failed.returncode == 1 and "ZeroDivisionError" in failed.stderr, failed
    unknown = run("status", "bld-job-999999")
    assert unknown.returncode == 1 and "unknown job id" in unknown.stderr
    bad = run("submit", "-c", "pass", "--job-timeout=-1")
    assert bad.returncode == 2 and "job-timeout" in bad.stderr


def test_blender_remote_in_blender_api(served):
    # blender-remote's module API, called from a script inside Blender, runs unchanged.
    code = (
        "import bld_remote\n"
        "bld_remote.persist.put_data('k', {'v': [1, 2]})\n"
        "errors = {}\n"
        "try:\n    bld_remote.set_mcp_service_port(7000)\nexcept RuntimeError as e:\n    errors['set'] = str(e)\n"
        "try:\n    bld_remote.persist.put_data('big', 'x' * (80 << 20))\nexcept ValueError as e:\n"
        "    errors['big'] = str(e)\n"
        "result = {'port': bld_remote.get_mcp_service_port(), 'background': bld_remote.is_background_mode(),\n"
        "          'queue': bld_remote.get_command_queue_size(), 'options': bld_remote.get_startup_options(),\n"
        "          'got': bld_remote.persist.get_data('k'), 'missing': bld_remote.persist.get_data('nope', 5),\n"
        "          'keys': bld_remote.persist.get_keys(), 'errors': errors,\n"
        "          'running': bld_remote.get_status()['running'], 'up': bld_remote.is_mcp_service_up()}\n"
    )
    r = ok(call(served.port, "execute_code", code=code))["value"]
    assert r["port"] == served.port and r["background"] is True and r["queue"] >= 0, r
    assert "port" in r["options"] and r["running"] is True and r["up"] is True
    assert r["got"] == {"v": [1, 2]} and r["missing"] == 5 and "k" in r["keys"]
    assert "stop_mcp_service" in r["errors"]["set"] and "too large" in r["errors"]["big"], r
    # The same store over the wire.
    assert ok(call(served.port, "get_persist_data", key="k"))["data"] == {"v": [1, 2]}
    r = ok(
        call(
            served.port,
            "execute_code",
            code="import bld_remote\nresult = bld_remote.persist.remove_data('k')",
        )
    )
    assert r["value"] is True
    assert ok(call(served.port, "get_persist_data", key="k"))["found"] is False
