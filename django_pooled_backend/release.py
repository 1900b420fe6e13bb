"""Transaction-scoped release: cursors that give the connection back between statements.

With ``OPTIONS["pool"]["release"] = "transaction"`` the Django connection
object gives its server connection back to the pool as soon as nothing
needs it, and borrows one again for its next statement:

* after each ``execute()``, ``executemany()`` or ``callproc()`` (and when a
  cursor is closed), if Django is in autocommit mode outside ``atomic()``,
  no server-side cursor of this connection is open, and the server says
  the session is idle (not in a transaction that raw SQL began);
* when a transaction ends: ``set_autocommit(True)``, which closes every
  outermost ``atomic()`` block, after its ``on_commit`` callbacks ran.

The decision costs attribute reads, no round trip.  The wiring (the cheap
re-borrow, and when the mode applies) is in :mod:`django_pooled_backend.base`.

A client-side psycopg cursor holds its whole result once ``execute()``
returns, so rows, ``rowcount`` and ``description`` stay readable after the
connection went back.  What would talk to the server again (another
``execute()``, ``copy()``, ``stream()``...) must not use the old psycopg
connection, which may be lent to another thread by then: the cursor is
re-created on the connection borrowed for it.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from django.db.backends import utils
from django.db.backends.postgresql.base import CursorDebugWrapper
from psycopg import ServerCursor

if TYPE_CHECKING:
    from .base import DatabaseWrapper

# Cursor attributes (reached through CursorWrapper.__getattr__) that send
# something to the server: they need the cursor on the current connection.
_TALKS_TO_SERVER = frozenset({"stream", "copy", "mogrify"})


class ReleasingCursorMixin:
    """What turns Django's cursor wrappers into transaction-scoped ones."""

    cursor: Any
    db: DatabaseWrapper

    def __init__(self, cursor: Any, db: DatabaseWrapper) -> None:
        self.cursor = cursor
        self.db = db
        if isinstance(cursor, ServerCursor):
            # Open until closed: the connection must stay with this wrapper.
            self._server_ref: weakref.ref[Any] | None = weakref.ref(
                self, db._server_cursors.discard
            )
            db._server_cursors.add(self._server_ref)
        else:
            self._server_ref = None

    def _bind(self) -> None:
        """Make sure the psycopg cursor is on the connection this wrapper's db holds now."""
        db = self.db
        cursor = self.cursor
        # Taken back by the pool while pinned: say what was lost, or borrow
        # again below.
        db.drop_if_revoked()
        if cursor.connection is db.connection or cursor.closed or self._server_ref is not None:
            # Already there; or closed, which psycopg reports when it is used
            # (as with request-scoped release); or server-side, which keeps
            # its connection until closed (stale only after the Django
            # connection was closed, as with request-scoped release).
            return
        # The connection went back to the pool after an earlier statement:
        # borrow again, and start a new cursor there.
        db.ensure_connection()
        with db.wrap_database_errors:
            self.cursor = db.create_cursor()

    def __getattr__(self, attr: str) -> Any:
        cursor = self.cursor
        if cursor.connection is not self.db.connection:
            if attr in _TALKS_TO_SERVER:
                self._bind()
            elif attr == "description":
                # Reads the old connection's client encoding: do it while no
                # other thread can be using that connection through psycopg.
                with cursor.connection.lock:
                    return cursor.description
        return super().__getattr__(attr)  # type: ignore[misc]

    def execute(self, sql: Any, params: Any = None) -> Any:
        try:
            return super().execute(sql, params)  # type: ignore[misc]
        finally:
            self.db._release_if_idle()

    def executemany(self, sql: Any, param_list: Any) -> Any:
        try:
            return super().executemany(sql, param_list)  # type: ignore[misc]
        finally:
            self.db._release_if_idle()

    def callproc(self, procname: Any, params: Any = None, kparams: Any = None) -> Any:
        self._bind()
        try:
            return super().callproc(procname, params, kparams)  # type: ignore[misc]
        finally:
            self.db._release_if_idle()

    # Called inside the execute wrappers, just before the statement is sent:
    # an execute wrapper may itself have run (and released after) a query.
    # The test is inline because it runs for every statement; _bind() only
    # when the connection went back.
    def _execute(self, sql: Any, params: Any, *args: Any) -> Any:
        conn = self.db.connection
        if self.cursor.connection is not conn or conn._dpb_revoked is not None:
            self._bind()
        return super()._execute(sql, params, *args)  # type: ignore[misc]

    def _executemany(self, sql: Any, param_list: Any, *args: Any) -> Any:
        conn = self.db.connection
        if self.cursor.connection is not conn or conn._dpb_revoked is not None:
            self._bind()
        return super()._executemany(sql, param_list, *args)  # type: ignore[misc]

    def close(self) -> None:
        """Close the psycopg cursor; the connection goes back if nothing else needs it."""
        try:
            self.cursor.close()
        finally:
            ref = self._server_ref
            if ref is not None:
                self._server_ref = None
                self.db._server_cursors.discard(ref)
            self.db._release_if_idle()


class ReleasingCursorWrapper(ReleasingCursorMixin, utils.CursorWrapper):
    """Django's cursor wrapper, transaction-scoped."""


class ReleasingCursorDebugWrapper(ReleasingCursorMixin, CursorDebugWrapper):
    """Django's PostgreSQL debug cursor wrapper (``connection.queries``), transaction-scoped."""

    def copy(self, statement: Any) -> Any:
        self._bind()
        return super().copy(statement)
