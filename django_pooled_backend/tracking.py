"""Who holds which connection, since when, and from where.

Recording a holder costs a dictionary entry and a frame reference per
borrow; the stack is only formatted when somebody asks (a timeout message,
a leak warning, poolstats).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_DJANGO_DIR = os.path.dirname(os.path.abspath(sys.modules["django"].__file__ or ""))
_SKIP_DIRS = (_PACKAGE_DIR, _DJANGO_DIR, os.path.dirname(threading.__file__))


@dataclass
class Holder:
    """One borrow of one connection."""

    conn: Any
    thread: threading.Thread
    since: float
    frame: FrameType | None
    warned: bool = field(default=False)

    def held_for(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.since

    def where(self) -> str:
        """The innermost caller outside Django and this package, as file:line."""
        return describe_frame(self.frame)

    def stack(self, limit: int = 12) -> str:
        """The borrowing stack, innermost last, for leak warnings."""
        lines: list[str] = []
        frame = self.frame
        while frame is not None and len(lines) < limit:
            code = frame.f_code
            lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
            frame = frame.f_back
        return "\n".join(reversed(lines))

    def describe(self, now: float | None = None) -> str:
        alive = "" if self.thread.is_alive() else ", thread ended"
        held = self.held_for(now)
        return f"{self.thread.name} (held {held:.1f}s{alive}, borrowed at {self.where()})"


def current_holder(conn: Any) -> Holder:
    """A :class:`Holder` of ``conn`` for the calling thread, borrowing now."""
    # Frame 0 is this function; keep a reference to the caller's chain and
    # find the interesting frame only when it is asked for.
    return Holder(conn, threading.current_thread(), time.monotonic(), sys._getframe(1))


def describe_frame(frame: FrameType | None) -> str:
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_SKIP_DIRS):
            return f"{_short(filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "unknown"


def _short(filename: str) -> str:
    cwd = os.getcwd() + os.sep
    return filename[len(cwd) :] if filename.startswith(cwd) else filename
