"""What happens to a connection on its way back to the pool.

The next borrower must get a session that carries nothing of the previous
one: no settings, role, time zone, temporary tables, advisory locks, prepared
statements, listeners, open cursors or transaction.  ``DISCARD ALL`` does
that in one statement, whose answer is one message to read.  The pool's time
zone is given to each connection as a startup option (``-c TimeZone=...``),
which ``DISCARD ALL`` keeps as the session's default: nothing to put back.

The role of ``assume_role`` is set with ``SET ROLE`` after each reset, not
as a startup option: a role dropped while the connection lives would
otherwise become the session's default as a dangling OID, which the reset
would not notice, and every statement of the next borrower would fail;
``SET ROLE`` fails instead, and a connection whose reset fails is
discarded.  ``DISCARD ALL`` refuses to run in the implicit transaction of a
multi-statement query, so with ``assume_role`` (and behind PgBouncer in
transaction mode, ``transaction_pooling``, where startup options do not
reach the server connections and time zone and ``application_name`` are
set again too) the reset spells out the parts of ``DISCARD ALL`` as the
PostgreSQL manual lists them (but ``DISCARD PLANS``) in one query, followed
by the ``SET`` statements.

The reset costs the request no round trip: it is *sent* when the connection
is returned and its result is *read* when the connection is next borrowed,
by which time the server has long answered.  If the result is an error, or
never comes, the connection is discarded, never reused.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING, Any

from psycopg import errors as e
from psycopg import sql
from psycopg.pq import ExecStatus, TransactionStatus

if TYPE_CHECKING:
    from psycopg import Connection

RESET_STATEMENTS = (
    "CLOSE ALL",
    "SET SESSION AUTHORIZATION DEFAULT",
    "RESET ALL",
    "DEALLOCATE ALL",
    "UNLISTEN *",
    "SELECT pg_advisory_unlock_all()",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
)


DISCARD_ALL = b"DISCARD ALL"


def startup_options(timezone_name: str | None) -> str:
    """libpq ``options`` that make the pool's time zone the session's default."""
    return f"-c TimeZone={_escape_option(timezone_name)}" if timezone_name else ""


def _escape_option(value: str) -> str:
    # libpq splits options at spaces; a backslash escapes a space or itself.
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def configure_statements(timezone_name: str | None, role: str | None) -> list[sql.Composable]:
    """The statements that give a session the pool's configured state."""
    statements: list[sql.Composable] = []
    if timezone_name:
        statements.append(sql.SQL("SET TIME ZONE {}").format(sql.Literal(timezone_name)))
    if role:
        # A literal, as Django does, so that the role name is taken verbatim.
        statements.append(sql.SQL("SET ROLE {}").format(sql.Literal(role)))
    return statements


def build_reset_query(configure: list[sql.Composable], conn: Connection[object]) -> bytes:
    """One simple-protocol query string that resets and reconfigures a session.

    ``DISCARD ALL`` when there is nothing to configure (the pool's session
    state comes from startup options), its parts and ``configure`` otherwise.
    """
    if not configure:
        return DISCARD_ALL
    parts = [sql.SQL(s) for s in RESET_STATEMENTS] + configure
    return sql.SQL("; ").join(parts).as_bytes(conn)


def send_reset(conn: Connection[object], query: bytes) -> None:
    """Start the reset of ``conn`` without waiting for the server's answer.

    The connection must be idle.  Raises ``psycopg.OperationalError`` if the
    query cannot be sent (the connection is then broken).
    """
    forget_transaction_options(conn)
    conn.pgconn.send_query(query)


def forget_transaction_options(conn: Connection[object]) -> None:
    """Drop psycopg's read_only/deferrable: they would apply to the next borrower's
    transactions."""
    if conn.read_only is not None:
        conn.read_only = None
    if conn.deferrable is not None:
        conn.deferrable = None


def _error_of_results(pgconn: Any) -> str | None:
    """Read every result that arrived; the first error's message, if any."""
    error: str | None = None
    try:
        while (result := pgconn.get_result()) is not None:
            if result.status not in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK) and error is None:
                error = (result.error_message or b"").decode(errors="replace").strip()
    except e.OperationalError:
        pass  # nothing more to read: what came before is all there is
    return error


def finish_reset(conn: Connection[object], timeout: float) -> None:
    """Read the answer to :func:`send_reset`; raise if the reset did not work."""
    pgconn = conn.pgconn
    try:
        pgconn.consume_input()
        if pgconn.is_busy():
            poller = select.poll()
            poller.register(pgconn.socket, select.POLLIN)
            while pgconn.is_busy():
                if not poller.poll(timeout * 1000):
                    raise e.OperationalError(
                        f"the session reset got no answer within {timeout:.1f} seconds"
                    )
                pgconn.consume_input()
    except e.OperationalError as exc:
        # The server may have said why before it closed the connection
        # (pg_terminate_backend: "terminating connection due to
        # administrator command"): that, if it arrived, is the reason.
        said = _error_of_results(pgconn)
        if said is None:
            raise
        raise e.OperationalError(f"the session reset failed: {said}") from exc
    error = _error_of_results(pgconn)
    if error is not None:
        raise e.OperationalError(f"the session reset failed: {error}")
    if pgconn.transaction_status != TransactionStatus.IDLE:
        raise e.OperationalError("the session reset left the connection in a transaction")
    # DEALLOCATE ALL dropped every prepared statement; psycopg must forget
    # the ones it prepared itself or it would try to execute them.  (clear()
    # also queues a DEALLOCATE ALL of its own, already done: drop it.)
    prepared = conn._prepared
    if prepared._names or prepared._counts:
        prepared.clear()
        prepared._to_flush.clear()
    # Notifications queued before UNLISTEN belong to the previous borrower.
    while pgconn.notifies() is not None:
        pass
