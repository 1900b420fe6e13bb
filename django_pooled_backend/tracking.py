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

import logging
import os
import site
import sys
import sysconfig
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import DjangoConnectionPool

logger = logging.getLogger("django_pooled_backend")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_DJANGO_DIR = os.path.dirname(os.path.abspath(sys.modules["django"].__file__ or ""))
_STDLIB_DIRS = tuple(
    {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib")}
    | {os.path.dirname(threading.__file__)}
)
_SITE_DIRS = tuple(
    {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    | set(site.getsitepackages())
    | {site.getusersitepackages()}
)
_SITE_MARKS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")

Place = tuple[CodeType, int]

# What a frame's code is.  The "where" of a borrow is the innermost frame
# of the application's own code (APP); a frame of a third-party package
# (LIBRARY: gunicorn, psycopg, asgiref...) inside it is shown beside it.
# Django's and this package's frames are the mechanics of every borrow and
# say nothing, the standard library's neither (SKIPPED: false, so that the
# walk up the stack passes them with one test).
SKIPPED, LIBRARY, APP = 0, 1, 2

# The kind of each code object, by id(): a code object computes its hash
# from its name, constants and names every time it is asked, which cost
# more than the rest of a borrow.  The code object is kept with its
# verdict, so that an id reused by another code object is not mistaken.
_kinds: dict[int, tuple[CodeType, int]] = {}


def _classify(filename: str) -> int:
    if filename.startswith((_PACKAGE_DIR, _DJANGO_DIR)):
        return SKIPPED
    if filename.startswith(_SITE_DIRS) or any(mark in filename for mark in _SITE_MARKS):
        return LIBRARY
    if filename.startswith(_STDLIB_DIRS) or filename.startswith("<"):
        return SKIPPED  # the standard library, "<frozen importlib._bootstrap>", "<string>"
    return APP


def _locate(
    frame: FrameType | None, stack: list[Place] | None = None
) -> tuple[Place | None, Place | None]:
    """``(application frame, library frame beside it)`` from ``frame`` outwards.

    The application frame is the innermost frame of the application's own
    code; the library frame the innermost third-party frame inside it (or,
    with no application frame on the stack, the innermost third-party
    frame, returned as the library frame).  ``stack`` collects every frame.
    """
    library: Place | None = None
    kinds = _kinds
    while frame is not None:
        code = frame.f_code
        if stack is not None:
            stack.append((code, frame.f_lineno))
        # _kind_of(), inlined: this loop runs on every recorded borrow.
        known = kinds.get(id(code))
        if known is not None and known[0] is code:
            kind = known[1]
        else:
            kind = _classify(code.co_filename)
            kinds[id(code)] = (code, kind)
        if kind:
            if kind == APP:
                if stack is not None:
                    _rest(frame.f_back, stack)
                return (code, frame.f_lineno), library
            if library is None:
                library = (code, frame.f_lineno)
        frame = frame.f_back
    return None, library


def _rest(frame: FrameType | None, stack: list[Place]) -> None:
    while frame is not None:
        stack.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back


@dataclass(eq=False, slots=True)
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
    # The innermost third-party frame inside ``where`` (gunicorn, psycopg...),
    # or, with ``where`` None, the innermost third-party frame.
    beside: Place | None = None
    warned: bool = field(default=False)
    # False for a borrow that did not look where it came from (the first
    # borrow of a request, see base.py): then where_text() tells where the
    # thread is now.
    located: bool = True
    # When the housekeeping thread last saw a statement run on the
    # connection (monotonic; see take_back_idle()).
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
        """Where the borrow was made, or the thread is now, in the application's code.

        ``file:line in function``, with the third-party frame it is in
        beside it: ``shop/views.py:37 in slow (in psycopg/cursor.py:97
        execute)``; with no frame of the application on the stack, the
        third-party one alone.
        """
        if self.located:
            where, beside = self.where, self.beside
        else:
            where, beside = _place_now(self.thread)
        return place_text(where, beside)

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
    stack: list[Place] | None = [] if full_stack else None
    where, beside = _locate(sys._getframe(1), stack)
    ref = None if owner is None else weakref.ref(owner, on_owner_gone)
    return Holder(
        conn,
        threading.current_thread(),
        time.monotonic(),
        ref,
        where,
        tuple(stack or ()),
        beside=beside,
    )


def _place_now(thread: threading.Thread) -> tuple[Place | None, Place | None]:
    """Where ``thread`` is now: its application frame and the library frame beside it."""
    return _locate(sys._current_frames().get(thread.ident or -1))


def place_text(where: Place | None, beside: Place | None) -> str:
    """``app.py:3 in f (in lib/mod.py:9 g)``, ``app.py:3 in f``, or the library frame alone."""
    if where is None:
        if beside is None:
            return "unknown"
        return f"{_library_text(beside)} (no application code on the stack)"
    code, line = where
    text = f"{_short(code.co_filename)}:{line} in {code.co_name}"
    return text if beside is None else f"{text} (in {_library_text(beside)})"


def _library_text(place: Place) -> str:
    code, line = place
    return f"{_short_library(code.co_filename)}:{line} {code.co_name}"


def _short_library(filename: str) -> str:
    """``gunicorn/util.py`` for ``.../site-packages/gunicorn/util.py``."""
    for mark in _SITE_MARKS:
        if mark in filename:
            return filename.rsplit(mark, 1)[1]
    for directory in _SITE_DIRS:
        if filename.startswith(directory + os.sep):
            return filename[len(directory) + 1 :]
    return _short(filename)


def _short(filename: str) -> str:
    cwd = os.getcwd() + os.sep
    return filename[len(cwd) :] if filename.startswith(cwd) else filename


# -- what the housekeeping thread does with the holders ----------------------


def reclaim_orphans(pool: DjangoConnectionPool) -> int:
    """Take back connections whose borrower can no longer use them.

    A borrower is gone when its Django connection object was
    garbage-collected, or when the thread that borrowed has ended and the
    object is not shared with other threads (``inc_thread_sharing()``):
    Django refuses to let another thread use it.  A shared object that is
    still alive may be used by any thread, so its connection stays with it
    (``max_idle_lent`` takes it back once it is left unused, see
    :func:`take_back_idle`).
    """
    reclaimed = 0
    for holder in list(pool.holders.values()):
        why = holder.orphaned()
        if why is None:
            continue
        owner = holder.owner() if holder.owner is not None else None
        if owner is not None and owner.allow_thread_sharing:
            continue
        if owner is not None and owner._thread_ident != holder.thread.ident:
            # Made by another thread, which may still use it: the connection
            # must never reach it again once lent to others.
            if pool.revoke(holder, f"{why} without closing it", idle_only=False):
                reclaimed += 1
                log_reclaim(pool, holder, why)
            continue
        if pool.take_from_dead(holder, why):
            reclaimed += 1
    return reclaimed


def take_back_idle(pool: DjangoConnectionPool, now: float) -> int:
    """Take back lent connections left unused outside a transaction for ``max_idle_lent``.

    A thread that is not a request (an executor of ``sync_to_async``, a
    worker loop) may keep its Django connection object, and so a
    connection, for as long as it lives.  A statement sets the
    connection's ``_dpb_active``; the housekeeping thread clears it and
    notes when it last saw it set.

    Only a connection whose session is as the pool lent it: one that
    carries session state (a ``SET``, an advisory lock, a temporary table,
    a cursor ``WITH HOLD``) is its borrower's, which may rely on it while
    idle (a process holding an advisory lock to be the only one doing
    something); it is reported once, not taken.
    """
    bound = pool.options.max_idle_lent
    if bound is None:
        return 0
    taken = 0
    for holder in list(pool.holders.values()):
        conn = holder.conn
        if conn._dpb_active:
            conn._dpb_active = False
            holder.quiet_since = now
            continue
        quiet = now - max(holder.since, holder.quiet_since)
        if quiet < bound:
            continue
        if conn._dpb_dirty:
            if not holder.idle_reported:
                holder.idle_reported = True
                logger.warning(
                    "A connection of pool %r has been left unused outside a transaction "
                    "by thread %s for %.1fs, but is not taken back (max_idle_lent is "
                    "%gs): its session was changed (SET, an advisory lock, a temporary "
                    "table...) and the thread may rely on that. Close the connection "
                    "(django.db.connection.close()) when that state is no longer needed.",
                    pool.name,
                    holder.thread.name,
                    quiet,
                    bound,
                )
            continue
        why = f"left unused outside a transaction for {quiet:.1f}s (max_idle_lent is {bound:g}s)"
        if pool.revoke(holder, why):
            taken += 1
            logger.info(
                "Took back a connection of pool %r from thread %s: %s. Its Django "
                "connection object borrows again at its next use.",
                pool.name,
                holder.thread.name,
                why,
            )
    return taken


def report_leaks(pool: DjangoConnectionPool, now: float) -> int:
    """Warn (once per borrow) about connections held past ``leak_threshold``."""
    threshold = pool.options.leak_threshold
    if threshold is None:
        return 0
    reported = 0
    for holder in list(pool.holders.values()):
        if holder.warned or holder.held_for(now) <= threshold:
            continue
        holder.warned = True
        reported += 1
        pool.events.leaked()
        logger.warning(
            "Possible connection leak in pool %r: thread %s has held a connection "
            "for %.1fs (leak_threshold is %gs). It was borrowed at:\n%s",
            pool.name,
            holder.thread.name,
            holder.held_for(now),
            threshold,
            holder.stack_text() or holder.where_text(),
        )
    return reported


def log_reclaim(pool: DjangoConnectionPool, holder: Holder, why: str) -> None:
    where = (
        holder.where_text()
        if holder.located
        else "a place not recorded (a connection borrowed at the start of a "
        "request; set leak_threshold to record every borrow)"
    )
    logger.warning(
        "Reclaimed a connection of pool %r: %s without closing it, %.1fs after "
        "borrowing it at %s. Close connections in threads that do not run "
        "inside a request (django.db.connection.close()).",
        pool.name,
        why,
        holder.held_for(),
        where,
    )
