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
