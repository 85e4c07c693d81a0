"""The ``bld-remote`` command. Everything it does is Rust (``_core.cli_main``, see docs/CLI.md); this entry
point only routes SIGTERM and SIGHUP to the same place as Ctrl+C, so that ``bld-remote start`` shuts Blender
down gracefully on any of them. Not imported by the add-on."""

from __future__ import annotations

import signal
import sys
from typing import Any


def _interrupt(signum: int, _frame: Any) -> None:
    # The Rust side polls for signals (py.check_signals) while it waits; any exception means "stop".
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        # Respect an inherited "ignore" (e.g. nohup); replace only the default (which would kill us and
        # orphan Blender).
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _interrupt)
    from . import _core

    sys.exit(_core.cli_main(sys.argv))


if __name__ == "__main__":
    main()
