"""bld_remote.ray: many headless Blenders on many machines, on Ray's own parts (no scheduler of ours).

An optional extra (``pip install 'bld-remote[ray]'``); nothing here runs inside Blender. Two parts:

- ``BlenderActor``: a Ray actor that launches and owns one warm headless Blender on its node (through the
  ``bld-remote start --background`` supervisor, on 127.0.0.1 with a fresh token), and offers ``execute``,
  ``render_image``, ``scene_info`` and ``info``. If its Blender dies, the actor starts a new one before its
  next call; if the actor itself dies, Ray restarts it (``max_restarts``), and tasks are never retried by
  Ray (``max_task_retries=0``): a task whose outcome is unknown is not replayed behind your back.
- ``map(code, items, ...)``: runs ``code`` once per item on ``ray.util.ActorPool``, with the rules of
  ``bld_remote.Pool.map``: results in item order, one item in flight per actor, failures in their slot with
  ``return_exceptions=True`` (else the first, in item order, is raised once every item has finished), an
  item whose Blender or actor died while it ran is ``OutcomeUnknown`` and is run again only when
  ``retries > 0`` says the code is idempotent.

Files a job writes stay on the node that ran it; ``render_image`` returns the image's bytes, which come
back through Ray's object store. See docs/RAY.md.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

try:
    import ray
    from ray.util import ActorPool
except ImportError as e:  # pragma: no cover - depends on the extra
    raise ImportError("bld_remote.ray needs Ray: pip install 'bld-remote[ray]'") from e

from ._core import BlenderConnectionError, BlenderTimeoutError, Client, OutcomeUnknown, RemoteError

__all__ = ["BlenderActor", "OutcomeUnknown", "map"]

# How often Ray restarts a BlenderActor whose process died (not its Blender: the actor restarts that itself).
DEFAULT_MAX_RESTARTS = 4
_READY = re.compile(r"bld_remote listening on (?P<host>\S+):(?P<port>\d+) \(pid (?P<pid>\d+)\)")
_PR_SET_PDEATHSIG = 1


def _item_code(code: str, item: Any) -> str:
    # One line before the code, so a traceback's line numbers are off by one at most.
    return f"item = __import__('json').loads({json.dumps(json.dumps(item))})\n{code}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # The supervisor gets SIGTERM (and stops its Blender, removing its descriptor) when the actor's process
    # dies, however it dies: Ray kills actors with SIGKILL.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _bld_remote_exe() -> str:
    beside = Path(sys.executable).with_name("bld-remote")
    if beside.exists():
        return str(beside)
    found = shutil.which("bld-remote")
    if found is None:
        raise RuntimeError(
            "cannot find the bld-remote command on this node: install the bld-remote-cli wheel into the "
            "Python environment that Ray's workers use"
        )
    return found


class _BlenderActor:
    """One warm headless Blender on this node, owned by this actor (see the module docstring)."""

    def __init__(
        self,
        blender: str | None = None,
        scene: str | None = None,
        ready_timeout: float = 120.0,
        timeout: float | None = None,
    ) -> None:
        self._blender = blender
        self._scene = scene
        self._ready_timeout = ready_timeout
        self._timeout = timeout
        self._proc: subprocess.Popen[str] | None = None
        self._relay: threading.Thread | None = None
        self._client: Client | None = None
        self._pid = 0
        self._port = 0
        self.launches = 0
        self._launch()

    # --- the Blender this actor owns --------------------------------------------------------------------
    def _launch(self) -> None:
        token = secrets.token_urlsafe(32)
        argv = [_bld_remote_exe(), "start", "--background", "--port", "0", "--host", "127.0.0.1"]
        argv += ["--ready-timeout", str(self._ready_timeout)]
        if self._blender:
            argv += ["--blender", str(self._blender)]
        if self._scene:
            argv += ["--scene", str(self._scene)]
        env = dict(os.environ, BLD_REMOTE_TOKEN=token)
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
        assert proc.stdout is not None
        lines: list[str] = []
        match = None
        for line in proc.stdout:
            lines.append(line)
            match = _READY.search(line)
            if match:
                break
        if match is None:
            rc = proc.wait()
            tail = "".join(lines[-20:])
            raise RuntimeError(f"Blender did not start on this node (bld-remote start exited {rc}):\n{tail}")
        self._proc = proc
        self._pid = int(match["pid"])
        self._port = int(match["port"])
        # Blender's later output goes to this actor's stdout (Ray's worker log); reading it keeps the pipe
        # from filling up and blocking Blender.
        stdout = proc.stdout
        self._relay = threading.Thread(target=_relay, args=(stdout,), name="bld_remote-relay", daemon=True)
        self._relay.start()
        self._client = Client(host="127.0.0.1", port=self._port, token=token, timeout=self._timeout)
        self.launches += 1

    def _blender_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ensure(self) -> Client:
        if self._client is None or not self._blender_alive():
            self._stop_blender()
            self._launch()
        assert self._client is not None
        return self._client

    def _stop_blender(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # the supervisor stops its Blender and removes the descriptor
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and self._pid:
            # If the supervisor died first, its Blender may still run: it must not outlive its owner.
            try:
                os.kill(self._pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._relay is not None:
            self._relay.join(timeout=10)
            self._relay = None

    # --- what callers use ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Where this actor's Blender runs: Ray node id, host name, the actor's and Blender's pids, Blender's port,
        and how many Blenders this actor has launched."""
        self._ensure()
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": os.uname().nodename,
            "actor_pid": os.getpid(),
            "pid": self._pid,
            "port": self._port,
            "launches": self.launches,
        }

    def execute(self, code: str, timeout: float | None = None) -> dict[str, Any]:
        """Run Python in this actor's Blender: ``{"stdout", "stderr", "result", "duration"}``. Raises
        RemoteError when the code raises, OutcomeUnknown when Blender died while it ran."""
        outcome = self._run(code, timeout)
        if outcome[0] == "ok":
            return outcome[1]
        raise _exception(outcome)

    def render_image(self, **params: Any) -> dict[str, Any]:
        """The ``render_image`` command (headless: Workbench by default). The PNG comes back as ``data``
        (bytes), whatever node rendered it; the file on the node is removed unless ``filepath`` was given."""
        keep = "filepath" in params
        params.setdefault("inline", not keep)
        result = self._call("render_image", params)
        if isinstance(result, dict) and isinstance(result.get("data"), str):
            import base64

            result["data"] = base64.b64decode(result["data"])
        elif keep and isinstance(result, dict) and isinstance(result.get("filepath"), str):
            result["data"] = Path(result["filepath"]).read_bytes()
        return result

    def scene_info(self) -> dict[str, Any]:
        """The ``get_scene_info`` command."""
        return self._call("get_scene_info", {})

    def shutdown(self) -> bool:
        """Stop this actor's Blender (its descriptor removed, its processes gone)."""
        self._stop_blender()
        return True

    def _call(self, command: str, params: dict[str, Any]) -> Any:
        client = self._ensure()
        try:
            return client.call(command, **params)
        except BlenderConnectionError as e:
            self._stop_blender()
            raise OutcomeUnknown(f"the Blender on this node died during {command}: {e}") from None

    def _run(self, code: str, timeout: float | None) -> tuple[Any, ...]:
        """Run code; never raises for the code's own failures: ("ok", result) | ("error", kind, data)."""
        client = self._ensure()
        if timeout is not None:
            client.timeout = timeout
        try:
            r = client.execute(code)
            return (
                "ok",
                {"stdout": r.stdout, "stderr": r.stderr, "result": r.result, "duration": r.duration},
            )
        except RemoteError as e:
            return ("error", "remote", e.message, e.reply)
        except BlenderTimeoutError as e:
            return ("error", "timeout", str(e), e.ran)
        except BlenderConnectionError as e:
            self._stop_blender()
            if getattr(e, "reason", None) is not None:
                # Could not connect at all: nothing was sent, so nothing ran. A new Blender, and one more try.
                return (
                    self._run(code, timeout) if self._relaunch_once() else ("error", "unknown", str(e), None)
                )
            # The connection broke mid-request: Blender died (or was killed). Whether the code ran is unknown.
            return (
                "error",
                "unknown",
                f"Blender died while the item ran ({e}); its outcome is unknown",
                None,
            )
        finally:
            if timeout is not None:
                client.timeout = self._timeout

    def _relaunch_once(self) -> bool:
        try:
            self._launch()
        except RuntimeError:
            return False
        return True

    def _run_item(
        self, index: int, code: str, item: Any, timeout: float | None
    ) -> tuple[int, tuple[Any, ...]]:
        return index, self._run(_item_code(code, item), timeout)


def _relay(stdout: Any) -> None:
    for line in stdout:
        sys.stdout.write(line)
    stdout.close()


def _exception(outcome: tuple[Any, ...]) -> BaseException:
    _, kind, message, data = outcome
    if kind == "remote":
        err = RemoteError(message)
        reply = data if isinstance(data, dict) else {}
        err.message = message
        err.exception = reply.get("exception")
        err.traceback = reply.get("traceback")
        err.output = reply.get("output")
        err.reply = reply
        return err
    if kind == "timeout":
        t = BlenderTimeoutError(message)
        t.ran = data
        return t
    return OutcomeUnknown(message)


BlenderActor = ray.remote(max_restarts=DEFAULT_MAX_RESTARTS, max_task_retries=0)(_BlenderActor)


def map(
    code: str,
    items: Iterable[Any],
    *,
    num_actors: int | None = None,
    actors: list[Any] | None = None,
    actor_options: dict[str, Any] | None = None,
    blender: str | None = None,
    scene: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    return_exceptions: bool = False,
) -> list[Any]:
    """Run ``code`` once per item (bound as ``item``) on Ray actors that each own a headless Blender, and
    return the items' ``result`` values in item order.

    ``actors``: existing ``BlenderActor`` handles to use (left running); else ``num_actors`` new ones
    (default: one per item, at most the cluster's CPUs) made with ``actor_options`` (e.g. ``{"num_cpus": 1}``
    or ``{"num_gpus": 1}`` for Cycles on GPU), stopped when the map ends. ``timeout`` is per item, seconds.
    ``retries``: how often an item whose outcome is unknown may run again (only for idempotent code).
    """
    items = list(items)
    for i, it in enumerate(items):
        try:
            json.dumps(it)
        except (TypeError, ValueError) as e:
            raise TypeError(f"item {i} is not JSON ({e}): items are sent to Blender as JSON") from None
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer ≥ 0, got {retries!r}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout <= 30 * 86400):
        raise ValueError(f"timeout must be a number of seconds in (0, 2592000], got {timeout!r}")
    if not ray.is_initialized():
        raise RuntimeError(
            "Ray is not initialised: call ray.init() (a local Ray) or ray.init(address=...) (a cluster) first"
        )
    if not items:
        return []
    owned = actors is None
    if actors is None:
        if num_actors is None:
            num_actors = max(1, min(len(items), int(ray.cluster_resources().get("CPU", 1))))
        if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
            raise ValueError(f"num_actors must be an integer ≥ 1, got {num_actors!r}")
        options = {"num_cpus": 1, **(actor_options or {})}
        actors = [
            BlenderActor.options(**options).remote(blender=blender, scene=scene) for _ in range(num_actors)
        ]
    elif not actors:
        raise ValueError(
            "map over no actors: pass actors=[...] with at least one BlenderActor, or num_actors"
        )
    try:
        return _map(ActorPool(list(actors)), code, items, timeout, retries, return_exceptions)
    finally:
        if owned:
            _stop_actors(actors)


def _map(
    pool: ActorPool, code: str, items: list[Any], timeout: float | None, retries: int, return_exceptions: bool
) -> list[Any]:
    results: list[Any] = [None] * len(items)
    failed: dict[int, BaseException] = {}
    attempts = [0] * len(items)
    settled: set[int] = set()
    # Items wait here, not in ActorPool's own queue: ActorPool hands queued work to an actor as soon as it
    # gets it back, even one that Ray is restarting, and a task sent to a restarting actor fails without
    # running (it would be wrongly reported as outcome unknown). So work goes out only to a free actor.
    waiting: deque[int] = deque(range(len(items)))
    inflight: dict[int, tuple[Any, Any]] = {}  # item index -> (its ObjectRef, its actor)
    deaths: dict[Any, int] = {}
    # Actors that died and that Ray is restarting, each with a probe (an idempotent call that Ray may retry
    # through the restart); they rejoin the pool once the probe answers.
    recovering: dict[Any, Any] = {}

    def start(actor: Any, index: int) -> Any:
        attempts[index] += 1
        ref = actor._run_item.remote(index, code, items[index], timeout)
        inflight[index] = (ref, actor)
        return ref

    def feed() -> None:
        while waiting and pool.has_free():
            pool.submit(start, waiting.popleft())

    def done(index: int, outcome: tuple[Any, ...]) -> None:
        inflight.pop(index, None)
        if outcome[0] == "ok":
            results[index] = outcome[1]["result"]
        elif outcome[1] == "unknown" and attempts[index] <= retries:
            waiting.append(index)  # the code says it is idempotent: once more
            return
        else:
            failed[index] = _exception(outcome)
        settled.add(index)

    feed()
    while pool.has_next() or recovering:
        if recovering:
            ready, _ = ray.wait(list(recovering), num_returns=1, timeout=0 if pool.has_next() else None)
            for probe in ready:
                actor = recovering.pop(probe)
                try:
                    ray.get(probe)
                except ray.exceptions.RayActorError:
                    continue  # dead for good (its restarts used up)
                pool.push(actor)
            feed()
            if not pool.has_next():
                continue
        try:
            index, outcome = pool.get_next_unordered(timeout=0.2 if recovering else None)
        except TimeoutError:
            continue
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            index, actor = _died(inflight, e)
            if index is None:
                raise
            if not isinstance(e, ray.exceptions.ActorDiedError):
                pool.pop_idle()  # ActorPool took it back as idle: it is the last one it took
            deaths[actor] = deaths.get(actor, 0) + 1
            if deaths[actor] <= DEFAULT_MAX_RESTARTS:
                recovering[actor.info.options(max_task_retries=-1).remote()] = actor
            done(
                index,
                ("error", "unknown", f"the Ray actor running this item died ({e}); outcome unknown", None),
            )
            feed()
            continue
        done(index, outcome)
        feed()
    for index in range(len(items)):
        if index not in settled:
            # Never started: every actor died for good before one was free for it.
            failed[index] = RuntimeError("not run: every actor of this map died (their restarts used up)")
    if failed and not return_exceptions:
        raise failed[min(failed)]
    for index, err in failed.items():
        results[index] = err
    return results


def _died(inflight: dict[int, tuple[Any, Any]], err: BaseException) -> tuple[Any, Any]:
    """Which in-flight item a RayActorError from ActorPool belongs to: one whose ref is ready and fails
    so. (Two actors dying at once: either attribution is right, since both items get the same verdict.)"""
    refs = {ref: (i, a) for i, (ref, a) in inflight.items()}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            return refs[ref]
        except Exception:
            continue
    return None, None


def _stop_actors(actors: list[Any]) -> None:
    pending = []
    for a in actors:
        try:
            pending.append(a.shutdown.remote())
        except Exception:
            continue
    if pending:
        ray.wait(pending, num_returns=len(pending), timeout=60)
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            continue
