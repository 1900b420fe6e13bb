"""Who holds which connection, since when, and from where.

A :class:`Holder` is recorded for every borrow.  It must not keep the
borrower alive: it holds the borrowing thread and a *weak* reference to the
Django connection object that borrowed, and the place of the borrow as code
objects and line numbers (a frame would keep the borrower's locals, and so
the borrower itself, alive).  A connection is *orphaned* when its borrower
can no longer give it back: its thread has ended, or its Django connection
object was garbage-collected (a ``sync_to_async`` task that ended, a
thread-local that was cleared).
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_DJANGO_DIR = os.path.dirname(os.path.abspath(sys.modules["django"].__file__ or ""))
_SKIP_DIRS = (_PACKAGE_DIR, _DJANGO_DIR, os.path.dirname(threading.__file__))
# Where a thread is now: not in time.sleep() or socket.recv() either, but
# the code that called them (third-party packages, in site-packages, count).
_STDLIB_DIR = sysconfig.get_paths()["stdlib"]
_SITE_DIRS = tuple(
    {sysconfig.get_paths()[key] for key in ("purelib", "platlib")} | set(site.getsitepackages())
)

Place = tuple[CodeType, int]

# Whether a code object belongs to Django or this package (frames the
# "where" of a borrow skips), by id(): a code object computes its hash
# from its name, constants and names every time it is asked, which cost
# more than the rest of a borrow.  The code object is kept with its
# verdict, so that an id reused by another code object is not mistaken.
_skip: dict[int, tuple[CodeType, bool]] = {}


@dataclass(eq=False)
class Holder:
    """One borrow of one connection."""

    conn: Any
    thread: threading.Thread
    since: float
    owner: weakref.ref[Any] | None
    # Innermost first: the first frame outside Django and this package, and
    # (when leak detection is on) the frames of the whole borrowing stack.
    where: Place | None
    stack: tuple[Place, ...] = ()
    warned: bool = field(default=False)
    # False for a borrow that did not look where it came from (a thread
    # taking back the connection it parked, see pool.py): then where_text()
    # tells where the thread is now.
    located: bool = True
    # When the housekeeping thread last saw a statement run on the
    # connection (monotonic; see DjangoConnectionPool.take_back_idle()).
    quiet_since: float = 0.0
    # Left unused past max_idle_lent with session state, and said so.
    idle_reported: bool = False

    def held_for(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.since

    def orphaned(self) -> str | None:
        """Why the borrower can no longer return the connection, or None."""
        if not self.thread.is_alive():
            return f"thread {self.thread.name!r} ended"
        if self.owner is not None and self.owner() is None:
            return f"the connection object of thread {self.thread.name!r} was garbage-collected"
        return None

    def describe(self, now: float | None = None) -> str:
        alive = "" if self.thread.is_alive() else ", thread ended"
        held = self.held_for(now)
        at = "borrowed at" if self.located else "now at"
        return f"{self.thread.name} (held {held:.1f}s{alive}, {at} {self.where_text()})"

    def where_text(self) -> str:
        """``file:line in function``: where the borrow was made, or the thread is now."""
        where = self.where if self.located else _place_now(self.thread)
        if where is None:
            return "unknown"
        code, line = where
        return f"{_short(code.co_filename)}:{line} in {code.co_name}"

    def stack_text(self) -> str:
        """The borrowing stack, outermost first, as a traceback prints it."""
        return "\n".join(
            f'  File "{code.co_filename}", line {line}, in {code.co_name}'
            for code, line in reversed(self.stack)
        )


def current_holder(
    conn: Any,
    owner: object | None,
    on_owner_gone: Callable[[weakref.ref[Any]], None] | None = None,
    full_stack: bool = False,
    locate: bool = True,
) -> Holder:
    """A :class:`Holder` of ``conn`` for the calling thread, borrowing now.

    ``locate=False`` skips the walk up the stack (some microseconds, the
    dearest part of a borrow), unless ``full_stack`` asks for it.
    """
    if not locate and not full_stack:
        ref = None if owner is None else weakref.ref(owner, on_owner_gone)
        return Holder(conn, threading.current_thread(), time.monotonic(), ref, None, located=False)
    frame = sys._getframe(1)
    where: Place | None = None
    stack: list[Place] = []
    skip = _skip
    while frame is not None:
        code = frame.f_code
        if full_stack:
            stack.append((code, frame.f_lineno))
        known = skip.get(id(code))
        if known is not None and known[0] is code:
            inside = known[1]
        else:
            inside = code.co_filename.startswith(_SKIP_DIRS)
            skip[id(code)] = (code, inside)
        if where is None and not inside:
            where = (code, frame.f_lineno)
            if not full_stack:
                break
        frame = frame.f_back  # type: ignore[assignment]
    del frame
    ref = None if owner is None else weakref.ref(owner, on_owner_gone)
    return Holder(conn, threading.current_thread(), time.monotonic(), ref, where, tuple(stack))


def _place_now(thread: threading.Thread) -> Place | None:
    """The innermost frame of ``thread`` outside Django, this package and the standard library."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        code = frame.f_code
        name = code.co_filename
        if not name.startswith(_SKIP_DIRS) and (
            not name.startswith(_STDLIB_DIR) or name.startswith(_SITE_DIRS)
        ):
            return (code, frame.f_lineno)
        frame = frame.f_back
    return None


def _short(filename: str) -> str:
    cwd = os.getcwd() + os.sep
    return filename[len(cwd) :] if filename.startswith(cwd) else filename
