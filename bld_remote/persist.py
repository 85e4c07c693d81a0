"""``bld_remote.persist``: blender-remote's in-Blender key-value API, over the running service's bounded persist
store (the one ``put_persist_data``/``get_persist_data`` use over the wire, so scripts and clients share it).

Values are stored as JSON (converted like results: see docs/PROTOCOL.md) and come back as new objects. The
store's limits apply (``persist_max_value_bytes``, ``persist_max_total_bytes``, ``persist_max_keys``): past
one, ``ValueError`` and nothing stored. The data lives in the service: without a running service these raise
``RuntimeError``, and it is gone when the service stops or Blender exits.
"""

from __future__ import annotations

from typing import Any

from . import _core

__all__ = ["get_data", "get_keys", "put_data", "remove_data"]


def put_data(key: str, data: Any) -> None:
    """Store ``data`` under ``key`` (replacing what was there)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    _core.persist_put(key, data)


def get_data(key: str, default: Any = None) -> Any:
    """The value stored under ``key``, else ``default``."""
    return _core.persist_get(key, default)


def remove_data(key: str) -> bool:
    """Remove ``key``; True if it was there."""
    return _core.persist_remove(key)


def get_keys() -> list[str]:
    """Every key stored."""
    return _core.persist_keys()
