"""The ENGINE: Django's PostgreSQL backend, borrowing from a process-wide pool.

This module is only wiring: ``connect()`` borrows from and ``close()``
returns to the pool of :mod:`django_pooled_backend.registry`; what a pool
does lives in :mod:`django_pooled_backend.pool`.  Django (>= 5.1) gives its
PostgreSQL backend a ``pool`` property and a ``close_pool()`` method that
its test database creation calls; they are honoured here with the same
meaning, for our pools.

With ``release="transaction"`` the connection also goes back between
statements (when :mod:`django_pooled_backend.release` says nothing needs
it) and is borrowed again, cheaply, by the next one.  Whether a connection
object does this is decided when it connects: in request-scoped mode no
query pays for it.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from dataclasses import replace
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError
from django.db.backends import utils
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.postgresql import base as postgresql
from django.db.backends.postgresql.psycopg_any import IsolationLevel, is_psycopg3
from django.db.backends.signals import connection_created
from django.db.utils import DatabaseErrorWrapper
from django.utils.asyncio import async_unsafe
from django.utils.functional import cached_property

from . import (
    checks,  # noqa: F401 - registers the system checks, even without the app
    registry,
)
from .creation import DatabaseCreation
from .options import PoolOptions, hosts_label, parse_pool_options, validate_hosts

if not is_psycopg3:  # pragma: no cover - depends on the environment
    raise ImproperlyConfigured(
        "django_pooled_backend requires psycopg 3 (found psycopg2, which has no "
        "pool). Install it with: pip install 'psycopg[binary,pool]>=3.2'."
    )

# psycopg 3 from here on (checked above).
import psycopg.sql
from psycopg.pq import TransactionStatus

from .release import ReleasingCursorDebugWrapper, ReleasingCursorWrapper
from .reset import configure_statements, startup_options
from .session import StatementJudge, TrackingCursor, TrackingServerBindingCursor

try:
    from .connection import PooledConnection
    from .failover import FailoverErrorWrapper, read_only_kwargs
    from .pool import DjangoConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImproperlyConfigured(
        "django_pooled_backend requires the psycopg_pool package, which is not "
        "installed. Install it with: pip install 'psycopg[pool]>=3.2'."
    ) from exc

_HOSTNAME = socket.gethostname()

# What the server says of a session a statement is done with: idle, or
# broken (the pool discards a broken connection when it comes back).
_RELEASABLE = frozenset({TransactionStatus.IDLE, TransactionStatus.UNKNOWN})


class _Lease:
    """Where a Django connection object borrows next: the pool of its last full connect().

    The next ``connect()`` borrows from it directly while the settings are
    those the pool was made for (see ``DatabaseWrapper._reconnect()``).
    ``between_statements``: the connection went back to the pool after a
    statement (transaction-scoped release), and the next statement borrows
    again without connecting.
    """

    __slots__ = ("between_statements", "key", "pool")

    def __init__(self, pool: DjangoConnectionPool, key: registry.PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.between_statements = False


class DatabaseWrapper(postgresql.DatabaseWrapper):
    """A PostgreSQL connection whose server connection comes from a pool."""

    # Closes every pool to a test database before dropping or cloning it.
    creation_class = DatabaseCreation

    # Transaction-scoped release.  These class values are request-scoped
    # release; connect() sets instance values when the alias releases per
    # transaction, so that the request-scoped query path stays Django's own.
    _cursor_wrapper_class: type[utils.CursorWrapper] = utils.CursorWrapper
    _debug_cursor_wrapper_class: type[utils.CursorDebugWrapper] = postgresql.CursorDebugWrapper
    # Whether a finished statement or transaction may give the connection back.
    _release_enabled = False
    # Where the next connect() borrows from without a full connect() (see
    # _Lease), or None.
    _lease: _Lease | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Weak references to this connection's open server-side cursor
        # wrappers: while there is one, the connection stays.
        self._server_cursors: set[weakref.ref[Any]] = set()

    # -- configuration -------------------------------------------------------

    @cached_property
    def pool_options(self) -> PoolOptions | None:
        """The validated ``OPTIONS["pool"]``, or None when pooling is off."""
        raw = self.settings_dict["OPTIONS"].get("pool", True)
        if raw is False or raw is None:
            return None
        options = parse_pool_options(self.alias, raw)
        if self.settings_dict.get("CONN_HEALTH_CHECKS") and options.check == "auto":
            # Django's meaning of the setting: check before every reuse.
            options = replace(options, check="always")
        return options

    @cached_property
    def is_pooled(self) -> bool:
        """Whether connect() borrows from a pool (not for the maintenance alias)."""
        return self.alias != NO_DB_ALIAS and self.pool_options is not None

    @cached_property
    def releases_per_transaction(self) -> bool:
        """Whether the connection goes back to the pool between statements and transactions."""
        options = self.pool_options if self.is_pooled else None
        return options is not None and options.release == "transaction"

    @cached_property
    def _isolation_level_option(self) -> IsolationLevel | None:
        value = self.settings_dict["OPTIONS"].get("isolation_level")
        if value is None:
            return None
        try:
            return IsolationLevel(value)
        except ValueError:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['OPTIONS']['isolation_level'] is {value!r}, "
                "which is not a transaction isolation level. Use one of the "
                "psycopg.IsolationLevel values, for example "
                "IsolationLevel.REPEATABLE_READ."
            ) from None

    def check_settings(self) -> None:
        super().check_settings()
        validate_hosts(self.alias, self.settings_dict)
        if not self.is_pooled:
            return
        max_age = self.settings_dict["CONN_MAX_AGE"]
        if max_age != 0:
            raise ImproperlyConfigured(
                f"DATABASES[{self.alias!r}]['CONN_MAX_AGE'] is {max_age!r}, but "
                "django_pooled_backend keeps the server connections open itself: "
                "a connection held by a thread between requests is one the pool "
                "cannot lend. Set CONN_MAX_AGE to 0 (the default), or set "
                "OPTIONS['pool'] to False to use persistent connections instead."
            )

    # -- the pool ------------------------------------------------------------

    # OPTIONS as _pool_key() last saw them (a copy two levels deep), and
    # their part of the key: most often unchanged since the last connect.
    _options_seen: tuple[dict[str, Any], str] | None = None

    def _pool_key(self) -> registry.PoolKey:
        sd = self.settings_dict
        options = sd["OPTIONS"]
        seen = self._options_seen
        if seen is not None and seen[0] == options:
            options_key = seen[1]
        else:
            options_key = (
                repr(sorted((k, v) for k, v in options.items() if k != "pool"))
                if len(options) > 1
                else ""
            )
            copied = {k: dict(v) if isinstance(v, dict) else v for k, v in options.items()}
            self._options_seen = (copied, options_key)
        return (
            self.alias,
            (
                sd["NAME"],
                sd["USER"],
                sd["PASSWORD"],
                sd["HOST"],
                sd["PORT"],
                options_key,
                settings.USE_TZ,
                self.timezone_name,
            ),
        )

    def _current_pool(self) -> DjangoConnectionPool:
        key = self._pool_key()
        pool = registry.get_pool(key, self._make_pool)
        return pool

    def _make_pool(self) -> DjangoConnectionPool:
        options = self.pool_options
        assert options is not None
        self._isolation_level_option  # noqa: B018 - validate before connecting
        kwargs = super().get_connection_params()
        # psycopg_pool wants idle connections in autocommit; Django sets the
        # mode it wants on every borrow, as it does on every connect.
        kwargs["autocommit"] = True
        kwargs = read_only_kwargs(kwargs, options.transaction_pooling)
        judge = None
        user_options = self.settings_dict["OPTIONS"]
        if "cursor_factory" not in user_options:
            # Django's own cursor classes, taught to note what may dirty the
            # session (see session.py).
            kwargs["cursor_factory"] = (
                TrackingServerBindingCursor
                if user_options.get("server_side_binding") is True
                else TrackingCursor
            )
            judge = StatementJudge()
        kwargs.setdefault(
            "application_name", f"django_pooled_backend {self.alias} {os.getpid()}@{_HOSTNAME}"[:63]
        )
        sd = self.settings_dict
        label = hosts_label(sd, kwargs.get("dbname", ""))
        role = sd["OPTIONS"].get("assume_role")
        if not options.transaction_pooling:
            # The time zone as a session default, which the reset keeps: no
            # SET on connect nor after each reset.  Last, so that it wins
            # over a time zone in the user's own options, as Django's SET
            # after connecting does.  The role is SET (see reset.py).
            startup = startup_options(self.timezone_name)
            if startup:
                kwargs["options"] = f"{kwargs.get('options') or ''} {startup}".strip()
            configure_sql = configure_statements(None, role)
        else:
            configure_sql = configure_statements(self.timezone_name, role)
            # Through PgBouncer, the reset's RESET ALL falls back to the
            # application_name of whichever server connection runs it.
            configure_sql.append(
                psycopg.sql.SQL("SET application_name = {}").format(
                    psycopg.sql.Literal(kwargs["application_name"])
                )
            )
        pool = DjangoConnectionPool(
            alias=self.alias,
            label=label,
            options=options,
            kwargs=kwargs,
            configure_sql=configure_sql,
            isolation_level=self._isolation_level_option,
            judge=judge,
        )
        return pool

    @property
    def pool(self) -> DjangoConnectionPool | None:
        """The pool this connection borrows from, as Django's backend defines it.

        As Django's does, it refuses persistent connections before it makes
        a pool: one made here would not be closed by anything.
        """
        if not self.is_pooled:
            return None
        max_age = self.settings_dict.get("CONN_MAX_AGE", 0)
        if max_age != 0:
            raise ImproperlyConfigured(
                "Pooling doesn't support persistent connections. "
                f"DATABASES[{self.alias!r}]['CONN_MAX_AGE'] is {max_age!r}. Set "
                "CONN_MAX_AGE to 0 (the default), or set OPTIONS['pool'] to False "
                "to use persistent connections instead."
            )
        return self._current_pool()

    def close_pool(self) -> None:
        """Close the pools of this alias (Django calls this around test databases)."""
        registry.close_alias(self.alias)

    # -- connect and close -----------------------------------------------------

    @async_unsafe
    def connect(self) -> None:
        if self.connection is not None and self.is_pooled:
            # connect() on an open object (Django's LiveServerThread does
            # it) replaces its connection: the old one goes back to the
            # pool, where stock Django would let it be closed.
            self._close()
        lease = self._lease
        if lease is not None and lease.between_statements:
            lease.between_statements = False
            if not lease.pool.retired:
                self._borrow_again(lease.pool)
                return
        releasing = self.releases_per_transaction
        # Nothing goes back while Django sets the connection up, nor while
        # connection_created receivers (which may query) run.
        self._release_enabled = False
        if releasing:
            self._server_cursors.clear()
        if lease is None or not self._reconnect(lease):
            super().connect()
            conn = self.connection
            if self.is_pooled and conn is not None:
                # Set up once: the next connect() of this object may be a _reconnect().
                pool = conn._dpb_pool() if conn._dpb_pool is not None else None
                self._lease = None if pool is None else _Lease(pool, self._pool_key())
        if releasing:
            if self.connection is not None:
                # connect() and _reconnect() sent connection_created for it.
                self.connection._dpb_announced = True
            self._cursor_wrapper_class = ReleasingCursorWrapper
            self._debug_cursor_wrapper_class = ReleasingCursorDebugWrapper
            self._release_enabled = True

    def _reconnect(self, lease: _Lease) -> bool:
        """connect() for a Django connection that connected in full before.

        What Django's ``connect()`` does on every call, less what a pooled
        connection that did it once needs no more: checking the settings
        (checked at the first connect, and what the pool key is made of is
        compared here), building the connection parameters, setting
        autocommit (the pool lends every connection in autocommit, and this
        path is only taken when ``AUTOCOMMIT`` is on), and the database
        version check (once per alias).  ``connection_created`` is sent, as
        Django sends it on every connect.  Returns False, having changed
        nothing, when the settings or the pool are not those of last time:
        then the full connect() runs.
        """
        pool = lease.pool
        if (
            pool.retired
            or not self.settings_dict["AUTOCOMMIT"]
            or self.run_commit_hooks_on_set_autocommit_on  # set_autocommit() runs them
            or self._pool_key() != lease.key
        ):
            self._lease = None
            return False
        sd = self.settings_dict
        # What BaseDatabaseWrapper.connect() resets, in the same order.
        self.in_atomic_block = False
        self.savepoint_ids = []
        self.atomic_blocks = []
        self.needs_rollback = False
        self.health_check_enabled = sd["CONN_HEALTH_CHECKS"]
        max_age = sd["CONN_MAX_AGE"]  # 0, as check_settings() requires
        self.close_at = None if max_age is None else time.monotonic() + max_age
        self.closed_in_transaction = False
        self.errors_occurred = False
        self.health_check_done = True
        level = self._isolation_level_option
        self.isolation_level = level if level is not None else IsolationLevel.READ_COMMITTED
        # The holder says where the thread is now when asked (no walk up
        # the stack on every request).
        self.connection = pool.borrow(self, locate=False)
        self.autocommit = True
        if connection_created.receivers:
            connection_created.send(sender=self.__class__, connection=self)
        self.run_on_commit = []
        return True

    def _borrow_again(self, lender: DjangoConnectionPool) -> None:
        """Borrow for the next statement, after the connection went back between statements.

        Django's connection state (autocommit, isolation level, time zone,
        role) is what the pool restores on every return, so this is a
        borrow, not a connect(): no round trip, no connection_created,
        except for a server connection that no receiver has seen yet (so
        that receivers registering adapters on ``connection.connection``,
        as ``django.contrib.postgres`` does, have done so before it runs a
        query for this alias).
        """
        # Per statement, not per request: where it was borrowed is worth
        # recording (a thread may end holding it).
        conn = lender.borrow(self)
        self.connection = conn
        if not conn._dpb_announced:
            conn._dpb_announced = True
            self._release_enabled = False
            try:
                connection_created.send(sender=self.__class__, connection=self)
            finally:
                self._release_enabled = True

    def _release_if_idle(self) -> None:
        """Give the connection back now if no transaction, cursor or session state needs it.

        A statement that may have changed the session (``SET``, a temporary
        table, ``PREPARE``, ``LISTEN``, an advisory lock: whatever the
        statement judge cannot prove harmless, see session.py) *pins* the
        connection: it stays with this object until it is closed, at the
        end of the request, so that this object keeps its own session
        state and no other borrower sees it.
        """
        conn = self.connection
        if (
            conn is not None
            and self._release_enabled
            and self.autocommit
            and not self.in_atomic_block
            and not self._server_cursors
            and not conn._dpb_stateful
            and conn._dpb_judge is not None
            and conn.pgconn.transaction_status in _RELEASABLE
        ):
            lease = self._lease
            if lease is None:
                return  # connected before the lease: stays until closed
            self.connection = None
            lease.between_statements = True
            with self.wrap_database_errors:
                lease.pool.give_back(conn)

    def set_autocommit(
        self, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> None:
        super().set_autocommit(autocommit, force_begin_transaction_with_broken_autocommit)
        if autocommit and self._release_enabled:
            # The end of a transaction (the outermost atomic() block, after
            # its on_commit callbacks ran), or of manual transactions.
            self._release_if_idle()

    def get_autocommit(self) -> bool:
        lease = self._lease
        if lease is not None and lease.between_statements:
            # Gone back in autocommit mode: no need to borrow to say so.
            return self.autocommit
        return super().get_autocommit()

    # Where a connection taken back by the pool (see
    # DjangoConnectionPool.revoke()) is noticed: before a cursor is made and
    # before autocommit changes (atomic() starts there), not in
    # ensure_connection(), which Django's own tests replace with a mock that
    # calls the original.

    def _cursor(self, name: str | None = None) -> Any:
        self.drop_if_revoked()
        return super()._cursor(name)  # type: ignore[misc]

    def drop_if_revoked(self) -> None:
        """Forget the connection if the pool took it back: the next use connects again."""
        conn = self.connection
        if conn is not None and getattr(conn, "_dpb_revoked", None) is not None:
            self._forget_revoked(conn, explain=True)

    def _forget_revoked(self, conn: PooledConnection, *, explain: bool) -> None:
        """Drop a connection the pool took back (see ``DjangoConnectionPool.revoke()``).

        With ``explain``, raise OperationalError if the session state this
        object had set up went with it: its next statement would otherwise
        run without it (a ``SET`` undone, an advisory lock no longer held)
        and nothing would say so.  The use after that borrows again.
        """
        self.connection = None
        revoked = conn._dpb_revoked
        if explain and revoked is not None and revoked.lost_session_state:
            raise OperationalError(
                f"The connection of database alias {self.alias!r} was taken back by the "
                f"pool: {revoked.why}. Its session state (SET, temporary tables, prepared "
                "statements, LISTEN, advisory locks or cursors WITH HOLD) went with it, so "
                "this use is refused rather than run without it; the next use connects "
                "again. Close a connection in the thread that borrowed it before that "
                "thread ends, or keep the object shared (inc_thread_sharing()) while "
                "other threads use it."
            )

    def close(self) -> None:  # Django's close() is @async_unsafe
        # A connection that went back between statements is closed too: the
        # next query connects in full (and sends connection_created).
        if self._lease is not None:
            self._lease.between_statements = False
        super().close()

    def close_if_unusable_or_obsolete(self) -> None:
        # Request boundaries (close_old_connections): with CONN_MAX_AGE = 0
        # Django closes what is open; a connection that went back between
        # statements counts as closed likewise, so that every request
        # starts with a full connect(), as in request-scoped release.
        if self._lease is not None:
            self._lease.between_statements = False
        conn = self.connection
        if conn is not None and getattr(conn, "_dpb_revoked", None) is not None:
            # Taken back by the pool: at a request boundary, its loss is
            # nothing to report (the request's session state ends here).
            self._forget_revoked(conn, explain=False)
        super().close_if_unusable_or_obsolete()

    def make_cursor(self, cursor: Any) -> utils.CursorWrapper:
        return self._cursor_wrapper_class(cursor, self)

    def make_debug_cursor(self, cursor: Any) -> utils.CursorDebugWrapper:
        return self._debug_cursor_wrapper_class(cursor, self)

    def get_connection_params(self) -> dict[str, Any]:
        if not self.is_pooled:
            return super().get_connection_params()
        # Computed once per pool rather than on every borrow.
        return dict(self._current_pool().connect_kwargs)

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:  # called by connect()
        if not self.is_pooled:
            return super().get_new_connection(conn_params)
        level = self._isolation_level_option
        self.isolation_level = level if level is not None else IsolationLevel.READ_COMMITTED
        return self._current_pool().borrow(self)

    def _set_autocommit(self, autocommit: bool) -> None:
        if self.is_pooled and getattr(self.connection, "_dpb_revoked", None) is not None:
            self.drop_if_revoked()
            self.connect()
        conn = self.connection
        if (
            self.is_pooled
            and conn.autocommit == autocommit
            and conn.pgconn.transaction_status == TransactionStatus.IDLE
        ):
            # connect() sets AUTOCOMMIT on every borrow, and the pool lends
            # connections in autocommit: psycopg would take its lock and run
            # a generator only to find nothing to change (it does nothing
            # else for an idle connection).
            return
        super()._set_autocommit(autocommit)  # type: ignore[misc]

    def init_connection_state(self) -> None:
        if not self.is_pooled:
            super().init_connection_state()
            return
        # The pool configured time zone and role when it opened the server
        # connection, and restores them on every reset: no round trip here.
        BaseDatabaseWrapper.init_connection_state(self)

    def _close(self) -> None:
        if not self.is_pooled:
            super()._close()  # type: ignore[misc]
            return
        conn = self.connection
        if conn is None:
            return
        if conn._dpb_revoked is not None:
            # Already taken back by the pool: nothing to give back.
            self._forget_revoked(conn, explain=False)
            return
        # Whatever happens next, this wrapper no longer owns the connection.
        self.connection = None
        pool = conn._dpb_pool() if conn._dpb_pool is not None else None
        with self.wrap_database_errors:
            if pool is not None:
                pool.give_back(conn)
            else:
                conn.close()  # its pool is gone

    def create_cursor(self, name: str | None = None) -> Any:
        lease = self._lease
        if self.connection is None and lease is not None and lease.between_statements:
            # A statement run after connecting but before this cursor (by
            # code wrapping ensure_connection(), as Django's test_utils
            # tests do) gave the connection back: borrow again.
            self.connect()
        if name and self.is_pooled and self.connection is not None:
            # A server-side cursor is declared WITH HOLD outside transactions.
            self.connection._dpb_dirty = True
        return super().create_cursor(name)

    @cached_property
    def wrap_database_errors(self) -> DatabaseErrorWrapper:
        """Django's error wrapping, draining the pool on a lost server (see failover.py)."""
        if not self.is_pooled:
            return DatabaseErrorWrapper(self)
        return FailoverErrorWrapper(self)

    def close_if_health_check_failed(self) -> None:
        if self.is_pooled:
            # The pool checks connections when it lends them.
            return
        super().close_if_health_check_failed()
