"""SIGTERM ends a script as Ctrl-C does: its cleanup runs.

Python's default for SIGTERM is to die at once, without running ``finally``
blocks or :mod:`atexit` handlers, so that a benchmark or the demo killed by
``kill``, a CI timeout or a process manager would leave behind what it
started: PgBouncer, gunicorn, the embedded PostgreSQL server.
"""

from __future__ import annotations

import signal
from types import FrameType


def exit_on_sigterm() -> None:
    """From now on, SIGTERM raises ``SystemExit`` in the main thread (exit status 143)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
