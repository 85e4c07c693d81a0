"""Tokens are never handed to strangers (issue 14, part 3), against a real headless Blender 3.4.1.

A service with a token is killed with SIGKILL, so its owner-only descriptor (which holds the token) stays
behind; a "port squatter" then takes the port: a TCP server in this test that records every byte it
receives and answers like a service would, faking the handshake three ways. `Client(port=P)`,
`bld-remote exec --port P` and the MCP server must fail clearly, and the squatter must never receive the
token. Also: a restarted service with the right token works through the handshake, a wrong token fails, a
relay to the real service fails, old-style clients sending a plain token still work, a planted symlink at
the descriptor's paths is not followed, and stale descriptors disappear on lookup.

Every Blender is started by the shared fixtures and killed by PID; every squatter is closed."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import Conn, cli_env, free_port, ok, pid_alive, port_is_free

UNVERIFIED = "could not verify"
EXIT_UNVERIFIED = 5


class Squatter:
    """Listens on 127.0.0.1:port, records every byte received, answers each request line like a bld_remote
    service would. `mode` says how it fakes the handshake: "fake" (a made-up proof), "open" (claims no token
    is needed), "old" (does not know the handshake, like a service from before it), "relay" (forwards to a
    real service on `upstream`, so it can pass that service's genuine proof along)."""

    def __init__(
        self, port: int, mode: str, pid: int = 4242, upstream: int | None = None, host: str = "127.0.0.1"
    ):
        self.port, self.mode, self.pid, self.upstream = port, mode, pid, upstream
        self.received = bytearray()
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            target = self._relay if self.mode == "relay" else self._serve
            t = threading.Thread(target=target, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _record(self, chunk: bytes) -> None:
        with self._lock:
            self.received += chunk

    def _answer(self, req: dict) -> dict:
        rid, kind = req.get("id"), req.get("type")
        if kind == "auth_challenge":
            if self.mode == "old":
                return {"id": rid, "status": "error", "message": f"Unknown command type: {kind}"}
            if self.mode == "open":
                return {"id": rid, "status": "success", "result": {"auth": False, "version": 1}}
            return {
                "id": rid,
                "status": "success",
                "result": {
                    "auth": True,
                    "version": 1,
                    "alg": "hmac-sha256",
                    "server_nonce": secrets.token_hex(32),
                    "port": self.port,
                    "pid": self.pid,
                    "proof": secrets.token_hex(32),
                },
            }
        # Anything else "succeeds", with what a real service would say.
        result = {
            "authenticated": True,
            "pong": True,
            "pid": self.pid,
            "executed": True,
            "result": "squatted\n",
            "output": {"stdout": "squatted\n", "stderr": ""},
            "duration": 0.0,
        }
        return {"id": rid, "status": "success", "result": result}

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                self._record(chunk)
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        req = json.loads(line)
                    except ValueError:
                        continue
                    try:
                        conn.sendall(json.dumps(self._answer(req)).encode() + b"\n")
                    except OSError:
                        return

    def _relay(self, conn: socket.socket) -> None:
        assert self.upstream is not None
        up = socket.create_connection(("127.0.0.1", self.upstream))

        def back() -> None:
            while chunk := _recv(up):
                try:
                    conn.sendall(chunk)
                except OSError:
                    return

        threading.Thread(target=back, daemon=True).start()
        with conn, up:
            while chunk := _recv(conn):
                self._record(chunk)
                up.sendall(chunk)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()

    def __enter__(self) -> Squatter:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


def descriptor_paths(runtime_dir: Path) -> list[Path]:
    return sorted(runtime_dir.glob("bld_remote-*.json"))


def py_client(installed: Path, code: str, env: dict[str, str]) -> dict:
    """Run `code` in the installed package's Python; it prints one JSON line, read back here."""
    prelude = "import json, bld_remote\nfrom bld_remote import Client, BlenderConnectionError\n"
    r = subprocess.run(
        [str(installed / "python"), "-P", "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


TRY_EXECUTE = """
try:
    r = Client({args}).execute("print('ran')")
    print(json.dumps({{"stdout": r.stdout}}))
except BlenderConnectionError as e:
    print(json.dumps({{"error": str(e)}}))
"""


def cli(installed: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(installed / "bld-remote"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def mcp_execute(installed: Path, port: int, env: dict[str, str]) -> tuple[bool, str]:
    """`bld-remote mcp --port P` over stdio (the official SDK): call execute_blender_code once."""
    mcp = pytest.importorskip("mcp")
    import asyncio

    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(
        command=str(installed / "bld-remote"), args=["mcp", "--port", str(port), "--timeout", "20"], env=env
    )

    async def main() -> tuple[bool, str]:
        async with mcp.Client(params, mode="legacy") as client:
            r = await client.call_tool("execute_blender_code", {"code": "print('ran')"})
            texts = "\n".join(c.text for c in r.content if getattr(c, "type", None) == "text")
            return bool(r.is_error), texts

    return asyncio.run(main())


def serve_with_token(start_blender, runtime_dir: Path, token: str, port: int = 0):
    b = start_blender(port=port, env={"BLD_REMOTE_RUNTIME_DIR": str(runtime_dir), "BLD_REMOTE_TOKEN": token})
    [path] = [p for p in descriptor_paths(runtime_dir) if f"-{b.pid}-" in p.name]
    d = json.loads(path.read_text())
    assert d["token"] == token and d["auth"] is True and path.stat().st_mode & 0o777 == 0o600
    return b, path


def kill9(b) -> None:
    b.signal(signal.SIGKILL)
    b.wait_exit(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (pid_alive(b.pid) or not port_is_free(b.port)):
        time.sleep(0.05)
    assert not pid_alive(b.pid) and port_is_free(b.port)


def restore(path: Path, data: bytes) -> None:
    """Put the killed service's descriptor back (each client's lookup prunes it)."""
    path.write_bytes(data)
    path.chmod(0o600)


# --- a port squatter after kill -9 ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fake", "open", "old"])
def test_squatter_on_a_dead_services_port_never_gets_the_token(installed, start_blender, runtime_dir, mode):
    token = "tok-" + secrets.token_urlsafe(32)
    b, path = serve_with_token(start_blender, runtime_dir, token)
    saved = path.read_bytes()
    kill9(b)
    assert path.exists(), "SIGKILL leaves the descriptor behind"
    env = cli_env(runtime_dir)

    with Squatter(b.port, mode, pid=b.pid) as sq:
        # bld_remote.Client: the token comes from the stale descriptor; the squatter cannot prove it.
        out = py_client(installed, TRY_EXECUTE.format(args=f"port={b.port}"), env)
        assert UNVERIFIED in out.get("error", ""), out
        assert "Nothing was sent to it" in out["error"]
        assert not path.exists(), "the lookup pruned the stale descriptor"

        # bld-remote exec --port P: status 5, a clear message, nothing of the squatter's printed.
        restore(path, saved)
        r = cli(installed, "exec", "--port", str(b.port), "-c", "print('ran')", env=env)
        assert r.returncode == EXIT_UNVERIFIED, (r.returncode, r.stdout, r.stderr)
        assert UNVERIFIED in r.stderr and "squatted" not in r.stdout, r.stderr

        # The token given explicitly (environment) instead of from the descriptor: the same refusal.
        r = cli(installed, "status", "--port", str(b.port), env={**env, "BLD_REMOTE_TOKEN": token})
        assert r.returncode == EXIT_UNVERIFIED and UNVERIFIED in r.stderr, (r.returncode, r.stderr)

        # The MCP server: the tool call fails saying so.
        restore(path, saved)
        failed, text = mcp_execute(installed, b.port, env)
        assert failed and UNVERIFIED in text, text

        received = bytes(sq.received)

    assert sq.connections >= 4
    assert b"auth_challenge" in received, received[:500]
    assert token.encode() not in received, "the squatter received the token"
    # Nothing else either: no client proof (it could replay or relay it), no request.
    assert b'"authenticate"' not in received and b"execute_code" not in received, received[:2000]


def test_restarted_service_with_the_same_token_works_and_wrong_tokens_and_relays_fail(
    installed, start_blender, runtime_dir
):
    token = "tok-" + secrets.token_urlsafe(32)
    port = free_port()
    first, stale = serve_with_token(start_blender, runtime_dir, token, port=port)
    kill9(first)
    b, live = serve_with_token(start_blender, runtime_dir, token, port=port)
    assert stale.exists() and live.exists()
    env = cli_env(runtime_dir)

    # The handshake succeeds with the real service (token from the live descriptor), and the lookup pruned
    # the stale one.
    out = py_client(installed, TRY_EXECUTE.format(args=f"port={port}"), env)
    assert out == {"stdout": "ran\n"}, out
    assert not stale.exists() and live.exists()
    r = cli(installed, "exec", "--port", str(port), "-c", "print('ran')", env=env)
    assert (r.returncode, r.stdout) == (0, "ran\n"), r.stderr
    failed, text = mcp_execute(installed, port, env)
    assert not failed and "ran" in text, text
    # Without a port: `pick` finds the one live instance, through the handshake too.
    r = cli(installed, "exec", "-c", "print('picked')", env=env)
    assert (r.returncode, r.stdout) == (0, "picked\n"), r.stderr

    # A wrong token: the service cannot prove it, so the client refuses (and sends no proof of its own).
    out = py_client(installed, TRY_EXECUTE.format(args=f"port={port}, token='wrong'"), env)
    assert UNVERIFIED in out.get("error", ""), out
    r = cli(installed, "exec", "--port", str(port), "--token", "wrong", "-c", "print(1)", env=env)
    assert r.returncode == EXIT_UNVERIFIED and UNVERIFIED in r.stderr, (r.returncode, r.stderr)

    # A relay on another port forwards to the real service, so it can pass the real proof along: the proof
    # names the real port, the client refuses, and the relay never sees the token.
    with Squatter(free_port(), "relay", upstream=port) as relay:
        out = py_client(installed, TRY_EXECUTE.format(args=f"port={relay.port}, token={token!r}"), env)
        assert UNVERIFIED in out.get("error", "") and "relay" in out["error"], out
        received = bytes(relay.received)
    assert b"auth_challenge" in received and token.encode() not in received
    assert b'"authenticate"' not in received and b"execute_code" not in received

    # The same port on another loopback address: a relay on [::1]:P to the service on 127.0.0.1:P proves
    # the right port but the wrong address.
    try:
        v6 = Squatter(port, "relay", upstream=port, host="::1")
    except OSError:
        v6 = None  # no IPv6 loopback here
    if v6 is not None:
        with v6:
            out = py_client(
                installed, TRY_EXECUTE.format(args=f"host='::1', port={port}, token={token!r}"), env
            )
            assert UNVERIFIED in out.get("error", "") and "127.0.0.1" in out["error"], out
            received = bytes(v6.received)
        assert b"auth_challenge" in received and token.encode() not in received
        assert b'"authenticate"' not in received

    # Old-style clients with a plain token keep working; without one they are refused, nothing runs.
    with Conn(port) as c:
        assert (
            ok(c.request({"type": "execute_code", "params": {"code": "print(7)"}, "token": token}))["output"][
                "stdout"
            ]
            == "7\n"
        )
        r = c.request({"type": "ping"})
        assert r["status"] == "error" and r["auth"] is False and "authentication required" in r["message"]
        # The handshake by hand, as a third-party client would implement it (docs/PROTOCOL.md).
        import hashlib
        import hmac

        cn = secrets.token_hex(32)
        ch = ok(c.request({"type": "auth_challenge", "params": {"client_nonce": cn}, "id": 1}))
        assert (ch["addr"], ch["port"], ch["pid"]) == ("127.0.0.1", port, b.pid) and token not in json.dumps(
            ch
        )

        def mac(role: str) -> str:
            msg = f"bld_remote-auth-v1|{role}|{cn}|{ch['server_nonce']}|{ch['addr']}|{ch['port']}|{ch['pid']}"
            return hmac.new(token.encode(), msg.encode(), hashlib.sha256).hexdigest()

        assert hmac.compare_digest(ch["proof"], mac("service"))
        assert ok(c.request({"type": "authenticate", "params": {"proof": mac("client")}, "id": 2})) == {
            "authenticated": True,
            "role": "full",
        }
        assert ok(c.request({"type": "ping", "id": 3}))["pong"] is True
    status = ok(Conn(port).request({"type": "get_status", "token": token}))
    # The refused ping above, and the squatter-free wrong-token attempts sent no proof: one failure.
    assert status["auth_failures"] == 1, status


# --- descriptor files -------------------------------------------------------------------------------------


def test_descriptor_writes_never_follow_planted_symlinks(start_blender, runtime_dir, tmp_path):
    port = free_port()
    victim, victim_tmp = tmp_path / "victim.txt", tmp_path / "victim_tmp.txt"
    victim.write_text("precious")
    victim_tmp.write_text("precious too")
    runtime_dir.chmod(0o755)
    # Planted before the service writes its descriptor, at the final name and at the temp name.
    expr = (
        "import os, bld_remote\n"
        f"rd = {str(runtime_dir)!r}\n"
        f"name = 'bld_remote-%d-{port}.json' % os.getpid()\n"
        f"os.symlink({str(victim)!r}, os.path.join(rd, name))\n"
        f"os.symlink({str(victim_tmp)!r}, os.path.join(rd, '.' + name + '.tmp'))\n"
        f"bld_remote.start_mcp_service(port={port})\n"
        "bld_remote.keep_alive()\n"
    )
    b = start_blender(expr, env={"BLD_REMOTE_RUNTIME_DIR": str(runtime_dir), "BLD_REMOTE_TOKEN": "auto"})
    path = runtime_dir / f"bld_remote-{b.pid}-{port}.json"
    assert victim.read_text() == "precious" and victim_tmp.read_text() == "precious too"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o600, oct(st.st_mode)
    d = json.loads(path.read_text())
    assert d["pid"] == b.pid and d["token"]
    assert not (runtime_dir / f".{path.name}.tmp").exists() and not os.path.islink(
        runtime_dir / f".{path.name}.tmp"
    )
    assert os.stat(runtime_dir).st_mode & 0o777 == 0o700


def test_stale_descriptors_disappear_on_every_lookup(installed, runtime_dir):
    env = cli_env(runtime_dir)

    def plant(pid: int, port: int, **extra) -> Path:
        d = {"pid": pid, "host": "127.0.0.1", "port": port, "started_at": 0, "auth": True, "token": "t" * 43}
        p = runtime_dir / f"bld_remote-{pid}-{port}.json"
        p.write_text(json.dumps({**d, **extra}))
        p.chmod(0o600)
        return p

    # A dead pid: the lookup behind `exec --port` prunes it (and the dead port refuses the connection).
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_port = free_port()
    p = plant(gone.pid, dead_port)
    r = cli(installed, "exec", "--port", str(dead_port), "-c", "1", env=env)
    assert r.returncode != 0 and not p.exists(), (r.returncode, r.stderr)

    # A live pid that names another process than the one recorded (PID reuse: its start time differs).
    p = plant(os.getpid(), free_port(), process_start=1)
    out = py_client(installed, TRY_EXECUTE.format(args=f"port={json.loads(p.read_text())['port']}"), env)
    assert "error" in out and not p.exists(), out

    # A live pid whose port is held by something that cannot prove the token: `ls` (and `pick`) prune it.
    with Squatter(free_port(), "fake") as sq:
        p = plant(os.getpid(), sq.port)
        r = cli(installed, "ls", env=env)
        assert r.returncode == 0 and "no running bld_remote instances" in r.stdout, r.stdout
        assert "does not answer as that instance" in r.stderr and not p.exists(), r.stderr
        assert b"t" * 43 not in bytes(sq.received)
