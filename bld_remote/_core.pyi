"""Native half of bld_remote (Rust, PyO3). Use the API in ``bld_remote``; this module is private."""

from typing import Any, Callable

__version__: str

def start(
    host: str,
    port: int,
    handler: Callable[[str, dict[str, Any]], tuple[bool, Any]],
    commands: list[str],
    mode: str,
    token: str | None = None,
    info: dict[str, Any] | None = None,
    max_request_bytes: int | None = None,
    max_connections: int | None = None,
    queue_capacity: int | None = None,
    idle_timeout: float | None = None,
    default_timeout: float | None = None,
) -> tuple[str, int]:
    """Bind and start serving on native threads. Raises OSError (bind), ValueError (config), RuntimeError."""

def stop() -> bool:
    """Stop and join every thread (deferred until the current job replies when called from inside one)."""

def request_stop() -> bool:
    """Ask the pump to stop the service; safe from signal handlers and other threads."""

def is_running() -> bool: ...
def stop_requested() -> bool: ...
def status() -> dict[str, Any] | None: ...
def step(max_jobs: int = 64, timeout: float = 0.0, budget: float | None = None) -> int:
    """Run up to max_jobs jobs on this thread, waiting up to timeout seconds (GIL released) for the first."""

def serve_forever(install_wakeup: Callable[[int], Any] | None = None) -> None:
    """Headless pump: block (GIL released) and run jobs until the service stops."""

# --- client side (src/py_client.rs, src/error.rs) ------------------------------------------------------

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

class BlenderTimeoutError(TimeoutError):
    """No reply in time. ``ran``: True if the request had started in Blender, False if it never ran, None: unknown."""

    address: str | None
    ran: bool | None

class RemoteError(RuntimeError):
    """The service answered with an error reply (the remote code raised, unknown command, bad parameter...)."""

    message: str
    exception: str | None
    """The remote exception's type name, e.g. ``"ZeroDivisionError"``."""
    traceback: str | None
    output: dict[str, str] | None
    """``{"stdout": ..., "stderr": ...}`` printed before the failure (execute_code)."""
    reply: dict[str, Any]

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
    def __getitem__(self, key: str) -> Any: ...

class Client:
    """A connection to a running bld_remote service (framed mode: ids, one JSON reply per line).

    Without ``port``, the only running instance (see ``bld-remote ls``); several → BlenderConnectionError.
    ``timeout`` is per request in seconds (None: no limit). ``token`` defaults to ``$BLD_REMOTE_TOKEN``.
    Every wait releases the GIL; Ctrl+C interrupts it. Thread-safe; calls are serialised."""

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        timeout: float | None = 60.0,
        token: str | None = None,
    ) -> None: ...
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
    def execute(self, code: str) -> ExecResult:
        """Run Python in Blender; RemoteError (with ``traceback`` and partial ``output``) if it raises."""
    def scene_info(self) -> dict[str, Any]: ...
    def object_info(self, name: str) -> dict[str, Any]: ...
    def status(self) -> dict[str, Any]: ...
    def ping(self) -> bool: ...
    def shutdown(self) -> dict[str, Any]:
        """Stop the service (a headless Blender then exits) and close this connection."""
    def close(self) -> None: ...
    def __enter__(self) -> Client: ...
    def __exit__(self, *exc: object) -> bool: ...

def cli_main(argv: list[str]) -> int:
    """Run the ``bld-remote`` command line (``sys.argv``); returns the exit status."""

def report_progress(progress: float, total: float | None = None, message: str | None = None) -> bool:
    """Report the running job's progress to its client (framed requests only); False when nobody listens."""
