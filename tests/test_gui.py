"""GUI mode in a real interactive Blender (Debian 3.4.1 under Xvfb): the add-on enabled through Blender's add-on
API, commands answered by the timer pump, viewport screenshots, undo, File > New and factory settings, the
keeper modal operator, and 20 disable/enable cycles that leak no thread and no port.

Every Blender here runs as `xvfb-run ... blender` in a new session; each is stopped by killing its whole process
group (xvfb-run, Xvfb and Blender), even when a test fails. PNGs are decoded with zlib (no Pillow needed).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import textwrap
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
from helpers import (
    SERVE,
    BlenderProcess,
    Conn,
    blender_binary,
    blender_env,
    call,
    free_port,
    port_is_free,
    ok,
)

XVFB_RUN = shutil.which("xvfb-run")
pytestmark = pytest.mark.skipif(
    XVFB_RUN is None, reason="xvfb-run not installed (apt-get install xvfb xauth)"
)

READY = re.compile(r"bld_remote listening on (?P<host>\S+):(?P<port>\d+) \(pid (?P<pid>\d+)\)")


class GuiBlender(BlenderProcess):
    """An interactive Blender under `xvfb-run -a`. `self.pid` is xvfb-run's (the process group's leader);
    `self.blender_pid` is Blender's own, read from the ready line."""

    def __init__(self, script: Path, env: dict[str, str]):
        argv = [
            XVFB_RUN,
            "-a",
            "-s",
            "-screen 0 1280x720x24",
            blender_binary(),
            "--factory-startup",
            "--python-exit-code",
            "3",
            "--python",
            str(script),
        ]
        super().__init__(argv, env)
        self.blender_pid: int | None = None

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 90.0) -> re.Match[str]:
        """The first output line (from now on) matching `pattern`."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except Exception:  # queue.Empty
                break
            if line is None:
                raise AssertionError(f"Blender exited (rc {self.proc.wait()}) early:\n{self.output}")
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"no line matching {rx.pattern!r} within {timeout}s:\n{self.output}")

    def wait_ready(self, timeout: float = 90.0) -> int:
        m = self.wait_for(READY, timeout)
        self.host, self.port, self.blender_pid = m["host"], int(m["port"]), int(m["pid"])
        return self.port

    def kill(self) -> None:
        """Stop the whole process group by its id: SIGTERM, then SIGKILL if anything lingers."""
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            deadline = time.monotonic() + wait
            while _group_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _group_alive(self.pid):
                break
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting to be reaped do not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


# Run by Blender at start-up, before its event loop: no splash, then the add-on through Blender's add-on API.
ENABLE_ADDON = """
import bpy, addon_utils
bpy.context.preferences.view.show_splash = False
addon_utils.enable("bld_remote", default_set=True)
print("ADDON", addon_utils.check("bld_remote"), flush=True)
"""


def start_gui(tmp_path: Path, user_scripts: Path, script: str, **env: str) -> GuiBlender:
    """Start an interactive Blender running `script`; retried when Xvfb itself fails to come up."""
    path = tmp_path / f"gui_{time.monotonic_ns()}.py"
    path.write_text(textwrap.dedent(script))
    for attempt in range(3):
        b = GuiBlender(path, blender_env(user_scripts, **env))
        try:
            b.wait_ready()
            return b
        except AssertionError:
            b.kill()
            if attempt == 2 or "Xvfb failed to start" not in b.output:
                raise
    raise AssertionError("unreachable")


def run(port: int, code: str, **params) -> str:
    """execute_code; returns its stdout."""
    return ok(call(port, "execute_code", code=textwrap.dedent(code), **params))["output"]["stdout"]


@pytest.fixture(scope="module")
def gui(tmp_path_factory, user_scripts):
    """One interactive Blender with the add-on enabled through addon_utils and started automatically
    (BLD_REMOTE_MCP_START_NOW), shared by this module's tests."""
    port = free_port()
    b = start_gui(
        tmp_path_factory.mktemp("gui"),
        user_scripts,
        ENABLE_ADDON,
        BLD_REMOTE_MCP_START_NOW="1",
        BLD_REMOTE_MCP_PORT=str(port),
    )
    try:
        assert b.port == port
        yield b
    finally:
        b.kill()


# --- PNG / JPEG decoding (no Pillow) ----------------------------------------------------------------------


def decode_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, channels, rows of raw pixel bytes) of an 8-bit, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    assert header is not None
    width, height, depth, color_type, _, _, interlace = header
    assert depth == 8 and interlace == 0, header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], (prev[i - channels] if i >= channels else 0)
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, channels, rows


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame marker."""
    assert data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"
    pos = 2
    while pos < len(data):
        marker, (length,) = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    raise AssertionError("no SOF marker")


# --- the add-on and the timer pump ------------------------------------------------------------------------


def test_addon_enabled_through_addon_api_and_auto_started(gui):
    assert gui.wait_for(r"^ADDON (.*)$", 30)[1] == "(True, True)"
    status = ok(call(gui.port, "get_status"))
    assert status["running"] is True and status["mode"] == "gui"
    assert status["pid"] == gui.blender_pid
    out = run(
        gui.port,
        """
        import addon_utils
        from bld_remote import gui
        print(addon_utils.check("bld_remote"), bpy.app.background, gui.preferences() is not None)
        """,
    )
    assert out == "(True, True) False True\n"


def test_commands_answered_through_the_timer_pump(gui):
    info = ok(call(gui.port, "get_scene_info"))
    assert {o["name"] for o in info["objects"]} >= {"Cube", "Camera", "Light"}
    out = run(gui.port, "from bld_remote import gui\nprint(gui.pump_is_armed(), gui.KEEPER.active)")
    assert out == "True False\n"
    with Conn(gui.port) as c:
        # Pipelined: 50 framed requests in one write, all answered by the pump.
        c.send(
            b"".join(
                json.dumps({"id": i, "type": "get_object_info", "params": {"name": "Cube"}}).encode()
                for i in range(50)
            )
        )
        replies = [c.reply() for _ in range(50)]
        assert sorted(r["id"] for r in replies) == list(range(50))
        assert all(ok(r)["name"] == "Cube" for r in replies)


def test_a_flood_leaves_the_event_loop_running(gui):
    # Another timer stands in for the UI: it must keep firing while 4000 pipelined requests are served, and
    # the pump must have split the work into budgeted ticks.
    run(
        gui.port,
        """
        import time
        from bld_remote import gui
        ns = bpy.app.driver_namespace
        ticks = ns["bld_remote_test_ticks"] = []
        busy = ns["bld_remote_test_busy"] = []
        ns["bld_remote_test_run_tick"] = run_tick = gui._run_tick
        def counted():
            t, cpu = time.monotonic(), time.thread_time()
            n = run_tick()
            if n:
                busy.append((time.monotonic() - t, n, time.thread_time() - cpu))
            return n
        gui._run_tick = counted
        def tick():
            ticks.append(time.monotonic())
            return 0.0 if "bld_remote_test_ticks" in ns else None
        bpy.app.timers.register(tick)
        """,
        undo=False,
    )
    # Start-up redraws are slow in software GL: wait until the event loop turns over quickly.
    deadline = time.monotonic() + 30
    settled = (
        "ticks = bpy.app.driver_namespace['bld_remote_test_ticks'][-21:]\n"
        "print(len(ticks) > 20 and max(b - a for a, b in zip(ticks, ticks[1:])) < 0.05)"
    )
    while run(gui.port, settled, undo=False) != "True\n":
        assert time.monotonic() < deadline, "Blender's event loop never settled"
        time.sleep(0.2)
    run(gui.port, "bpy.app.driver_namespace['bld_remote_test_busy'].clear()", undo=False)
    n = 4000  # below the job queue's capacity (4096): every request is run, none refused as busy
    with Conn(gui.port) as c:
        t0 = time.monotonic()
        c.send(
            b"".join(
                json.dumps({"id": i, "type": "get_object_info", "params": {"name": "Camera"}}).encode()
                for i in range(n)
            )
        )
        replies = [c.reply() for _ in range(n)]
        elapsed = time.monotonic() - t0
    assert sorted(r["id"] for r in replies) == list(range(n))
    assert all(ok(r)["name"] == "Camera" for r in replies)
    out = run(
        gui.port,
        """
        import json, time
        from bld_remote import gui
        ns = bpy.app.driver_namespace
        gui._run_tick = ns.pop("bld_remote_test_run_tick")
        busy = ns.pop("bld_remote_test_busy")
        start = time.monotonic() - %f
        ticks = [t for t in ns.pop("bld_remote_test_ticks") if t >= start]
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        print(json.dumps({"busy": busy, "worst_gap": max(gaps)}))
        """
        % (elapsed + 0.5),
        undo=False,
    )
    report = json.loads(out)
    jobs = sum(n for _, n, _ in report["busy"])
    assert jobs >= n, report  # (plus the code that collected the report)
    assert len(report["busy"]) >= 2, f"one tick ran all {jobs} jobs: no budget? {report}"
    # Each tick stops once its 30 ms budget is spent (plus the job in hand); then the loop turns over.
    # Judged by the tick's CPU time: its wall time also counts being preempted on a busy machine (this
    # test failed once in a full suite run while it checked wall time). A tick that ignored the budget would run the
    # whole flood at once (~20 us a job here): the two-ticks check above catches that.
    assert max(cpu for _, _, cpu in report["busy"]) < 0.1, report
    # Between ticks the loop is Blender's own: a redraw in software GL can take a few hundred ms on a busy
    # machine (0.25 s was exceeded in 4 of 12 runs, with and without this session's changes). What must
    # never happen is the loop held for long: a wedged pump shows as a gap of seconds.
    assert report["worst_gap"] < 1.0, report


# --- screenshots ------------------------------------------------------------------------------------------


def test_screenshot_png_inline_and_on_disk(gui):
    shot = ok(call(gui.port, "get_viewport_screenshot", max_size=320))
    assert shot["success"] is True and shot["mime_type"] == "image/png" and shot["format"] == "png"
    assert max(shot["width"], shot["height"]) == 320
    data = base64.b64decode(shot["data"])
    assert Path(shot["filepath"]).read_bytes() == data and shot["size"] == len(data)
    width, height, channels, rows = decode_png(data)
    assert (width, height) == (shot["width"], shot["height"])
    pixels = {row[i : i + channels] for row in rows for i in range(0, len(row), channels)}
    assert len(pixels) > 50, f"only {len(pixels)} distinct colours: is the capture blank?"


def test_screenshot_jpeg_to_given_filepath(gui, tmp_path):
    target = tmp_path / "view.jpg"
    shot = ok(call(gui.port, "get_viewport_screenshot", max_size=200, format="jpeg", filepath=str(target)))
    assert shot["filepath"] == str(target) and shot["mime_type"] == "image/jpeg"
    data = target.read_bytes()
    assert base64.b64decode(shot["data"]) == data
    assert jpeg_size(data) == (shot["width"], shot["height"])
    assert max(shot["width"], shot["height"]) == 200


def test_screenshot_bad_params_and_no_inline(gui):
    for params in (
        {"format": "gif"},
        {"max_size": 0},
        {"max_size": "big"},
        {"filepath": "/nonexistent/d/x.png"},
    ):
        r = call(gui.port, "get_viewport_screenshot", **params)
        assert r["status"] == "error" and r["message"], (params, r)
    shot = ok(call(gui.port, "get_viewport_screenshot", max_size=64, inline=False))
    assert "data" not in shot and Path(shot["filepath"]).stat().st_size == shot["size"]


# --- undo -------------------------------------------------------------------------------------------------

UNDO = """
with bpy.context.temp_override(window=bpy.context.window_manager.windows[0]):
    bpy.ops.ed.undo()
"""


def test_undo_reverts_execute_code(gui):
    before = sorted(o["name"] for o in ok(call(gui.port, "get_scene_info"))["objects"])
    run(gui.port, "bpy.ops.mesh.primitive_monkey_add()\nbpy.data.objects['Cube'].location.x = 5")
    after = ok(call(gui.port, "get_scene_info"))
    assert len(after["objects"]) == len(before) + 1
    # Ctrl+Z, sent as code that itself asks for no undo step.
    run(gui.port, UNDO, undo=False)
    info = ok(call(gui.port, "get_scene_info"))
    assert sorted(o["name"] for o in info["objects"]) == before
    assert ok(call(gui.port, "get_object_info", name="Cube"))["location"][0] == 0.0


def test_failing_code_is_still_one_undo_step(gui):
    before = ok(call(gui.port, "get_scene_info"))["object_count"]
    r = call(
        gui.port, "execute_code", code="bpy.ops.mesh.primitive_cylinder_add()\nraise ValueError('half way')"
    )
    assert r["status"] == "error" and "half way" in r["message"]
    assert ok(call(gui.port, "get_scene_info"))["object_count"] == before + 1
    run(gui.port, UNDO, undo=False)
    assert ok(call(gui.port, "get_scene_info"))["object_count"] == before


# --- files and the keeper ---------------------------------------------------------------------------------


def test_file_new_keeps_serving(gui):
    run(gui.port, "bpy.context.scene.collection.objects.link(bpy.data.objects.new('Extra', None))")
    run(gui.port, "bpy.ops.wm.read_homefile()")
    info = ok(call(gui.port, "get_scene_info"))
    assert sorted(o["name"] for o in info["objects"]) == ["Camera", "Cube", "Light"]
    assert run(gui.port, "from bld_remote import gui\nprint(gui.pump_is_armed())") == "True\n"
    # Jobs always see a window in their context (after a file load Blender's timers may get none).
    assert (
        run(gui.port, "print(bpy.context.window is not None, bpy.context.screen is not None)")
        == "True True\n"
    )


def test_keeper_serves_and_shuts_down(gui):
    out = run(gui.port, "print(bpy.ops.wm.bld_remote_keeper('INVOKE_DEFAULT'))", undo=False)
    assert out == "{'RUNNING_MODAL'}\n", out
    # From now on the keeper's TIMER events run the jobs: the timer pump is paused.
    check = "from bld_remote import gui\nprint(gui.pump_is_armed(), gui.KEEPER.active)"
    out = run(gui.port, check)
    assert out == "False True\n", out
    for _ in range(5):
        assert ok(call(gui.port, "get_object_info", name="Cube"))["name"] == "Cube"
    out = run(gui.port, "print(bpy.ops.wm.bld_remote_keeper('INVOKE_DEFAULT'))")
    assert out.endswith("{'CANCELLED'}\n") and "already running" in out, out
    # The class-level flag ends it at its next event; the timer pump takes over again.
    run(gui.port, "from bld_remote import gui\ngui.BLD_REMOTE_OT_keeper.shutdown = True")
    deadline = time.monotonic() + 10
    while (out := run(gui.port, check)) != "True False\n":
        assert time.monotonic() < deadline, f"the keeper did not end: {out!r}\n{gui.output[-2000:]}"
        time.sleep(0.05)
    assert ok(call(gui.port, "get_object_info", name="Cube"))["name"] == "Cube"


def test_quitting_blender_from_a_request_answers_it_and_stops_the_service(tmp_path, user_scripts):
    """A service started by a user's script (no add-on, whose unregister() Blender's quit would call):
    `wm.quit_blender()` from a request quits Blender from its event loop right after the job, and the
    service is stopped at interpreter exit (atexit), so that request's reply is flushed, every thread
    joined and the descriptor removed."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    b = start_gui(
        tmp_path,
        user_scripts,
        "import bld_remote\nbld_remote.start_mcp_service(port=0)\n",
        BLD_REMOTE_RUNTIME_DIR=str(runtime),
    )
    try:
        assert [p for p in runtime.glob("bld_remote-*.json")], "no descriptor while serving"
        c = Conn(b.port)
        r = c.request({"type": "execute_code", "params": {"code": "print('bye')\nbpy.ops.wm.quit_blender()"}})
        assert ok(r)["output"]["stdout"] == "bye\n", r
        assert b.proc.wait(timeout=60) == 0, b.output[-2000:]
        assert port_is_free(b.port)
        assert list(runtime.glob("bld_remote-*.json")) == [], "the service was not stopped at exit"
    finally:
        b.kill()


def test_keeper_ends_on_file_load_and_pump_resumes(gui):
    run(gui.port, "bpy.ops.wm.bld_remote_keeper('INVOKE_DEFAULT')", undo=False)
    run(gui.port, "bpy.ops.wm.read_homefile()")
    check = (
        "from bld_remote import gui\nprint(gui.pump_is_armed(), gui.KEEPER.active, gui.KEEPER.event_timer)"
    )
    assert run(gui.port, check) == "True False None\n"


def test_keeper_refuses_in_background_and_screenshot_errors(start_blender):
    expr = (
        "import addon_utils, bpy; addon_utils.enable('bld_remote', default_set=True)\n"
        "for how in ('INVOKE_DEFAULT', 'EXEC_DEFAULT'):\n"
        "    try:\n"
        "        print('KEEPER', how, bpy.ops.wm.bld_remote_keeper(how))\n"
        "    except RuntimeError as e:\n"
        "        print('KEEPER', how, 'refused:', e)\n"
        "import bld_remote; " + SERVE.format(port=0)
    )
    b = start_blender(expr)
    for how in ("INVOKE_DEFAULT", "EXEC_DEFAULT"):
        line = next(ln for ln in b.lines if ln.startswith(f"KEEPER {how}"))
        assert "refused:" in line and "keep_alive()" in line, line
    r = call(b.port, "get_viewport_screenshot")
    assert r["status"] == "error" and "background" in r["message"]
    assert ok(call(b.port, "server_shutdown"))
    assert b.wait_exit(10) == 0


# --- disable/enable cycles, the auto-start preference, factory settings -----------------------------------

CYCLES = """
import bpy, addon_utils, json, os, socket, time
bpy.context.preferences.view.show_splash = False
PORT = int(os.environ["BLD_REMOTE_MCP_PORT"])
addon_utils.enable("bld_remote", default_set=True)

def thread_names():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{tid}/comm").read().strip())
        except OSError:
            pass
    return sorted(names)

def threads():
    names = thread_names()
    return len(names), sum(n.startswith("bld_remote") for n in names)

def port_free(port):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

def ping(port):
    # Answered on the service's network threads: fine from the main thread, which is busy here.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b'{"type": "ping"}')
        return json.loads(c.makefile().readline())["status"] == "success"

def gone():
    # Every bld_remote thread is joined when disable returns, but a joined thread can stay listed in /proc
    # for a moment: the kernel wakes pthread_join (clearing the thread id) before it unhashes the task. Wait
    # (up to 2 s) for the listing to catch up; a thread that was never joined stays and fails the check.
    deadline = time.monotonic() + 2
    while (seen := threads())[1] != 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    return seen

def settle(like=None):
    # Blender starts and ends short-lived threads of its own: wait (up to 5 s) for the count to match.
    deadline = time.monotonic() + 5
    time.sleep(0.3)
    while like is not None and list(threads()) != like and time.monotonic() < deadline:
        time.sleep(0.1)
    return threads()

def cycles():
    import bld_remote
    report = {"before": settle(), "names_before": thread_names(), "cycles": []}
    for i in range(20):
        keeper = None
        if i == 5:
            # A running keeper must go with the add-on too (its window timer removed, its handler freed).
            with bpy.context.temp_override(window=bpy.context.window_manager.windows[0]):
                keeper = sorted(bpy.ops.wm.bld_remote_keeper("INVOKE_DEFAULT"))
            keeper.append(bld_remote.gui.KEEPER.active)
        if i % 2:
            addon_utils.disable("bld_remote", default_set=True)
        else:
            bpy.ops.preferences.addon_disable(module="bld_remote")
        off = {"running": bld_remote.is_mcp_service_up(), "port_free": port_free(PORT), "threads": gone()}
        if keeper is not None:
            off["keeper"] = keeper + [bld_remote.gui.KEEPER.active, bld_remote.gui.KEEPER.event_timer is None]
        if i % 2:
            addon_utils.enable("bld_remote", default_set=True)
        else:
            bpy.ops.preferences.addon_enable(module="bld_remote")
        report["cycles"].append({"off": off, "ping": ping(PORT)})
    report["after"] = settle(like=list(report["before"]))
    report["names_after"] = thread_names()
    print("CYCLES " + json.dumps(report), flush=True)
    bpy.app.timers.register(auto_start_preference, first_interval=0.5)

def auto_start_preference():
    import bld_remote
    from bld_remote import gui
    # Without the env switch or the preference, enabling does not start the service.
    os.environ.pop("BLD_REMOTE_MCP_START_NOW")
    os.environ.pop("BLD_REMOTE_MCP_PORT")
    addon_utils.disable("bld_remote", default_set=True)
    addon_utils.enable("bld_remote", default_set=True)
    report = {"started_without": bld_remote.is_mcp_service_up()}
    prefs = gui.preferences()
    prefs.port = PORT + 0
    prefs.auto_start = True
    # What Blender does at start-up with saved preferences: enable the add-on, its preferences in place.
    addon_utils.disable("bld_remote", default_set=False)
    addon_utils.enable("bld_remote", default_set=False)
    status = bld_remote.get_status()
    report["started_with"] = status["running"] and status["port"] == PORT
    report["status_line"] = gui.status_line(status)
    # The preferences' Stop and Start buttons.
    bpy.ops.bld_remote.stop_service()
    report["stop_button"] = [bld_remote.is_mcp_service_up(), port_free(PORT), gui.status_line(bld_remote.get_status())]
    bpy.ops.bld_remote.start_service()
    report["start_button"] = [bld_remote.is_mcp_service_up(), ping(PORT), gui.pump_is_armed()]
    # Then serve without the add-on (as a startup script would): the pump must survive factory settings.
    addon_utils.disable("bld_remote", default_set=True)
    report["stopped_on_disable"] = not bld_remote.is_mcp_service_up()
    bld_remote.start_mcp_service(port=PORT)
    print("PREFS " + json.dumps(report), flush=True)

bpy.app.timers.register(cycles, first_interval=1.0)
"""


def _proc_threads(pid: int) -> tuple[int, int]:
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
        except OSError:
            pass
    return len(names), sum(n.startswith("bld_remote") for n in names)


def test_disable_enable_cycles_leak_nothing_then_prefs_and_factory_settings(tmp_path, user_scripts):
    port = free_port()
    b = start_gui(tmp_path, user_scripts, CYCLES, BLD_REMOTE_MCP_START_NOW="1", BLD_REMOTE_MCP_PORT=str(port))
    try:
        report = json.loads(b.wait_for(r"^CYCLES (.*)$", 180)[1])
        assert len(report["cycles"]) == 20
        for i, cycle in enumerate(report["cycles"]):
            assert cycle["off"]["running"] is False, (i, cycle)
            assert cycle["off"]["port_free"] is True, (i, cycle)
            assert cycle["off"]["threads"][1] == 0, (i, cycle)  # no bld_remote thread while disabled
            assert cycle["ping"] is True, (i, cycle)
        assert report["cycles"][5]["off"]["keeper"] == ["RUNNING_MODAL", True, False, True], report["cycles"][
            5
        ]
        # Total threads, and bld_remote's (the listener): as before the cycles.
        # Every thread as before the cycles, by name — except that the allocator Blender is linked with
        # (jemalloc) may have started a background purge thread for an arena our threads used: a pool it
        # bounds itself (about one per CPU), which does not grow with the number of cycles.
        before, after = Counter(report["names_before"]), Counter(report["names_after"])
        jemalloc = "jemalloc_bg_thd"
        assert after[jemalloc] <= before[jemalloc] + 2, (before, after)
        del before[jemalloc], after[jemalloc]
        assert after == before, f"extra threads: {dict(after - before)}, missing: {dict(before - after)}"
        # The service's own thread while no client is connected: the listener (there is no trimmer any more).
        assert report["before"][1] == 1 and report["after"][1] == 1

        prefs = json.loads(b.wait_for(r"^PREFS (.*)$", 60)[1])
        assert prefs["started_without"] is False
        assert prefs["started_with"] is True, prefs
        assert prefs["status_line"].startswith(f"Running on 127.0.0.1:{port}"), prefs
        assert prefs["stop_button"] == [False, True, "Stopped"], prefs
        assert prefs["start_button"] == [True, True, True], prefs
        assert prefs["stopped_on_disable"] is True  # and served again since, by a plain start_mcp_service()

        # Seen from outside: one bld_remote thread (the listener; a new thread names itself once it runs),
        # and no more threads than after the cycles, give or take the allocator's pool.
        deadline = time.monotonic() + 5
        while (seen := _proc_threads(b.blender_pid))[1] != 1:
            assert time.monotonic() < deadline, (seen, report["after"])
            time.sleep(0.1)
        assert seen[0] <= report["after"][0] + 2, (seen, report["after"])
        # Factory settings wipe every timer, persistent or not: load_post re-arms the pump.
        run(port, "bpy.ops.wm.read_factory_settings()\nbpy.context.preferences.view.show_splash = False")
        assert ok(call(port, "get_scene_info"))["object_count"] == 3
        assert run(port, "from bld_remote import gui\nprint(gui.pump_is_armed())") == "True\n"
        ok(call(port, "server_shutdown"))
        deadline = time.monotonic() + 10
        while not port_is_free(port):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        b.kill()
    assert not _group_alive(b.pid)
