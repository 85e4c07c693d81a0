"""The service's lifecycle against real Blenders (issue 14): SIGTERM and SIGINT stop `keep_alive()` within a
second whatever client code did to Python's signal machinery (asyncio, `set_wakeup_fd(-1)`, its own
handlers), and their log line stays out of the client's captured stderr; a stop and a start inside one
request end with a running service (headless and GUI, the add-on's disable + enable included); nested pumps
are refused; a request that unloads its own add-on is told the service is stopping; sockets never take fds
0-2 after client code closed stdout and stderr.

Every Blender is started through the fixtures (headless) or `start_gui` (Xvfb) and killed by PID.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from helpers import BPY_PYTHON, Conn, call, err, free_port, ok, port_is_free

# Code that leaves Python's signal machinery as ordinary asyncio code does: the loop's close() removes
# its signal handlers (SIGTERM back to SIG_DFL) and resets the wake-up fd; then the fd is reset by hand.
ASYNCIO = """
import asyncio, signal
loop = asyncio.new_event_loop()
loop.add_signal_handler(signal.SIGTERM, lambda: None)
async def work():
    await asyncio.sleep(0.01)
    return 42
result = loop.run_until_complete(work())
loop.close()
signal.set_wakeup_fd(-1)
"""


def _descriptors(runtime_dir: Path) -> list[Path]:
    return sorted(runtime_dir.glob("*.json"))


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _wait_output(b, text: str, timeout: float = 10) -> None:
    """Blender's output is read on a thread: wait for `text` to have arrived."""
    _wait(lambda: text in b.output, timeout, f"{text!r} not in Blender's output:\n{b.output[-3000:]}")


def _signal_and_time(b, sig: int) -> tuple[float, float]:
    """Send `sig`; return (seconds until the service reported it stopped, seconds until Blender exited).
    The first is the bound (the pump's reaction and the joined stop); the second adds Blender's own exit,
    which on a loaded 2-core machine took 0.13-0.4 s (once over 1 s under a load average of 9)."""
    t0 = time.monotonic()
    b.signal(sig)
    stopped = None
    while b.proc.poll() is None or stopped is None:
        if stopped is None and "service stopped; keep_alive() returns" in b.output:
            stopped = time.monotonic() - t0
        if b.proc.poll() is not None and stopped is None and not b._reader.is_alive():
            break
        assert time.monotonic() - t0 < 10, f"no exit 10 s after {sig}:\n{b.output}"
        time.sleep(0.002)
    exited = time.monotonic() - t0
    b.wait_exit(timeout=5)
    return (stopped if stopped is not None else exited), exited


def _running_job(port: int) -> dict | None:
    return ok(call(port, "get_status"))["running_job"]


# --- signals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_within_a_second_after_asyncio_and_wakeup_fd_reset(start_blender, tmp_path, sig):
    runtime = tmp_path / "rt"
    runtime.mkdir()
    b = start_blender(env={"BLD_REMOTE_RUNTIME_DIR": str(runtime)})
    assert len(_descriptors(runtime)) == 1
    with Conn(b.port) as c:
        assert ok(c.request("execute_code", code=ASYNCIO))["value"] == 42
        # The same again, so the second reset comes after keep_alive() took the signals back once.
        assert ok(c.request("execute_code", code=ASYNCIO))["value"] == 42
        stopped, exited = _signal_and_time(b, sig)
    assert b.wait_exit(timeout=5) == 0, b.output
    assert stopped < 1.0, (stopped, b.output)
    assert exited < 2.5, (exited, b.output)
    _wait_output(b, f"received {sig.name}: stopping")
    _wait_output(b, "replaced the SIGTERM handler")  # asyncio's close() had put back SIG_DFL
    assert _descriptors(runtime) == []
    assert port_is_free(b.port)
    print(
        f"{sig.name} after asyncio: stopped {stopped * 1000:.0f} ms, exited {exited * 1000:.0f} ms after it"
    )


def test_a_python_handler_installed_by_a_request_is_taken_back(start_blender):
    b = start_blender()
    code = "import signal\nsignal.signal(signal.SIGTERM, lambda *a: print('client handler'))"
    ok(call(b.port, "execute_code", code=code))
    stopped, _ = _signal_and_time(b, signal.SIGTERM)  # sent the moment the reply is in
    assert b.wait_exit(timeout=5) == 0, b.output
    assert stopped < 1.0, (stopped, b.output)
    assert "client handler" not in b.output


def test_sigterm_ignored_on_purpose_is_respected_and_sigint_still_stops(start_blender):
    b = start_blender()
    ok(call(b.port, "execute_code", code="import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)"))
    # Ping runs on a network thread; execute_code on the main thread proves the pump saw the change first.
    ok(call(b.port, "execute_code", code="pass"))
    _wait_output(b, "SIGTERM is ignored now")
    b.signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        b.wait_exit(timeout=1.0)
    assert ok(call(b.port, "execute_code", code="result = 1"))["value"] == 1
    stopped, _ = _signal_and_time(b, signal.SIGINT)
    assert b.wait_exit(timeout=5) == 0, b.output
    assert stopped < 1.0, (stopped, b.output)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_a_job_sleeps_answers_it_first_and_logs_outside_its_stderr(start_blender, sig):
    b = start_blender()
    with Conn(b.port) as c:
        code = (
            "import sys, time\n"
            "print('before', file=sys.stderr)\n"
            "time.sleep(1.0)\n"
            "print('after', file=sys.stderr)\n"
            "result = 'done'\n"
        )
        c.send({"type": "execute_code", "params": {"code": code}})
        _wait(lambda: _running_job(b.port) is not None, 10, "the job never started")
        b.signal(sig)
        t_signal = time.monotonic()
        r = ok(c.reply())
        t_reply = time.monotonic()
        assert r["value"] == "done"
        assert r["output"]["stderr"] == "before\nafter\n", (
            r
        )  # the signal's log line is not in the client's output
        assert r.get("service_stopping") is None  # the job did not stop the service; the signal did
        _wait_output(b, "service stopped; keep_alive() returns")
        t_stopped = time.monotonic()
        assert b.wait_exit(timeout=5) == 0, b.output
    _wait_output(b, f"received {sig.name}: stopping")
    assert 0.5 < t_reply - t_signal < 3.0  # the job was neither cut short nor held up (loose: shared CPU)
    assert t_stopped - t_reply < 1.0, (t_stopped - t_reply, b.output)


def test_a_second_signal_during_a_job_that_never_ends_kills(start_blender, tmp_path):
    b = start_blender()
    with Conn(b.port) as c:
        c.send({"type": "execute_code", "params": {"code": "import time\nwhile True: time.sleep(0.05)"}})
        _wait(lambda: _running_job(b.port) is not None, 10, "the job never started")
        t0 = time.monotonic()
        rc = None
        # Signals sent together may merge into one: repeat until the process ends.
        while rc is None and time.monotonic() - t0 < 5:
            b.signal(signal.SIGTERM)
            try:
                rc = b.wait_exit(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    assert rc == -signal.SIGTERM, (rc, b.output)
    assert time.monotonic() - t0 < 3.0


def test_code_that_closes_the_log_fd_does_not_lose_the_signal(start_blender):
    b = start_blender()
    # Point fd 2 elsewhere, as a job might: the guard logs to its own duplicate of the original stderr.
    ok(call(b.port, "execute_code", code="import os\nos.dup2(os.open(os.devnull, os.O_WRONLY), 2)"))
    b.signal(signal.SIGTERM)
    assert b.wait_exit(timeout=5) == 0
    _wait_output(b, "received SIGTERM: stopping")


# --- restart, nested pumps, service_stopping (headless) ---------------------------------------------------


def test_stop_and_start_in_one_request_ends_with_a_running_service(start_blender, tmp_path):
    runtime = tmp_path / "rt"
    runtime.mkdir()
    port = free_port()
    b = start_blender(port=port, env={"BLD_REMOTE_RUNTIME_DIR": str(runtime)})
    code = (
        "import bld_remote\n"
        "assert bld_remote.stop_mcp_service() is True\n"
        "assert not bld_remote.is_mcp_service_up()\n"
        f"st = bld_remote.start_mcp_service(port={port})\n"
        "result = [st['running'], st['port'], bld_remote.start_mcp_service()['port']]\n"
    )
    with Conn(b.port) as c:
        r = ok(c.request("execute_code", code=code))
        assert r["value"] == [True, port, port], r
        assert r["service_stopping"] is True and r["restarted_on"] == f"127.0.0.1:{port}", r
        assert c.closed_by_peer(5)  # the old service's connection closes after its last reply
    # keep_alive() serves the new service: main-thread commands run.
    assert ok(call(port, "get_scene_info"))["object_count"] == 3
    assert ok(call(port, "execute_code", code="result = 7"))["value"] == 7
    assert len(_descriptors(runtime)) == 1
    # And a restart on another port (0: a free one), twice in one request.
    code0 = (
        "import bld_remote\n"
        "bld_remote.stop_mcp_service(); bld_remote.start_mcp_service(port=0)\n"
        "bld_remote.stop_mcp_service(); result = bld_remote.start_mcp_service(port=0)['port']\n"
    )
    new_port = ok(call(port, "execute_code", code=code0))["value"]
    assert new_port != port
    assert port_is_free(port)
    assert ok(call(new_port, "execute_code", code="result = 8"))["value"] == 8
    assert len(_descriptors(runtime)) == 1
    ok(call(new_port, "server_shutdown"))
    assert b.wait_exit(timeout=5) == 0, b.output
    assert _descriptors(runtime) == []


def test_stop_in_a_request_says_service_stopping(start_blender):
    b = start_blender()
    r = ok(call(b.port, "execute_code", code="import bld_remote\nresult = bld_remote.stop_mcp_service()"))
    assert r["value"] is True and r["service_stopping"] is True and "restarted_on" not in r, r
    assert "nothing listens" in r["service_message"]
    assert b.wait_exit(timeout=5) == 0, b.output


def test_nested_step_and_keep_alive_are_refused_and_running_job_stays_truthful(start_blender):
    b = start_blender()
    code = textwrap.dedent(
        """
        import bld_remote
        from bld_remote import _core
        out = []
        for f in (bld_remote.step, bld_remote.keep_alive, lambda: _core.step(1, 0.5)):
            try:
                f()
                out.append("ran")
            except RuntimeError as e:
                out.append(str(e))
        status = bld_remote.get_status()
        out.append([status["running"], status["running_job"]["command"], _core.in_job()])
        result = out
        """
    )
    with Conn(b.port) as c, Conn(b.port) as other:
        # A queued request that a nested pump would have run inside the first one.
        c.send({"id": 1, "type": "execute_code", "params": {"code": code}})
        other.send({"id": 2, "type": "execute_code", "params": {"code": "result = 'second'"}})
        r = ok(c.reply())["value"]
        assert ok(other.reply())["value"] == "second"
    assert r[0].startswith("step() cannot run inside a request"), r
    assert r[1].startswith("keep_alive() cannot run inside a request"), r
    assert r[2].startswith("step() cannot run inside a request"), r
    assert r[3] == [True, "execute_code", True], r
    # The refused keep_alive() stopped nothing; step() outside a job is still fine.
    assert ok(call(b.port, "execute_code", code="result = 1"))["value"] == 1
    assert ok(call(b.port, "get_status"))["running_job"] is None
    ok(call(b.port, "server_shutdown"))
    assert b.wait_exit(timeout=5) == 0


# --- file descriptors 0-2 ------------------------------------------------------------------------------


@pytest.mark.skipif(bool(BPY_PYTHON), reason="closes the test runner's view of the output")
def test_sockets_never_take_fds_0_to_2_after_client_code_closes_them(start_blender):
    b = start_blender()
    with Conn(b.port) as first:
        ok(first.request("execute_code", code="import os\nos.close(1)\nos.close(2)"))
        conns = [Conn(b.port) for _ in range(4)]
        try:
            for i, c in enumerate(conns):
                assert ok(c.request("ping"))["pong"] is True, i
            fds = ok(first.request("execute_code", code=FDS))["value"]
            assert all(not kind.startswith("socket") for kind in fds.values()), fds
            # Blender writes to its stdout and stderr (C level and Python level) while the others talk.
            noise = (
                "import os, sys\n"
                "for i in range(200):\n"
                "    os.write(1, b'STRAY-OUT\\n'); os.write(2, b'STRAY-ERR\\n')\n"
                "    print('STRAY-PY', file=sys.__stderr__, flush=True)\n"
            )
            first.send({"id": 1, "type": "execute_code", "params": {"code": noise}})
            for _ in range(20):
                for c in conns:
                    ok(c.request("execute_code", code="result = 'x'"))
            assert ok(first.reply())["output"]["stderr"] == ""  # fds 1 and 2 were raw writes, not the capture
            for c in conns:
                assert ok(c.request("ping"))["pong"] is True
                assert c.buf == b""
                c.sock.settimeout(0.3)
                with pytest.raises(socket.timeout):
                    extra = c.sock.recv(100)
                    raise AssertionError(f"stray bytes: {extra!r}")
        finally:
            for c in conns:
                c.close()
        ok(first.request("server_shutdown"))
    assert b.wait_exit(timeout=5) == 0


FDS = """
import os, stat
out = {}
for fd in (0, 1, 2):
    try:
        mode = os.fstat(fd).st_mode
        out[str(fd)] = "socket" if stat.S_ISSOCK(mode) else "chr" if stat.S_ISCHR(mode) else "other"
    except OSError:
        out[str(fd)] = "closed"
result = out
"""


# --- GUI -----------------------------------------------------------------------------------------------

try:
    from test_gui import ENABLE_ADDON, XVFB_RUN, start_gui
except ImportError:  # pragma: no cover - test_gui always sits beside this file
    XVFB_RUN = None

gui_only = pytest.mark.skipif(XVFB_RUN is None, reason="xvfb-run not installed (apt-get install xvfb xauth)")


@pytest.fixture(scope="module")
def gui_life(tmp_path_factory, user_scripts):
    """An interactive Blender with the add-on enabled and started (BLD_REMOTE_MCP_START_NOW)."""
    port = free_port()
    b = start_gui(
        tmp_path_factory.mktemp("gui_life"),
        user_scripts,
        ENABLE_ADDON,
        BLD_REMOTE_MCP_START_NOW="1",
        BLD_REMOTE_MCP_PORT=str(port),
    )
    try:
        yield b
    finally:
        b.kill()


def _gui_serves(port: int) -> None:
    """Main-thread requests are answered (the pump is armed), on fresh connections."""
    out = ok(call(port, "execute_code", code="from bld_remote import gui\nprint(gui.pump_is_armed())"))
    assert out["output"]["stdout"] == "True\n", out
    assert ok(call(port, "get_scene_info"))["object_count"] >= 3


@gui_only
def test_gui_stop_and_start_in_one_request(gui_life):
    port = gui_life.port
    code = (
        "import bld_remote\n"
        "bld_remote.stop_mcp_service()\n"
        f"result = bld_remote.start_mcp_service(port={port})['running']\n"
    )
    r = ok(call(port, "execute_code", code=code))
    assert r["value"] is True and r["service_stopping"] is True and r["restarted_on"].endswith(f":{port}")
    _gui_serves(port)


@gui_only
def test_gui_addon_disable_and_enable_in_one_request(gui_life):
    port = gui_life.port
    r = ok(call(port, "execute_code", code=DISABLE_ENABLE))
    assert r["value"] == [True, True] and r["service_stopping"] is True, r
    _gui_serves(port)


KEEPER_ON = "bpy.ops.wm.bld_remote_keeper('INVOKE_DEFAULT')"
KEEPER_CHECK = (
    "from bld_remote import gui\n"
    "result = [gui.KEEPER.active, hasattr(bpy.types, 'WM_OT_bld_remote_keeper'), gui.pump_is_armed()]\n"
)


@gui_only
def test_gui_restart_in_one_request_while_the_keeper_drives(tmp_path, user_scripts):
    # A Blender of its own. Disabling the add-on from a job that the keeper runs used to unregister the
    # keeper's class under its own running modal(): Blender then used the freed operator, and a later Load
    # Factory Settings crashed Blender 3.4.1 in about 1 of 4 runs under load. Three rounds, then that load.
    port = free_port()
    b = start_gui(
        tmp_path, user_scripts, ENABLE_ADDON, BLD_REMOTE_MCP_START_NOW="1", BLD_REMOTE_MCP_PORT=str(port)
    )
    try:
        for _ in range(3):
            ok(call(port, "execute_code", code=KEEPER_ON, undo=False))
            assert ok(call(port, "execute_code", code=KEEPER_CHECK))["value"] == [True, True, False]
            r = ok(call(port, "execute_code", code=DISABLE_ENABLE))
            assert r["value"] == [True, True], r
            assert r["service_stopping"] is True and r["restarted_on"].endswith(f":{port}"), r
            # The keeper ended right after that job; the timer pump drives the new service, and the
            # re-enabled add-on owns the keeper's class again (Start Keeper still works).
            _gui_serves(port)
            assert ok(call(port, "execute_code", code=KEEPER_CHECK))["value"] == [False, True, True]
        try:
            r = ok(call(port, "execute_code", code="bpy.ops.wm.read_factory_settings()", undo=False))
        except ConnectionError as exc:
            raise AssertionError(f"no reply: {exc}\n{b.output[-6000:]}") from exc
        assert r["service_stopping"] is True, r
        _wait(lambda: port_is_free(port), 10, "the service did not stop with the add-on")
        # Blender lives on (it would have crashed inside that job, before its reply).
        state = Path(f"/proc/{b.blender_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state != "Z" and b.proc.poll() is None, b.output[-4000:]
    finally:
        b.kill()


@gui_only
def test_gui_disable_from_inside_the_keeper_unregisters_its_class_once_it_ends(tmp_path, user_scripts):
    # Disable only: the keeper's class goes as soon as the keeper has returned from the job, nothing stays.
    port = free_port()
    b = start_gui(
        tmp_path, user_scripts, ENABLE_ADDON, BLD_REMOTE_MCP_START_NOW="1", BLD_REMOTE_MCP_PORT=str(port)
    )
    try:
        ok(call(port, "execute_code", code=KEEPER_ON, undo=False))
        code = textwrap.dedent(
            """
            import addon_utils, time
            from bld_remote import gui
            inside = gui.KEEPER.serving
            addon_utils.disable('bld_remote', default_set=True)
            started = time.monotonic()
            def watch():
                if hasattr(bpy.types, 'WM_OT_bld_remote_keeper') and time.monotonic() - started < 10:
                    return 0.01
                print('KEEPER_GONE', not hasattr(bpy.types, 'WM_OT_bld_remote_keeper'), gui.KEEPER.active,
                      gui.pump_is_armed(), bpy.app.timers.is_registered(gui._drop_kept_keeper_class),
                      flush=True)
                addon_utils.enable('bld_remote', default_set=True)
            bpy.app.timers.register(watch, first_interval=0.0)
            result = [inside, hasattr(bpy.types, 'WM_OT_bld_remote_keeper')]
            """
        )
        r = ok(call(port, "execute_code", code=code, undo=False))
        # Run by the keeper (the pump's tick yields once a job starts it): its class stays while its job runs.
        assert r["value"] == [True, True] and r["service_stopping"] is True, r
        gone = b.wait_for(r"^KEEPER_GONE (.*)$", 30)[1]
        assert gone == "True False False False", gone
        _wait(lambda: not port_is_free(port), 10, "the re-enabled add-on did not start the service")
        _gui_serves(port)
    finally:
        b.kill()


DISABLE_ENABLE = (
    "import addon_utils\n"
    "addon_utils.disable('bld_remote', default_set=True)\n"
    "addon_utils.enable('bld_remote', default_set=True)\n"
    "result = addon_utils.check('bld_remote')\n"
)


@gui_only
def test_gui_nested_step_is_refused(gui_life):
    code = (
        "import bld_remote\n"
        "try:\n"
        "    bld_remote.step()\n"
        "    result = 'ran'\n"
        "except RuntimeError as e:\n"
        "    result = [str(e), bld_remote.get_status()['running_job']['command']]\n"
    )
    msg, running = ok(call(gui_life.port, "execute_code", code=code))["value"]
    assert msg.startswith("step() cannot run inside a request") and running == "execute_code"
    _gui_serves(gui_life.port)


@gui_only
def test_gui_factory_settings_reply_says_the_service_is_stopping(gui_life):
    # Last in this module: factory settings unload the add-on, and with it the service.
    port = gui_life.port
    try:
        r = call(port, "execute_code", code="bpy.ops.wm.read_factory_settings()")
    except ConnectionError as exc:
        raise AssertionError(f"no reply: {exc}\n{gui_life.output[-4000:]}") from exc
    res = ok(r)
    assert res["service_stopping"] is True and "restarted_on" not in res, res
    _wait(lambda: port_is_free(port), 10, "the service did not stop")
    assert gui_life.proc.poll() is None  # Blender itself runs on


def test_bad_requests_still_get_errors_after_a_restart(start_blender):
    # The new service is a full one: errors, ids and the token-less default all as before.
    b = start_blender()
    port = b.port
    code = f"import bld_remote\nbld_remote.stop_mcp_service()\nbld_remote.start_mcp_service(port={port})"
    ok(call(port, "execute_code", code=code))
    assert "Unknown command" in err(call(port, "no_such_command"))
    with Conn(port) as c:
        c.send(b"".join(json.dumps({"id": i, "type": "ping"}).encode() for i in range(5)))
        assert sorted(c.reply()["id"] for _ in range(5)) == list(range(5))
    ok(call(port, "server_shutdown"))
    assert b.wait_exit(timeout=5) == 0
