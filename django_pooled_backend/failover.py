"""Failover: which errors mean the server is gone, and which server a connection is on.

When the primary fails (a crash, a shutdown, a network partition), every
connection to it is dead, but a pool learns that one connection at a time:
each idle one fails its check as it is borrowed, and psycopg_pool sleeps
between failed checks (one second, then longer).  HikariCP's answer, taken
here: the first connection-class error seen on any connection of a pool
drains the whole pool (``pool.drain()``), so that the next borrows open new
connections, which libpq sends to whichever host now passes
``target_session_attrs``.

The errors that mean "this server connection is lost" are those of SQLSTATE
class 08 (connection exception), 57P01/57P02/57P03 (the server shuts down,
crashes, or cannot accept connections yet), and any error after which the
connection is found closed (libpq reports a socket closed under it with no
SQLSTATE at all).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from django.db.utils import DatabaseError, DatabaseErrorWrapper

from .options import READ_ONLY_TARGETS

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("django_pooled_backend")

_drain_lock = threading.Lock()

# 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now.
LOST_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
LOST_SQLSTATE_CLASS = "08"


def is_connection_lost(exc: BaseException | None, conn: Any = None) -> bool:
    """Whether ``exc`` (raised while using ``conn``) says the server connection is gone.

    ``exc`` may be psycopg's error or Django's wrapper of it (its cause is
    looked at).  ``conn``: the psycopg connection the error came from, if
    known; one found closed after the error counts as lost whatever the
    error was.
    """
    seen = 0
    while exc is not None and seen < 5:
        sqlstate = getattr(exc, "sqlstate", None)
        if isinstance(sqlstate, str) and (
            sqlstate.startswith(LOST_SQLSTATE_CLASS) or sqlstate in LOST_SQLSTATES
        ):
            return True
        exc = exc.__cause__
        seen += 1
    if conn is not None:
        try:
            return bool(conn.closed)
        except Exception:  # noqa: BLE001 - a connection that cannot say is not proof
            return False
    return False


READ_ONLY_SQL_TRANSACTION = "25006"


def refused_write_message(alias: str, target: str, exc: BaseException | None) -> str:
    """Why a replica alias refused a write, and what to do."""
    return (
        f"Database alias {alias!r} is a read replica (OPTIONS['target_session_attrs'] is "
        f"{target!r}) and refuses writes: {_first_line(exc)}. Send writes to the primary's "
        "alias: a database router whose db_for_write() returns it (see the 'High "
        "availability' page of the django-pooled-backend docs), or .using() / "
        "transaction.atomic(using=...) with the primary's alias."
    )


class FailoverErrorWrapper(DatabaseErrorWrapper):
    """Django's error wrapping, which also drains the pool when its server is gone.

    Every statement, commit, rollback and connect of a Django connection
    runs inside ``wrap_database_errors``: the first connection-class error
    on any connection of a pool is seen here, before Django turns it into
    ``django.db.OperationalError``.
    """

    wrapper: Any  # the DatabaseWrapper (Django sets it; django-stubs does not declare it)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None and issubclass(exc_type, self.wrapper.Database.Error):
            conn = self.wrapper.connection
            if is_connection_lost(exc_value, conn):
                drain_after_loss(self.wrapper, conn, exc_value)
            elif getattr(exc_value, "sqlstate", None) == READ_ONLY_SQL_TRANSACTION:
                target = self.wrapper.settings_dict["OPTIONS"].get("target_session_attrs")
                if target in READ_ONLY_TARGETS:
                    try:
                        super().__exit__(exc_type, exc_value, traceback)
                    except DatabaseError as exc:
                        exc.args = (refused_write_message(self.wrapper.alias, target, exc_value),)
                        raise
        super().__exit__(exc_type, exc_value, traceback)


def drain_after_loss(wrapper: Any, conn: Any, exc: BaseException | None) -> bool:
    """Drain the pool ``conn`` (or else ``wrapper``'s last pool) came from; True if drained."""
    if conn is None:
        # No connection to date the loss by (an error while connecting):
        # nothing says the pool's connections are older than the loss.
        return False
    pool = None
    ref = getattr(conn, "_dpb_pool", None)
    if ref is not None:
        pool = ref()
    if pool is None or pool.closed:
        return False
    with _drain_lock:
        # One drain per loss: the other connections that fail next were
        # opened before it and are closed already, or will be when they
        # come back; draining again would close the new connections too.
        if pool.drained_since(conn):
            return False
        pool.drain()
    logger.warning(
        "Pool %r lost a connection to %s (%s): closing every connection it opened so far, "
        "so that the next borrows connect again (to whichever host passes "
        "target_session_attrs).",
        pool.name,
        describe_server(server_of(conn)),
        _first_line(exc),
    )
    return True


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__


def read_only_kwargs(kwargs: dict[str, Any], transaction_pooling: bool) -> dict[str, Any]:
    """``kwargs`` whose sessions refuse writes when ``target_session_attrs`` asks for a replica.

    libpq's ``read-only``, ``standby`` and ``prefer-standby`` choose where to
    connect; ``prefer-standby`` still ends on the primary when no standby
    answers, and a standby promoted while the pool's connections live turns
    them into primary sessions.  Starting every session with
    ``default_transaction_read_only`` makes the replica alias refuse writes
    wherever it is.  Not behind a transaction pooler (PgBouncer forwards no
    startup options): there, the server's or the pooler's settings decide.
    """
    if transaction_pooling or kwargs.get("target_session_attrs") not in READ_ONLY_TARGETS:
        return kwargs
    startup = "-c default_transaction_read_only=on"
    return {**kwargs, "options": f"{kwargs.get('options') or ''} {startup}".strip()}


@dataclass(frozen=True)
class ServerInfo:
    """Where a connection is: host, port, and what the server said it is."""

    host: str
    port: int | None
    # True: a primary (not in hot standby); False: a standby; None: unknown
    # (a closed connection, or a server older than PostgreSQL 14, which does
    # not report in_hot_standby).
    primary: bool | None
    read_only: bool | None

    @property
    def role(self) -> str:
        """``primary``, ``standby`` or ``unknown``."""
        if self.primary is None:
            return "unknown"
        return "primary" if self.primary else "standby"

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}" if self.port is not None else self.host


def server_of(conn: psycopg.Connection[Any]) -> ServerInfo:
    """The server ``conn`` is on, from what libpq knows: no query.

    PostgreSQL 14 and later report ``in_hot_standby`` (and
    ``default_transaction_read_only``) to the client at connect time and
    whenever they change: a standby promoted while the connection is open
    reports it after the connection's next statement.
    """
    try:
        info = conn.info
        host = info.host
        port: int | None = info.port
        hot_standby = info.parameter_status("in_hot_standby")
        read_only = info.parameter_status("default_transaction_read_only")
    except Exception:  # noqa: BLE001 - closed: libpq no longer says
        return ServerInfo(host="(closed)", port=None, primary=None, read_only=None)
    return ServerInfo(
        host=host,
        port=port,
        primary=None if hot_standby is None else hot_standby == "off",
        read_only=None if read_only is None else read_only == "on",
    )


def describe_server(server: ServerInfo) -> str:
    """``127.0.0.1:5432 (primary)``."""
    return f"{server.address} ({server.role})"


def server_of_unused(conn: Any) -> ServerInfo | None:
    """:func:`server_of` for a connection another thread may be using; None if it is.

    libpq connections are not thread-safe: what the server reports
    (``in_hot_standby``) is rewritten by the thread running a statement,
    so it is read only while no statement runs (under psycopg's lock,
    taken without waiting).  The last answer is kept on the connection.
    """
    if not conn.lock.acquire(blocking=False):
        last: ServerInfo | None = getattr(conn, "_dpb_server", None)
        return last
    try:
        server = server_of(conn)
    finally:
        conn.lock.release()
    conn._dpb_server = server
    return server


def pool_servers(pool: Any) -> list[dict[str, Any]]:
    """Which servers ``pool``'s connections (idle and lent) are on, with how many on each.

    ``[{"host": ..., "port": ..., "role": "primary", "connections": 3}, ...]``,
    by address; a connection busy with a statement whose server was never
    read counts under host ``(busy)``.
    """
    conns = pool.connections()
    unknown = ServerInfo(host="(busy)", port=None, primary=None, read_only=None)
    return list(servers_of(conns, lambda c: server_of_unused(c) or unknown).values())


def servers_of(
    connections: list[Any], where: Callable[[Any], ServerInfo] | None = None
) -> dict[str, dict[str, Any]]:
    """How many of ``connections`` are on each server: ``{"host:port": {...}}``.

    ``where`` tells a connection's server (:func:`server_of` by default).
    """
    result: dict[str, dict[str, Any]] = {}
    for conn in connections:
        server = (where or server_of)(conn)
        entry = result.setdefault(
            server.address,
            {"host": server.host, "port": server.port, "role": server.role, "connections": 0},
        )
        entry["connections"] += 1
    return result
