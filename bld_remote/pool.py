"""``bld_remote.Pool``: several Blenders behind one ``map``. Outside Blender only (it never imports ``bpy``).

The scheduling is native (``bld_remote_core::pool``, the same code as ``bld-remote map``): one worker thread
per instance, one item in flight on each, the GIL released for the whole map. This module only adds what
belongs to Python: turning items into JSON, the ``return_exceptions`` rule, and owning the ``bld-remote start
--background --instances N`` supervisor that ``Pool.start`` launches (its ready lines give the ports; it
restarts an instance that dies, on the same port; SIGTERM stops every Blender and removes their
descriptors). Details: docs/POOL.md.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._core import BlenderConnectionError, PoolClient

__all__ = ["Pool"]

# The supervisor's ready line, one per instance (crates/cli/src/cli/start.rs writes it).
_READY = re.compile(
    r"^bld_remote listening on (?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+) \(pid (?P<pid>\d+)\) "
    r"instance=(?P<k>\d+)/(?P<n>\d+)"
)
# Lines of the supervisor's output kept for error messages and ``Pool.log``.
_LOG_LINES = 500
# How long close() waits for the supervisor's graceful stop (it kills its Blenders after 30 s itself).
_STOP_WAIT = 45.0


def _find_command() -> str:
    """The ``bld-remote`` executable: beside this Python (a venv's bin/), else on PATH."""
    found = shutil.which(
        "bld-remote", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if not found:
        raise FileNotFoundError(
            "the bld-remote command was not found beside this Python or on PATH: install the bld_remote_cli "
            "wheel (docs/PACKAGING.md), or pass command='/path/to/bld-remote'"
        )
    return found


class _Supervisor:
    """One ``bld-remote start --instances N`` process: its output is read on a thread (so the pipe never
    fills and stalls Blender), ready lines are parsed, and ``stop`` ends it by PID."""

    def __init__(self, argv: list[str], n: int):
        self.n = n
        self.log: collections.deque[str] = collections.deque(maxlen=_LOG_LINES)
        self.ready: dict[int, tuple[str, int, int]] = {}
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            # Its own session: a terminal's Ctrl+C reaches this Python (which then closes the pool), not the
            # supervisor behind its back.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="bld_remote-pool-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            m = _READY.match(line)
            with self._changed:
                self.log.append(line)
                if m:
                    host = m["host"].strip("[]")
                    self.ready[int(m["k"])] = (host, int(m["port"]), int(m["pid"]))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.log)

    def wait_ready(self, timeout: float) -> list[tuple[str, int, int]]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.ready) < self.n:
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise BlenderConnectionError(
                        f"bld-remote start exited (status {self.proc.returncode}) before {self.n} instances were "
                        f"ready:\n{chr(10).join(self.log)}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BlenderConnectionError(
                        f"{len(self.ready)} of {self.n} instances were ready after {timeout:.0f} s:\n"
                        + "\n".join(self.log)
                    )
                self._changed.wait(min(left, 0.5))
            return [self.ready[k] for k in sorted(self.ready)]

    def stop(self) -> int | None:
        return _stop(self.proc, self._reader)


def _stop(proc: subprocess.Popen[str], reader: threading.Thread) -> int | None:
    """SIGTERM the supervisor (it stops every Blender gracefully and removes their descriptors), then wait;
    SIGKILL if it does not exit (its Blenders get SIGTERM from the kernel then: PR_SET_PDEATHSIG)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=_STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    reader.join(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


class Pool:
    """Several Blenders behind one ``map``.

    ``Pool()`` attaches to every bld_remote instance running on this machine (their descriptors; none →
    ``BlenderConnectionError``), or to ``instances=[(host, port), ...]``. An attached instance that dies
    during a map is dropped from the pool. ``Pool.start(n)`` launches and owns ``n`` headless Blenders (an
    owned one that dies is restarted on its port and the map waits for it); they stop when the ``with``
    block ends, on ``close()``, or when the pool is garbage collected.
    """

    def __init__(
        self,
        instances: list[tuple[str, int]] | None = None,
        *,
        host: str | None = None,
        token: str | None = None,
    ) -> None:
        self._client = PoolClient(instances, host=host, token=token)
        self._supervisor: _Supervisor | None = None
        self._restart_wait = 120.0
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @classmethod
    def start(
        cls,
        n: int,
        blender: str | os.PathLike[str] | None = None,
        scene: str | os.PathLike[str] | None = None,
        *,
        token: str | None = None,
        ready_timeout: float = 120.0,
        max_restarts: int = 5,
        command: str | os.PathLike[str] | None = None,
    ) -> Pool:
        """Launch ``n`` headless Blenders (``bld-remote start --background --instances n``) and own them.
        ``token="auto"`` gives each its own token. Raises ``BlenderConnectionError`` (with the supervisor's
        output) when they do not all become ready within ``ready_timeout`` seconds; nothing is left running."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise ValueError(f"n must be an integer from 1 to 64, got {n!r}")
        if not (isinstance(ready_timeout, (int, float)) and 0 < ready_timeout <= 86_400):
            raise ValueError(
                f"ready_timeout must be a positive number of seconds (at most a day), got {ready_timeout!r}"
            )
        argv = [
            str(command) if command is not None else _find_command(),
            "start",
            "--background",
            "--instances",
            str(n),
            "--stop-with-parent",
            "--ready-timeout",
            str(ready_timeout),
            "--max-restarts",
            str(max_restarts),
        ]
        if blender is not None:
            argv += ["--blender", os.fspath(blender)]
        if scene is not None:
            argv += ["--scene", os.fspath(scene)]
        if token is not None:
            argv += ["--token", token]
        sup = _Supervisor(argv, n)
        try:
            ready = sup.wait_ready(ready_timeout + 5)
            explicit = None if token is None or token.strip().lower() == "auto" else token
            client = PoolClient(
                [(h, p) for h, p, _ in ready], token=explicit, owned=True, pids=[pid for _, _, pid in ready]
            )
        except BaseException:
            sup.stop()
            raise
        pool = cls.__new__(cls)
        pool._client = client
        pool._supervisor = sup
        pool._restart_wait = float(ready_timeout) + 5
        pool._finalizer = weakref.finalize(pool, _stop, sup.proc, sup._reader)
        return pool

    @property
    def instances(self) -> list[dict[str, Any]]:
        """``[{"host", "port", "pid"}, ...]``: the instances now in the pool."""
        return self._client.instances

    @property
    def owned(self) -> bool:
        """Whether this pool launched its instances (and restarts and stops them)."""
        return self._supervisor is not None

    @property
    def log(self) -> str:
        """The supervisor's recent output (owned pools; Blender's own lines are prefixed ``[K]``)."""
        return self._supervisor.output() if self._supervisor is not None else ""

    def map(
        self,
        code: str,
        items: Iterable[Any],
        *,
        timeout: float | None = None,
        retries: int = 0,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run ``code`` once per item, with ``item`` bound in its namespace; return each run's ``result`` in
        item order. Each item goes to whichever instance is free, one in flight per instance.

        An item whose code raises is its ``RemoteError``; one whose Blender died while it ran is
        ``OutcomeUnknown`` (never sent again unless ``retries > 0``: say so only for idempotent code);
        ``timeout`` (seconds per item) gives ``BlenderTimeoutError``. With ``return_exceptions`` those
        exceptions stand in the list in their item's place; without it, the first failing item's exception is
        raised once every other item has finished (its ``results`` attribute holds the whole list)."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str of Python, got {type(code).__name__}")
        texts = []
        for i, item in enumerate(items):
            try:
                texts.append(json.dumps(item, allow_nan=False))
            except (TypeError, ValueError) as e:
                raise type(e)(
                    f"items[{i}] is not JSON ({e}): map sends each item to Blender as JSON"
                ) from None
        if not texts:
            return []
        entries = self._client.map(
            code, texts, timeout=timeout, retries=retries, restart_wait=self._restart_wait
        )
        results = [value for _, value in entries]
        if not return_exceptions:
            for ok, value in entries:
                if not ok:
                    value.results = results
                    raise value
        return results

    def close(self) -> None:
        """Owned pools: stop every Blender (gracefully; in-flight requests are answered) and the supervisor,
        leaving no process and no descriptor. Attached pools: nothing to stop. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._client)

    def __repr__(self) -> str:
        kind = "owned" if self.owned else "attached"
        return f"<bld_remote.Pool {kind} {[(i['host'], i['port']) for i in self.instances]}>"
