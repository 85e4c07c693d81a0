"""Test helpers: start a real Blender serving bld_remote from the built wheel, stop it by PID, talk to it
over a real socket."""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Set to a Python that has PyPI `bpy` installed to run the same tests in `bpy` as a module (Blender 4.2+,
# behaves like --background) instead of Debian's `blender` binary. See scripts/test-bpy.sh.
BPY_PYTHON = os.environ.get("BLD_REMOTE_TEST_BPY_PYTHON") or None
READY = re.compile(r"bld_remote listening on (?P<host>[^\s:]+|\[[^\]]+\]):(?P<port>\d+) \(pid (?P<pid>\d+)\)")


def blender_binary() -> str:
    found = os.environ.get("BLENDER") or shutil.which("blender")
    if not found:
        pytest.fail(
            "Blender not found: install it (apt-get install -y blender) or set $BLENDER", pytrace=False
        )
    return found


def _newest_wheel(pattern: str, env: str, build: list[str]) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    wheels = sorted(glob.glob(str(ROOT / "dist" / pattern)), key=os.path.getmtime)
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "maturin", "build", "--release", "-o", str(ROOT / "dist"), *build],
            cwd=ROOT,
            check=True,
        )
        wheels = sorted(glob.glob(str(ROOT / "dist" / pattern)), key=os.path.getmtime)
    return Path(wheels[-1])


def built_wheel() -> Path:
    """The package wheel under test (bld_remote and its native module): $BLD_REMOTE_WHEEL, else the newest
    dist/bld_remote-*.whl, else build one now."""
    return _newest_wheel("bld_remote-*.whl", "BLD_REMOTE_WHEEL", [])


def built_cli_wheel() -> Path:
    """The `bld-remote` command's wheel (crates/cli): $BLD_REMOTE_CLI_WHEEL, else the newest
    dist/bld_remote_cli-*.whl, else build one now."""
    return _newest_wheel("bld_remote_cli-*.whl", "BLD_REMOTE_CLI_WHEEL", ["-m", "crates/cli/Cargo.toml"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on the port, and a new server can bind it (with SO_REUSEADDR, as servers do;
    connections closed by the old server may linger in TIME_WAIT, which does not block that)."""
    with socket.socket() as probe:
        probe.settimeout(1)
        if probe.connect_ex((host, port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()
        except OSError:
            return False
        return True


NEUTRAL_CWD = tempfile.mkdtemp(prefix="bld_remote_cwd_")


class BlenderProcess:
    """One Blender process; its output is collected on a thread so pipes never fill."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.args = args
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=NEUTRAL_CWD,  # never the source tree: nothing may be imported from it by accident
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.host: str | None = None
        self.port: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"Blender exited (rc {self.proc.wait()}) before serving:\n{self.output}")
            m = READY.search(line)
            if m:
                self.host, self.port = m["host"], int(m["port"])
                assert int(m["pid"]) == self.pid
                return self.port
        raise AssertionError(f"Blender did not report ready within {timeout}s:\n{self.output}")

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """Stop by PID: SIGTERM, then SIGKILL to the whole session if it lingers."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


def runtime_argv(expr: str, args: list[str] | None = None) -> list[str]:
    """The command line that runs `expr` in the Blender under test, headless."""
    if BPY_PYTHON:
        if args:
            raise AssertionError(f"Blender command-line arguments {args} do not apply to bpy as a module")
        # -P: do not put the working directory first on sys.path (it may be this source tree).
        return [BPY_PYTHON, "-P", "-c", "import bpy\n" + expr]
    return [
        blender_binary(),
        "-b",
        "--factory-startup",
        "--python-exit-code",
        "3",
        *(args or []),
        "--python-expr",
        expr,
    ]


def blender_env(user_scripts: Path, **extra: str) -> dict[str, str]:
    # Blender honours VIRTUAL_ENV (it adds the venv's site-packages, .pth files included): a venv with an
    # editable install would make Blender import the source tree instead of the wheel under test.
    drop = {"VIRTUAL_ENV", "VIRTUAL_ENV_PROMPT", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLD_REMOTE_") and k not in drop}
    # Blender's embedded Python also finds a venv through PATH (sys.executable is looked up there, and a
    # pyvenv.cfg beside it turns the venv on): keep venv bin folders out of PATH too.
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p, "..", "pyvenv.cfg").exists()
    )
    env["BLENDER_USER_SCRIPTS"] = str(user_scripts)
    if BPY_PYTHON:
        env["PYTHONPATH"] = str(user_scripts / "addons")
    env.update(extra)
    return env


SERVE = "import bld_remote; bld_remote.start_mcp_service(port={port}); bld_remote.keep_alive()"


class Conn:
    """A raw client connection: send any bytes, read newline-terminated JSON replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def send(self, data: bytes | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        """One reply line. Linear in its size: only newly received bytes are searched for the newline."""
        searched = 0
        while (end := self.buf.find(b"\n", searched)) < 0:
            searched = len(self.buf)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"connection closed; unterminated data: {bytes(self.buf[:200])!r}")
            self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        return line

    def reply(self) -> dict:
        return json.loads(self.read_line())

    def request(self, command: str | dict, **params) -> dict:
        self.send(command if isinstance(command, dict) else {"type": command, "params": params})
        return self.reply()

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def call(port: int, command: str | dict, **params) -> dict:
    """One request on a fresh connection."""
    with Conn(port) as c:
        return c.request(command, **params)


def cli_env(runtime_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLD_REMOTE_")}
    env["BLD_REMOTE_RUNTIME_DIR"] = str(runtime_dir)
    env.update(extra)
    return env


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


class Started:
    """`bld-remote start ...` running in the background; its stdout collected line by line."""

    def __init__(self, bindir: Path, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [str(bindir / "bld-remote"), "start", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.lines: list[str] = []
        self.err: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err, False), daemon=True).start()
        self.blender_pids: set[int] = set()
        self.port: int | None = None
        self.pid: int | None = None

    def _pump(self, stream, sink: list[str], notify: bool) -> None:
        for line in stream:
            sink.append(line)
            if notify:
                self._q.put(line)
        if notify:
            self._q.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines) + "\n--- stderr ---\n" + "".join(self.err)

    def wait_ready(self, timeout: float = 90) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.blender_pids.update(children_of(self.proc.pid))
            try:
                line = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"bld-remote start exited ({self.proc.wait()}) before ready:\n{self.output}"
                )
            m = READY.search(line)
            if m:
                self.port, self.pid = int(m["port"]), int(m["pid"])
                self.blender_pids.add(self.pid)
                return self.port
        raise AssertionError(f"no ready line within {timeout}s:\n{self.output}")

    def kill(self) -> None:
        self.blender_pids.update(children_of(self.proc.pid))
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in self.blender_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ok(reply: dict) -> dict:
    """The result of a success reply (fails the test, showing the reply, otherwise)."""
    assert reply.get("status") == "success", reply
    return reply["result"]


def err(reply: dict) -> str:
    """The message of an error reply (fails the test, showing the reply, otherwise)."""
    assert reply.get("status") == "error", reply
    assert reply["message"]
    return reply["message"]
