"""`bld-remote` as installed from the built wheel (its console script in a fresh venv), against real headless
Blender 3.4.1: start + ready line + exec, graceful stop on SIGTERM/SIGINT, instance descriptors and `ls`,
refusing to guess between instances, busy port, Blender not found, install/uninstall into isolated user
folders. Every Blender started here is killed by its PID, even when a test fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from helpers import (
    READY,
    Started,
    blender_binary,
    blender_env,
    built_wheel,
    call,
    children_of,
    cli_env,
    free_port,
    pid_alive,
    port_is_free,
)


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
def start(installed, runtime_dir):
    """start(*args, env=None) -> Started (ready). Kills every CLI and Blender it started, by PID."""
    started: list[Started] = []

    def run(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> Started:
        s = Started(installed, list(args), env or cli_env(runtime_dir))
        started.append(s)
        if wait:
            s.wait_ready()
        return s

    yield run
    for s in started:
        s.kill()


def cli(installed: Path, *args: str, env: dict[str, str], input: str | None = None, timeout: float = 120):
    return subprocess.run(
        [str(installed / "bld-remote"), *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def descriptors(runtime_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runtime_dir.glob("bld_remote-*.json"))]


# --- start, exec, status, ls ------------------------------------------------------------------------------


def test_start_prints_one_ready_line_then_exec_runs_code(installed, runtime_dir, start, tmp_path):
    env = cli_env(runtime_dir)
    s = start("--background", "--port", "0")
    assert s.port and s.port != 0
    # The descriptor: this instance, owner-only.
    [d] = descriptors(runtime_dir)
    assert (d["pid"], d["port"], d["host"]) == (s.pid, s.port, "127.0.0.1")
    assert d["blender_version"].startswith("3.4") and d["mode"] == "background"
    [path] = runtime_dir.glob("bld_remote-*.json")
    assert path.stat().st_mode & 0o777 == 0o600

    r = cli(
        installed,
        "exec",
        "-c",
        "import sys\nprint('hello from', bpy.app.version_string)\nprint('to stderr', file=sys.stderr)",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from 3.4.1\n"
    assert r.stderr == "to stderr\n"

    script = tmp_path / "job.py"
    script.write_text("result = len(bpy.data.objects)\nprint('file ok')\n")
    r = cli(installed, "exec", str(script), "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stdout"] == "file ok\n" and out["result"] == 3 and out["duration"] >= 0

    r = cli(installed, "exec", "-", "--port", str(s.port), env=env, input="print('from stdin')")
    assert (r.returncode, r.stdout) == (0, "from stdin\n"), r.stderr

    r = cli(installed, "exec", "-c", "print('partial')\n1/0", env=env)
    assert r.returncode == 1
    assert r.stdout == "partial\n"
    assert "Traceback" in r.stderr and "ZeroDivisionError: division by zero" in r.stderr

    r = cli(installed, "status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["port"] == s.port and st["pid"] == s.pid and st["running"] is True

    r = cli(installed, "ls", env=env)
    assert r.returncode == 0 and f"127.0.0.1:{s.port}" in r.stdout and str(s.pid) in r.stdout

    r = cli(installed, "shutdown", env=env)
    assert r.returncode == 0, r.stderr
    assert f"127.0.0.1:{s.port} (pid {s.pid}) shut down" in r.stdout
    assert s.proc.wait(timeout=30) == 0, s.output
    assert not pid_alive(s.pid)
    assert port_is_free(s.port)
    assert descriptors(runtime_dir) == []
    ready_lines = [line for line in s.lines if READY.search(line)]
    assert ready_lines == [f"bld_remote listening on 127.0.0.1:{s.port} (pid {s.pid})\n"], s.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_cli_stops_blender_gracefully(installed, runtime_dir, start, sig):
    env = cli_env(runtime_dir)
    s = start("--background", "--port", "0")
    # A request in flight when the signal arrives must still be answered.
    inflight = subprocess.Popen(
        [str(installed / "bld-remote"), "exec", "-c", "import time; time.sleep(1.0); print('answered')"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.4)
    t0 = time.monotonic()
    s.proc.send_signal(sig)
    out, err = inflight.communicate(timeout=30)
    assert (inflight.returncode, out) == (0, "answered\n"), err
    assert s.proc.wait(timeout=30) == 0, s.output
    assert time.monotonic() - t0 < 10
    assert not pid_alive(s.pid)
    assert port_is_free(s.port)
    assert descriptors(runtime_dir) == []
    assert "Blender quit" in s.output


def test_two_instances_exec_refuses_to_guess(installed, runtime_dir, start, tmp_path):
    env = cli_env(runtime_dir)
    a = start("--background", "--port", "0")
    blend = tmp_path / "scene.blend"
    r = cli(installed, "exec", "-c", f"bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})", env=env)
    assert r.returncode == 0 and blend.exists(), r.stderr
    # The second one opens that file and gets extra Blender args, and script args after a second `--`.
    b = start("--background", "--port", "0", "--scene", str(blend), "--", "--factory-startup", "--", "my-arg")
    assert {d["port"] for d in descriptors(runtime_dir)} == {a.port, b.port}
    assert [d["blend_file"] for d in descriptors(runtime_dir) if d["port"] == b.port] == [str(blend)]

    r = cli(installed, "exec", "-c", "print(1)", env=env)
    assert r.returncode == 3
    assert "2 bld_remote instances are running" in r.stderr
    assert f"--port {a.port}" in r.stderr and f"--port {b.port}" in r.stderr
    assert r.stdout == ""

    r = cli(
        installed,
        "exec",
        "--port",
        str(b.port),
        "-c",
        "import sys; print(bpy.data.filepath, sys.argv[sys.argv.index('--') + 1:])",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{blend} ['my-arg']\n"

    # The Python client refuses to guess too.
    code = (
        "import bld_remote\ntry:\n    bld_remote.Client()\nexcept ConnectionError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    r = subprocess.run([str(installed / "python"), "-P", "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.startswith("BlenderConnectionError 2 bld_remote instances are running"), r.stderr


def test_ls_removes_stale_descriptors(installed, runtime_dir, start):
    env = cli_env(runtime_dir)
    s = start("--background", "--port", "0")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {
        "dead.json": {"pid": dead.pid, "host": "127.0.0.1", "port": free_port(), "started_at": 0},
        # A live process (this one) whose port answers nothing.
        "mute.json": {"pid": os.getpid(), "host": "127.0.0.1", "port": free_port(), "started_at": 0},
    }
    for name, d in stale.items():
        (runtime_dir / f"bld_remote-{name}").write_text(json.dumps(d))
    (runtime_dir / "bld_remote-garbage.json").write_text("{not json")
    r = cli(installed, "ls", "--json", env=env)
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [(d["pid"], d["port"]) for d in listed] == [(s.pid, s.port)]
    assert r.stderr.count("removed stale descriptor") == 3, r.stderr
    assert "its process is gone" in r.stderr and "does not answer" in r.stderr
    assert [p.name for p in runtime_dir.iterdir()] == [f"bld_remote-{s.pid}-{s.port}.json"]
    # With only one live instance left, commands find it without --port.
    assert cli(installed, "exec", "-c", "print(2)", env=env).stdout == "2\n"


def test_no_instance_is_a_clear_error(installed, runtime_dir):
    r = cli(installed, "exec", "-c", "print(1)", env=cli_env(runtime_dir))
    assert r.returncode == 3
    assert "no running bld_remote instance found" in r.stderr
    r = cli(installed, "status", "--port", str(free_port()), env=cli_env(runtime_dir))
    assert r.returncode == 3 and "connection refused" in r.stderr


# --- start failures ------------------------------------------------------------------------------------


def test_busy_port_is_a_clear_error(installed, runtime_dir):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        t0 = time.monotonic()
        r = cli(installed, "start", "--background", "--port", str(port), env=cli_env(runtime_dir), timeout=60)
        assert r.returncode == 1
        assert f"port {port} on 127.0.0.1 is already in use" in r.stderr
        assert time.monotonic() - t0 < 10
    finally:
        holder.close()


def test_no_blender_found_lists_what_it_tried(installed, runtime_dir, tmp_path):
    env = cli_env(runtime_dir, PATH=str(tmp_path), BLD_REMOTE_BLENDER_LOCATIONS=str(tmp_path / "nowhere"))
    env.pop("BLENDER", None)
    r = cli(installed, "start", "--background", env=env)
    assert r.returncode == 1
    assert "Blender not found. Tried:" in r.stderr
    assert "$BLENDER (not set)" in r.stderr and "`blender` on PATH" in r.stderr
    assert str(tmp_path / "nowhere") in r.stderr
    assert "--blender" in r.stderr
    r = cli(installed, "install", "--blender", str(tmp_path / "no-blender"), env=env)
    assert r.returncode == 1 and f"--blender {tmp_path / 'no-blender'}: not an executable" in r.stderr
    r = cli(installed, "start", env={**env, "BLENDER": "/nonexistent/blender"})
    assert r.returncode == 1 and "$BLENDER is /nonexistent/blender" in r.stderr


# --- install / uninstall ------------------------------------------------------------------------------------


def test_install_then_plain_blender_serves_from_saved_prefs(installed, runtime_dir, tmp_path):
    scripts, config = tmp_path / "scripts", tmp_path / "config"
    env = cli_env(runtime_dir, BLENDER_USER_SCRIPTS=str(scripts), BLENDER_USER_CONFIG=str(config))
    for _ in range(2):  # twice: harmless
        r = cli(installed, "install", "--blender", blender_binary(), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"at {scripts / 'addons' / 'bld_remote'}" in r.stdout
    addon = scripts / "addons" / "bld_remote"
    assert (addon / "__init__.py").exists() and list(addon.glob("_core*.so"))
    assert (config / "userpref.blend").exists()
    assert [p.name for p in (scripts / "addons").iterdir()] == ["bld_remote"]  # no staging leftovers

    # A plain Blender: the add-on comes from the saved preferences, START_NOW starts the service on
    # register, and (background mode quits when its scripts end) a keep_alive() keeps it serving.
    port = free_port()
    benv = blender_env(
        scripts,
        BLENDER_USER_CONFIG=str(config),
        BLD_REMOTE_MCP_START_NOW="1",
        BLD_REMOTE_MCP_PORT=str(port),
        BLD_REMOTE_RUNTIME_DIR=str(runtime_dir),
    )
    proc = subprocess.Popen(
        [blender_binary(), "-b", "--python-expr", "import bld_remote; bld_remote.keep_alive()"],
        env=benv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if READY.search(line):
                break
        assert READY.search(lines[-1]), "".join(lines)
        r = call(
            port, "execute_code", code="import bld_remote, os\nprint(os.path.dirname(bld_remote.__file__))"
        )
        assert r["result"]["result"] == f"{addon}\n"
        assert call(port, "server_shutdown")["status"] == "success"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    for expected in ("uninstalled bld_remote from", "was not installed"):
        r = cli(installed, "uninstall", "--blender", blender_binary(), env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert expected in r.stdout
    assert not addon.exists()
    check = subprocess.run(
        [
            blender_binary(),
            "-b",
            "--python-expr",
            "import bpy; print('ENABLED', 'bld_remote' in bpy.context.preferences.addons)",
        ],
        env=benv,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "ENABLED False" in check.stdout, check.stdout + check.stderr


def test_help_and_usage_errors(installed, runtime_dir):
    env = cli_env(runtime_dir)
    r = cli(installed, "--help", env=env)
    assert r.returncode == 0
    for sub in ("start", "install", "uninstall", "exec", "status", "shutdown", "ls"):
        assert sub in r.stdout
    r = cli(installed, "exec", env=env)
    assert r.returncode == 2 and "required" in r.stderr
    r = cli(installed, "--version", env=env)
    assert r.returncode == 0 and r.stdout.startswith("bld-remote 0.")


# The command's crates, as they appear in panic locations (registry paths survive stripping).
CLI_CRATES = re.compile(rb"[/\\](tokio|hyper|hyper-util|rmcp|clap|clap_builder|png|schemars)-[0-9]+\.[0-9]+")


def test_cli_crates_are_not_in_the_module_blender_loads():
    """The CLI is its own wheel (docs/PACKAGING.md): the `_core` module Blender loads links none of its
    crates, and stays small."""
    with zipfile.ZipFile(built_wheel()) as wheel:
        (name,) = [n for n in wheel.namelist() if re.fullmatch(r"bld_remote/_core[^/]*\.so", n)]
        module = wheel.read(name)
        assert not any(n.endswith("/bld-remote") for n in wheel.namelist()), (
            "the command is in the package wheel"
        )
    found = sorted({m.group(1).decode() for m in CLI_CRATES.finditer(module)})
    assert found == [], f"{name} links {found}"
    assert len(module) < 4 * 1024 * 1024, f"{name} is {len(module)} bytes"


# --- GUI mode ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not shutil.which("xvfb-run"), reason="xvfb-run not installed (apt-get install xvfb xauth)"
)
def test_start_gui_under_xvfb_serves_and_sigterm_quits_blender(installed, runtime_dir):
    """Without --background: Blender's window opens (Xvfb), the timer pump serves; SIGTERM to the CLI makes
    Blender quit through its own quit operator: rc 0, port free, descriptor removed."""
    env = cli_env(runtime_dir)
    proc = subprocess.Popen(
        [
            "xvfb-run",
            "-a",
            "-s",
            "-screen 0 1280x720x24",
            str(installed / "bld-remote"),
            "start",
            "--port",
            "0",
            "--",
            "--factory-startup",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    blender_pid = None
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if m := READY.search(line):
                break
        assert m, "".join(lines) + proc.stderr.read()
        port, blender_pid = int(m["port"]), int(m["pid"])
        r = cli(
            installed,
            "exec",
            "-c",
            "print(bpy.app.background, len(bpy.context.window_manager.windows))",
            env=env,
        )
        assert (r.returncode, r.stdout) == (0, "False 1\n"), r.stderr
        [cli_pid] = [
            p for p in children_of(proc.pid) if "bld-remote" in Path(f"/proc/{p}/cmdline").read_text()
        ]
        os.kill(cli_pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
        assert rc == 0, proc.stderr.read()  # xvfb-run exits with the CLI's status, which is Blender's
        assert not pid_alive(blender_pid)
        assert port_is_free(port)
        assert descriptors(runtime_dir) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if blender_pid and pid_alive(blender_pid):
            os.kill(blender_pid, signal.SIGKILL)


# --- auth -----------------------------------------------------------------------------------------------


def test_generated_token_lives_in_the_owner_only_descriptor_and_clients_use_it(installed, runtime_dir, start):
    # BLD_REMOTE_TOKEN=auto asks the service to generate a token; for clients "auto" is not a token.
    env = cli_env(runtime_dir, BLD_REMOTE_TOKEN="auto")
    s = start("--background", "--port", "0", env=env)
    [path] = runtime_dir.glob("bld_remote-*.json")
    assert path.stat().st_mode & 0o777 == 0o600
    [d] = descriptors(runtime_dir)
    assert d["auth"] is True and len(d["token"]) >= 32

    # Without the token: refused, and nothing ran.
    r = call(s.port, "execute_code", code="bpy.context.scene['touched'] = 1")
    assert r["status"] == "error" and "authentication required" in r["message"], r
    # The owner's CLI and Client find the token in the descriptor.
    r = cli(installed, "exec", "-c", "print(bpy.context.scene.get('touched'))", env=env)
    assert (r.returncode, r.stdout) == (0, "None\n"), r.stderr
    code = "import bld_remote; print(bld_remote.Client().scene_info()['object_count'])"
    r = subprocess.run([str(installed / "python"), "-P", "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout == "3\n", r.stderr
    # `ls` never prints it.
    r = cli(installed, "ls", "--json", env=env)
    assert r.returncode == 0 and d["token"] not in r.stdout and str(s.port) in r.stdout
    # The graceful stop goes through the authenticated service.
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0, s.output
    assert descriptors(runtime_dir) == []
