"""Native half of bld_remote (Rust, PyO3). Use the API in ``bld_remote``; this module is private."""

from typing import Any, Callable, TypedDict, final

__all__ = [
    "__version__",
    "DEFAULT_PORT",
    "DEFAULT_HOST",
    "start",
    "stop",
    "request_stop",
    "is_running",
    "stop_requested",
    "status",
    "token",
    "read_token",
    "startup_options",
    "in_job",
    "step",
    "serve_forever",
    "report_progress",
    "OutputCapture",
    "Client",
    "ExecResult",
    "BlenderConnectionError",
    "BlenderTimeoutError",
    "RemoteError",
    "OutcomeUnknown",
    "PoolClient",
    "Job",
    "JobCancelled",
    "JobTimedOut",
    "check_cancelled",
    "cancel_requested",
    "persist_put",
    "persist_get",
    "persist_remove",
    "persist_keys",
    "note_datablock_counts",
    "bump_scene_generation",
    "scene_generation",
]

__version__: str
"""The version of the wheel (the workspace's Cargo.toml)."""
DEFAULT_PORT: int
"""The default service port, 6688."""
DEFAULT_HOST: str
"""The default bind address, ``"127.0.0.1"``."""

class _StartupOptions(TypedDict):
    """What ``startup_options()`` returns."""

    host: str
    port: int
    port_from_env: bool
    start_now: bool
    log_level: str

# --- the service (src/service.rs) -----------------------------------------------------------------------

def start(
    handler: Callable[[str, dict[str, Any]], Any],
    commands: list[str],
    mode: str,
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    read_token: str | None = None,
    info: dict[str, Any] | None = None,
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
    max_jobs: int | None = None,
    max_job_result_bytes: int | None = None,
    job_result_ttl: float | None = None,
) -> tuple[str, int] | None:
    """Bind and start serving on native threads; returns the bound ``(host, port)``.

    Each setting left as None comes from its ``BLD_REMOTE_*`` variable, else the default
    (``bld_remote_core::config::Config::from_env``); a bad value raises ValueError naming it and its range
    (TypeError for a non-number, a bool included). ``token="auto"``
    is a fresh random token, and so is ``read_token="auto"`` (a read-only token; it must differ from
    ``token``). Already running: None when the address asked for is the one served, else
    RuntimeError. OSError when the port cannot be bound."""

def stop() -> bool:
    """Stop and join every thread. From inside a job: stop accepting at once (the port is free, a ``start``
    may follow), and close the connections right after the job replies."""

def request_stop() -> bool:
    """Ask the pump to stop the service; safe from signal handlers and other threads."""

def is_running() -> bool:
    """True while the service accepts connections."""

def stop_requested() -> bool:
    """True once a stop was asked for and not yet performed."""

def status() -> dict[str, Any] | None:
    """The service's ``get_status`` dict, or None when it is not running."""

def token() -> str | None:
    """The token the running service requires (None: it requires none, or none runs)."""

def read_token() -> str | None:
    """The running service's read-only token (None: it has none, or none runs)."""

def startup_options() -> _StartupOptions:
    """``BLD_REMOTE_MCP_PORT``, ``BLD_REMOTE_MCP_START_NOW`` and ``BLD_REMOTE_LOG_LEVEL``, parsed in Rust.

    ``port_from_env`` says whether ``port`` came from the variable. A bad value raises ValueError."""

def in_job() -> bool:
    """True while the calling code runs inside a job of the pump (a request's code)."""

# --- the pump (src/pump.rs) -----------------------------------------------------------------------------

def step(max_jobs: int = 64, timeout: float = 0.0, budget: float | None = None) -> int:
    """Run up to max_jobs jobs on this thread, waiting up to timeout seconds (GIL released) for the first.

    ``max_jobs`` is 0 to 2**32-1; ``timeout`` (0 or more) and ``budget`` (more than 0) are seconds, at most
    30 days. Anything else raises ValueError naming the argument and its range (NaN and infinities
    included), or TypeError for a non-number (a bool included). From inside a job: RuntimeError (no nested pump)."""

def serve_forever(handle_signals: bool = True) -> None:
    """Headless pump: block (GIL released) and run jobs until the service stops.

    ``handle_signals``: SIGTERM and SIGINT stop it (native handlers, re-installed after every job that
    replaced them). From inside a job: RuntimeError (no nested pump)."""

def check_cancelled() -> None:
    """In a job's code: raise JobCancelled once a cancel was asked for, JobTimedOut once it ran past its
    ``job_timeout_seconds``; else return. Outside a job it does nothing."""

def cancel_requested() -> bool:
    """Whether a cancel was asked for the job running now."""

def note_datablock_counts(objects: int, materials: int, collections: int) -> bool:
    """Record the numbers of objects, materials and collections; True (and ``scene_generation`` grows) when
    they differ from the last ones. The first call only records them."""

def bump_scene_generation() -> None:
    """Make ``scene_generation`` grow (a file was loaded)."""

def scene_generation() -> int:
    """Grows whenever objects, materials or collections are added or removed (``get_status`` reports it)."""

def persist_put(key: str, data: Any) -> None:
    """Store ``data`` (as JSON) in the running service's persist store; ValueError past a limit."""

def persist_get(key: str, default: Any = None) -> Any: ...
def persist_remove(key: str) -> bool: ...
def persist_keys() -> list[str]: ...
def report_progress(progress: float, total: float | None = None, message: str | None = None) -> bool:
    """Report the running job's progress to its client (framed requests only); False when nobody listens."""

# --- execute_code's output, the client side and the exceptions (src/capture.rs, client.rs, error.rs) ------

# pyo3 classes cannot be subclassed.
@final
class OutputCapture:
    """``sys.stdout``/``sys.stderr`` of ``execute_code``: a write-only text file kept in Rust.

    Writes like ``io.StringIO`` (``str`` only; returns the number of characters). Converting it to the
    reply moves its text out.
    """

    def write(self, s: str) -> int: ...
    def writelines(self, lines: Any) -> None: ...
    def flush(self) -> None: ...
    def getvalue(self) -> str: ...
    def isatty(self) -> bool: ...
    def readable(self) -> bool: ...
    def writable(self) -> bool: ...
    def seekable(self) -> bool: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def encoding(self) -> str: ...
    @property
    def errors(self) -> str: ...
    @property
    def newlines(self) -> None: ...
    @property
    def line_buffering(self) -> bool: ...

class BlenderConnectionError(ConnectionError):
    """Cannot reach the service (refused, unreachable), or the connection broke before the reply was complete.

    ``address`` is ``"host:port"``; ``reason`` (connect failures only) names the OS error kind."""

    address: str | None
    reason: str | None

class OutcomeUnknown(BlenderConnectionError):
    """A pool item whose Blender died (or whose connection broke) while it ran: it may have run, and it is not
    sent again unless ``retries > 0``. ``ran`` is None: nobody can tell."""

    item: int
    """The item's index in the map."""
    detail: str
    ran: None

class BlenderTimeoutError(TimeoutError):
    """No reply in time. ``ran``: True if the request had started in Blender, False if it never ran, None: unknown."""

    address: str | None
    ran: bool | None

class JobCancelled(Exception):
    """Raised by ``check_cancelled()`` in a job's code once a cancel was asked for; by ``Job.result()`` for a
    cancelled job."""

class JobTimedOut(Exception):
    """Raised by ``check_cancelled()`` in a job's code once it ran past its ``job_timeout_seconds``."""

class RemoteError(RuntimeError):
    """The service answered with an error reply (the remote code raised, unknown command, bad parameter...)."""

    message: str
    exception: str | None
    """The remote exception's type name, e.g. ``"ZeroDivisionError"``."""
    traceback: str | None
    output: dict[str, str] | None
    """``{"stdout": ..., "stderr": ...}`` printed before the failure (execute_code)."""
    reply: dict[str, Any]

@final
class ExecResult:
    """What ``Client.execute`` returns. Also readable as ``r["stdout"]``."""

    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...
    @property
    def result(self) -> Any:
        """The code's ``result`` variable converted to JSON-like data, or None when it set none."""
    @property
    def duration(self) -> float:
        """Seconds the code ran in Blender."""
    @property
    def changes(self) -> dict[str, Any] | None:
        """What the code changed in the scene (``execute(..., changes=True)``), else None."""
    def __getitem__(self, key: str, /) -> Any: ...

@final
class Client:
    """A connection to a running bld_remote service (framed mode: ids, one JSON reply per line).

    Without ``port``, the only running instance (see ``bld-remote ls``); several → BlenderConnectionError.
    ``timeout`` is per request in seconds (None: no limit). ``token`` defaults to ``$BLD_REMOTE_TOKEN``, else
    the instance descriptor's. The token is never sent: the service must first prove it holds it (a
    challenge-response handshake), else BlenderConnectionError ("could not verify") and nothing is sent.
    Every wait releases the GIL; Ctrl+C interrupts it. Thread-safe; calls are serialised."""

    def __new__(
        cls,
        host: str | None = None,
        port: int | None = None,
        timeout: float | None = ...,  # 60 s (DEFAULT_CLIENT_TIMEOUT in crates/core/src/config.rs)
        token: str | None = None,
    ) -> Client: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def timeout(self) -> float | None: ...
    @timeout.setter
    def timeout(self, value: float | None) -> None: ...
    def call(self, command: str, /, **params: Any) -> Any:
        """Send any command and return its ``result``; an error reply raises RemoteError."""
    def execute(self, code: str, *, changes: bool = False) -> ExecResult:
        """Run Python in Blender; RemoteError (with ``traceback`` and partial ``output``) if it raises."""
    def submit(self, code: str, job_timeout: float | None = None, *, changes: bool = False) -> Job:
        """Submit code as a job that outlives this connection (``submit_code_job``); returns at once."""
    def scene_info(self) -> dict[str, Any]: ...
    def object_info(self, name: str) -> dict[str, Any]: ...
    def status(self) -> dict[str, Any]: ...
    def ping(self) -> bool: ...
    def shutdown(self) -> dict[str, Any]:
        """Stop the service (a headless Blender then exits) and close this connection."""
    def close(self) -> None: ...
    def __enter__(self) -> Client: ...
    def __exit__(self, *exc: object) -> bool: ...

@final
class Job:
    """A job submitted with ``Client.submit``: it runs in Blender whether or not the client stays connected."""

    @property
    def id(self) -> str: ...
    def status(self) -> dict[str, Any]: ...
    def result(self, timeout: float | None = None) -> ExecResult:
        """Wait for the end; RemoteError if the code raised, JobCancelled, BlenderTimeoutError (ran=True: past
        its job timeout; ran=None: still going after ``timeout``)."""
    def cancel(self, reason: str | None = None) -> dict[str, Any]: ...

@final
class PoolClient:
    """The native half of ``bld_remote.Pool``: the members and the map (bld_remote_core::pool).

    ``instances``: ``[(host, port), ...]``, or None for every live instance on this machine (none →
    BlenderConnectionError). ``owned``: their supervisor restarts them on the same port, so a map waits for a
    dead one (up to ``restart_wait``) instead of dropping it."""

    def __new__(
        cls,
        instances: list[tuple[str, int]] | None = None,
        *,
        host: str | None = None,
        token: str | None = None,
        owned: bool = False,
        pids: list[int] | None = None,
    ) -> PoolClient: ...
    @property
    def instances(self) -> list[dict[str, Any]]:
        """``[{"host", "port", "pid"}, ...]`` (pid 0: not seen yet)."""
    def map(
        self,
        code: str,
        items: list[str],
        *,
        timeout: float | None = None,
        retries: int = 0,
        restart_wait: float = 120.0,
    ) -> list[tuple[bool, Any]]:
        """Run ``code`` once per item (JSON texts; ``item`` bound, parsed): ``(True, result)`` or
        ``(False, exception)`` per item, in order. The GIL is released for the whole map."""
    def __len__(self) -> int: ...
