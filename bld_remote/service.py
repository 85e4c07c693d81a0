"""Starting and stopping the service, and the headless main-thread pump that runs its jobs.

Runs on Blender's main thread. ``keep_alive()`` is the pump headless (``blender --background`` or ``bpy`` as
a module, where timers never fire); in the GUI, ``gui`` drives the same ``_core.step`` from a persistent
``bpy.app.timers`` callback or the keeper modal operator. All call into ``_core``, which releases the GIL
whenever it waits.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Any, Callable

from . import _core, commands, datablocks
from . import table  # noqa: F401 - it fills commands.HANDLERS with the other modules' commands

# From the native module, where they are written once (crates/core/src/config.rs).
DEFAULT_HOST: str = _core.DEFAULT_HOST
DEFAULT_PORT: int = _core.DEFAULT_PORT
_LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


def _log(level: str, message: str) -> None:
    try:
        wanted = _LOG_LEVELS[_core.startup_options()["log_level"]]
    except ValueError:  # a bad BLD_REMOTE_* variable must not stop a log line (nor a signal handler)
        wanted = _LOG_LEVELS["INFO"]
    if _LOG_LEVELS.get(level, 20) >= wanted:
        print(f"bld_remote [{level}] {message}", file=sys.stderr, flush=True)


# The interactive Blender's pump (the timer, or the keeper operator): `gui` registers it when imported, so
# this module never imports `gui` (which imports this one). `bld_remote/__init__.py` imports `gui` inside
# an interactive Blender, so it is registered before any service can start there.
_gui_pump: tuple[Callable[[], None], Callable[[], None]] | None = None


def set_gui_pump(ensure: Callable[[], None], remove: Callable[[], None]) -> None:
    """Register what arms (``ensure``, idempotent) and removes (``remove``) the GUI's pump."""
    global _gui_pump
    _gui_pump = (ensure, remove)


def _blender_info() -> tuple[str, dict[str, Any]]:
    try:
        import bpy
    except ImportError:
        return "python", {}
    mode = "background" if bpy.app.background else "gui"
    # During add-on registration bpy.data is restricted (no filepath): report what can be read.
    info = {
        "blender_version": bpy.app.version_string,
        "blend_file": getattr(bpy.data, "filepath", "") or None,
    }
    return mode, info


def start_mcp_service(
    port: int | None = None,
    host: str | None = None,
    *,
    token: str | None = None,
    read_token: str | None = None,
    max_request_bytes: int | None = None,
    max_connections: int | None = None,
    queue_capacity: int | None = None,
    idle_timeout: float | None = None,
    default_timeout: float | None = None,
    request_read_timeout: float | None = None,
    max_depth: int | None = None,
    persist_max_value_bytes: int | None = None,
    persist_max_total_bytes: int | None = None,
    persist_max_keys: int | None = None,
) -> dict[str, Any]:
    """Start the TCP service (port: argument, else ``BLD_REMOTE_MCP_PORT``, else 6688; 0 picks a free one).

    Binds 127.0.0.1 unless told otherwise; any other host requires ``token``. ``token="auto"`` generates a
    random one for this instance (read it in-process with ``current_token()``). ``read_token`` (else
    ``BLD_REMOTE_READ_TOKEN``; ``"auto"`` generates one, ``current_read_token()``) is a second token that may
    only read: scene and object info, renders, status, lookups (docs/PROTOCOL.md, *Roles*); it must differ
    from ``token``. Set alone, every request needs it and nothing can be changed over the network. Both are
    kept in the owner-only instance descriptor. Returns ``get_status()``.
    Calling it while the service runs is harmless when the port matches (or is not given): it returns the
    status. After ``stop_mcp_service()`` it starts afresh, also within one request (the stop frees the port at
    once), so ``stop_mcp_service(); start_mcp_service()`` in ``execute_code`` ends with a running service.

    Limits (argument, else the environment variable, else the default; timeouts in seconds, 0 = none):
    ``max_request_bytes`` (``BLD_REMOTE_MAX_REQUEST_BYTES``, 64 MiB), ``max_connections``
    (``BLD_REMOTE_MAX_CONNECTIONS``, 256), ``queue_capacity`` (``BLD_REMOTE_QUEUE_CAPACITY``, 16384),
    ``idle_timeout`` (``BLD_REMOTE_IDLE_TIMEOUT``, none), ``default_timeout``
    (``BLD_REMOTE_DEFAULT_TIMEOUT``, 300), ``request_read_timeout`` (``BLD_REMOTE_REQUEST_READ_TIMEOUT``,
    60), ``max_depth`` (``BLD_REMOTE_MAX_DEPTH``, 100); the persist store's ``persist_max_value_bytes``
    (``BLD_REMOTE_PERSIST_MAX_VALUE_BYTES``, 64 MiB), ``persist_max_total_bytes``
    (``BLD_REMOTE_PERSIST_MAX_TOTAL_BYTES``, 256 MiB), ``persist_max_keys`` (``BLD_REMOTE_PERSIST_MAX_KEYS``,
    100 000). See docs/PROTOCOL.md.
    """
    if port is None:
        port = _configured_port
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535):
        raise ValueError(f"port must be an int from 0 to 65535, got {port!r}")
    mode, info = _blender_info()
    # None: the environment variable, else the default, resolved (and range-checked) in Rust.
    bound = _core.start(
        commands.dispatch,
        sorted(commands.HANDLERS),
        mode,
        host=host or None,
        port=port,
        token=token,
        read_token=read_token,
        info=info,
        max_request_bytes=max_request_bytes,
        max_connections=max_connections,
        queue_capacity=queue_capacity,
        idle_timeout=idle_timeout,
        default_timeout=default_timeout,
        request_read_timeout=request_read_timeout,
        max_depth=max_depth,
        persist_max_value_bytes=persist_max_value_bytes,
        persist_max_total_bytes=persist_max_total_bytes,
        persist_max_keys=persist_max_keys,
    )
    datablocks.watch()  # scene_generation in get_status (resources/list_changed); idempotent
    # Blender quitting (File > Quit, `wm.quit_blender` from a request) ends the process from its event loop:
    # stop first, so replies already made (that quit request's own) are flushed and every thread is joined.
    atexit.unregister(_stop_at_exit)
    atexit.register(_stop_at_exit)
    if bound is None:  # already serving the address asked for
        return get_status()
    bound_host, bound_port = bound
    if mode == "gui":
        if _gui_pump is not None:
            _gui_pump[0]()
        else:
            _log("WARNING", "no GUI pump is registered: requests wait until step() is called")
    # The ready line: tools (and `bld-remote start`) wait for exactly this.
    print(f"bld_remote listening on {bound_host}:{bound_port} (pid {os.getpid()})", flush=True)
    return get_status()


def current_token() -> str | None:
    """The token the running service requires (None when it requires none, or is not running)."""
    return _core.token()


def current_read_token() -> str | None:
    """The running service's read-only token (None when it has none, or is not running)."""
    return _core.read_token()


def stop_mcp_service() -> bool:
    """Stop the service and join its threads; the port is free when this returns.

    Called from code running inside a request, the service stops accepting at once (the port is free,
    ``is_mcp_service_up()`` is False, a ``start_mcp_service()`` may follow) and closes its connections right
    after that request has replied; the reply carries ``service_stopping: true``. Returns whether a service
    was running.
    """
    was_running = _core.stop()
    if not _core.is_running():
        _remove_gui_pump()
        datablocks.unwatch()
        atexit.unregister(_stop_at_exit)
    return was_running


def _stop_at_exit() -> None:
    """The interpreter is finishing (Blender quits): stop the service, flushing the replies it owes."""
    try:
        _core.stop()
    except BaseException:  # at exit there is nobody to raise to
        pass


def is_mcp_service_up() -> bool:
    """True while the service accepts connections."""
    return _core.is_running()


# --- blender-remote's in-Blender API (its scripts run unchanged; docs/COMPAT.md) ------------------------

# Set by set_mcp_service_port() while stopped: the port the next start_mcp_service() without one uses.
_configured_port: int | None = None


def get_mcp_service_port() -> int:
    """The port the service listens on; stopped: the port it will use (``set_mcp_service_port``, else
    ``BLD_REMOTE_MCP_PORT``, else 6688)."""
    status = _core.status()
    if status is not None:
        return int(status["port"])
    if _configured_port is not None:
        return _configured_port
    return int(_core.startup_options()["port"])


def set_mcp_service_port(port_number: int) -> None:
    """The port for the next ``start_mcp_service()``. Only while stopped (RuntimeError otherwise)."""
    global _configured_port
    if isinstance(port_number, bool) or not isinstance(port_number, int) or not 0 <= port_number <= 65535:
        raise ValueError(f"port must be an int from 0 to 65535, got {port_number!r}")
    if _core.is_running():
        raise RuntimeError("the service is running: stop_mcp_service() before changing its port")
    _configured_port = port_number


def is_background_mode() -> bool:
    """True in ``blender --background`` (and in PyPI ``bpy``), False with a window."""
    bpy = sys.modules.get("bpy")
    return bool(getattr(getattr(bpy, "app", None), "background", True))


def get_startup_options() -> dict[str, Any]:
    """The startup configuration from the environment: ``host``, ``port``, ``start_now`` (auto-start),
    ``log_level``, ``port_from_env``."""
    return dict(_core.startup_options())


def get_command_queue_size() -> int:
    """Requests waiting for Blender's main thread, or -1 when the service is not running."""
    status = _core.status()
    return -1 if status is None else int(status.get("queue_length", 0))


def get_status() -> dict[str, Any]:
    """running, host, port, mode (gui/background), requests_served, queue_length, connections, ..."""
    status = _core.status()
    if status is None:
        return {"running": False}
    return status


def step(max_jobs: int = 64, timeout: float = 0.0) -> int:
    """Run pending jobs now on this (the main) thread; wait up to ``timeout`` seconds for the first."""
    if max_jobs < 1:
        raise ValueError("max_jobs must be at least 1")
    return _core.step(max_jobs, timeout)


def keep_alive() -> None:
    """Serve on this (the main) thread until the service stops, then return.

    For ``blender --background`` and ``bpy`` as a module, where timers never fire. Wakes the moment a job
    arrives (no polling). Returns after ``stop_mcp_service()``, the ``server_shutdown`` command, SIGTERM or
    SIGINT (within a second, whatever code in a request did to Python's signal machinery; a request that is
    running is answered first), so a startup script that ends with it lets Blender exit with rc 0. A second
    SIGTERM/SIGINT while it still runs (a request that never ends) gets the signal's default action. A
    restart from inside a request (``stop_mcp_service(); start_mcp_service()``) keeps it serving the new
    service. Refused (RuntimeError) from inside a request. See docs/RELIABILITY.md, "Signals".
    """
    if not _core.is_running():
        raise RuntimeError("bld_remote is not running: call start_mcp_service() before keep_alive()")
    # SIGTERM and SIGINT are handled natively (src/signals.rs) while it serves: a Python handler and
    # signal.set_wakeup_fd are exactly what client code (asyncio) resets.
    on_main = threading.current_thread() is threading.main_thread()
    if _core.in_job():
        _core.serve_forever(on_main)  # raises the clear RuntimeError, and must stop nothing
    try:
        _core.serve_forever(on_main)
    finally:
        stop_mcp_service()
        _log("INFO", "service stopped; keep_alive() returns")


def _remove_gui_pump() -> None:
    if _gui_pump is not None:
        _gui_pump[1]()
