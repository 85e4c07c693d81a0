"""bld_remote: drive a running Blender from programs and AI agents.

Inside Blender (``import bld_remote`` or the add-on)::

    bld_remote.start_mcp_service(port=6688)   # native TCP service on Rust threads
    bld_remote.keep_alive()                   # headless: serve on the main thread until stopped

The network work happens on native threads (``bld_remote._core``); only command handlers that touch ``bpy``
run here, on Blender's main thread. Importing this package has no side effects and does not need ``bpy``;
inside an interactive Blender it also imports ``gui`` (defining, not registering, the add-on's classes), so
the GUI's pump is there for ``start_mcp_service()``.
"""

from __future__ import annotations

import sys

bl_info = {
    "name": "bld_remote",
    "author": "bld_remote contributors",
    "version": (0, 1, 0),
    "blender": (3, 4, 0),
    "location": "Edit > Preferences > Add-ons > bld_remote",
    "description": "Remote control of Blender over TCP for scripts and AI agents (MCP)",
    "category": "System",
}

from ._core import (  # noqa: E402
    __version__ as __version__,
    BlenderConnectionError,
    BlenderTimeoutError,
    Client,
    ExecResult,
    Job,
    JobCancelled,
    JobTimedOut,
    OutcomeUnknown,
    RemoteError,
    check_cancelled,
)
from .pool import Pool  # noqa: E402
from . import persist  # noqa: E402
from .service import (  # noqa: E402
    DEFAULT_HOST,
    DEFAULT_PORT,
    get_command_queue_size,
    get_mcp_service_port,
    get_startup_options,
    get_status,
    is_background_mode,
    set_mcp_service_port,
    is_mcp_service_up,
    keep_alive,
    start_mcp_service,
    step,
    stop_mcp_service,
)

# Only where bpy is already loaded (never import it here: a script that only wants `Client` must not pay for
# it) and has an event loop: a background Blender serves with keep_alive(), not the GUI's pump.
_bpy = sys.modules.get("bpy")
if _bpy is not None and not getattr(getattr(_bpy, "app", None), "background", True):
    from . import gui  # noqa: F401 - registers the GUI's pump with the service

__all__ = [
    "BlenderConnectionError",
    "BlenderTimeoutError",
    "Client",
    "DEFAULT_HOST",
    "ExecResult",
    "Job",
    "JobCancelled",
    "JobTimedOut",
    "check_cancelled",
    "OutcomeUnknown",
    "Pool",
    "RemoteError",
    "DEFAULT_PORT",
    "get_command_queue_size",
    "get_mcp_service_port",
    "get_startup_options",
    "get_status",
    "is_background_mode",
    "persist",
    "set_mcp_service_port",
    "is_mcp_service_up",
    "keep_alive",
    "register",
    "start_mcp_service",
    "step",
    "stop_mcp_service",
    "unregister",
]


def register() -> None:
    """Blender add-on entry point: preferences, operators, and the service when set to start automatically
    (the "Start automatically" preference, or ``BLD_REMOTE_MCP_START_NOW``)."""
    from . import gui

    gui.register()


def unregister() -> None:
    """Undo everything ``register()`` and ``start_mcp_service()`` did: end the keeper, stop the service (its
    threads joined, its port freed), remove the timer and handler, unregister the classes."""
    from . import gui

    gui.unregister()
