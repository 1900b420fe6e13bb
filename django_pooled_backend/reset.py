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
never comes, the connection is discarded, never reused.  One exception:
with ``OPTIONS["prepare_threshold"]`` set, psycopg prepares statements and
must forget them when the reset deallocates them, which it does when it
sees a ``ROLLBACK`` go through it; then the reset is run through psycopg,
followed by ``BEGIN; ROLLBACK``: two round trips on return.

This module is also the other end of the trip: the check a connection goes
through when it is lent (:func:`check_lent`), which reads the reset's
answer and finds connections the server closed while they sat idle.
"""

from __future__ import annotations

import logging
import select
import time
from typing import TYPE_CHECKING, Any

from psycopg import errors as e
from psycopg import sql
from psycopg.pq import ConnStatus, ExecStatus, TransactionStatus

if TYPE_CHECKING:
    from psycopg import Connection

    from .connection import PooledConnection
    from .pool import DjangoConnectionPool

logger = logging.getLogger("django_pooled_backend")

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
        # Read the socket only if what arrived so far (see answered()) does
        # not hold the whole answer: a read that finds the connection closed
        # drops what libpq had not parsed yet, the server's reason included.
        if pgconn.is_busy():
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
    # Notifications queued before UNLISTEN belong to the previous borrower.
    while pgconn.notifies() is not None:
        pass


# -- the way back: what the pool calls ---------------------------------------


def start_return(conn: PooledConnection, pool: DjangoConnectionPool) -> None:
    """Make ``conn`` ready for the next borrower; close it if that fails.

    Ends any transaction (rare: Django commits or rolls back its own), puts
    the connection in autocommit at the pool's isolation level (a Django
    connection that borrows again between statements does not set them),
    and sends the reset unless ``reset="auto"`` and nothing may have
    changed the session.
    """
    try:
        status = conn.pgconn.transaction_status
        if status == TransactionStatus.ACTIVE:
            # Returned in the middle of an operation: nothing sane to do.
            raise e.OperationalError("the connection was returned during a query")
        if status != TransactionStatus.IDLE:
            conn.rollback()
        if not conn.autocommit:
            conn.autocommit = True
        if conn.isolation_level != pool.isolation_level:
            conn.isolation_level = pool.isolation_level
        mode = pool.options.reset
        if mode == "always" or (mode == "auto" and (conn._dpb_dirty or pool.judge is None)):
            query = pool.reset_query(conn)
            if conn.prepare_threshold is None:
                send_reset(conn, query)
                conn._dpb_reset_pending = True
            else:
                # psycopg forgets the statements it prepared when it sees a
                # ROLLBACK (psycopg 3.2 and later; 3.3 also on the reset's
                # DISCARD ALL or DEALLOCATE ALL): see the module's docstring.
                forget_transaction_options(conn)
                conn.execute(query, prepare=False)
                conn.execute("BEGIN; ROLLBACK", prepare=False)
            pool.events.reset_started()
        elif conn.read_only is not None or conn.deferrable is not None:
            forget_transaction_options(conn)
        conn._dpb_dirty = conn._dpb_stateful = False
    except Exception as exc:  # noqa: BLE001 - any failure discards it
        pool.events.reset_failed()
        logger.warning(
            "Discarding a connection of pool %r: the session reset failed (%s).", pool.name, exc
        )
        conn._dpb_discard_reason = f"reset failed: {exc}"
        conn.close()


def finish(conn: PooledConnection, pool: DjangoConnectionPool) -> None:
    """Read the answer to the reset :func:`start_return` sent; raise if it failed."""
    conn._dpb_reset_pending = False
    try:
        conn._dpb_discard_reason = "reset failed"
        finish_reset(conn, pool.timeout)
        conn._dpb_discard_reason = None
    except Exception:
        pool.events.reset_failed()
        raise
    pool.events.reset_done(conn)


def answered(conn: PooledConnection) -> bool:
    """Whether the server's answer to the reset in flight has arrived (a non-blocking read)."""
    with conn.lock:
        pgconn = conn.pgconn
        try:
            pgconn.consume_input()
        except e.OperationalError:
            return True  # broken: nothing more will come, the check says why
        return not pgconn.is_busy()


def check_lent(conn: PooledConnection, pool: DjangoConnectionPool) -> bool:
    """Whether ``conn``, about to be lent, is clean and alive; if not, it is closed.

    Finishes the reset, then checks as ``OPTIONS["pool"]["check"]`` says: a
    connection returned less than ``check_after`` seconds ago is trusted
    without a round trip, but what the server sent meanwhile (a FATAL
    message, the end of the connection) is read first, at no cost.
    """
    options = pool.options
    try:
        # Under the connection's lock, as psycopg reads results: a cursor
        # of a transaction-scoped borrower may still read this connection's
        # parameters (see release.py).
        with conn.lock:
            if conn._dpb_reset_pending:
                finish(conn, pool)
            pgconn = conn.pgconn
            if pgconn.status != ConnStatus.OK:
                raise e.OperationalError("the connection is closed")
            if options.check == "never":
                return True
            # A server that closed the connection (pg_terminate_backend,
            # idle_session_timeout, shutdown) sent a FATAL message, then
            # closed its end: reading what arrived shows either, without a
            # round trip.  consume_input() (a non-blocking read) raises on
            # the close; get_result() parses a message that came first,
            # which libpq hands to the notice handlers (see Goodbye), and
            # returns None at once on an idle connection.  Both keep the
            # GIL in psycopg's C implementation, where poll() or notifies()
            # release it (and with other threads running, the borrower
            # waits to get it back).
            try:
                pgconn.consume_input()
            except e.OperationalError:
                # The goodbye may have been read already (with the reset's
                # answer): it, not the closed socket, is why.
                raise_goodbye(conn)
                raise
            if pgconn.transaction_status == TransactionStatus.ACTIVE:
                raise e.OperationalError("the connection is still running a query")
            pgconn.get_result()
            goodbye = conn._dpb_goodbye
            if goodbye is not None and goodbye.message is not None:
                raise_goodbye(conn)
        if options.check == "always" or time.monotonic() - conn._dpb_last_ok > options.check_after:
            conn.execute("")
            if options.custom_check is not None:
                options.custom_check(conn)
            conn._dpb_last_ok = time.monotonic()
    except Exception as exc:  # noqa: BLE001 - whatever failed, the connection is not lent
        reason = conn._dpb_discard_reason or "check failed"
        conn._dpb_discard_reason = f"{reason}: {exc}"
        conn.close()
        return False
    return True


def raise_goodbye(conn: PooledConnection) -> None:
    """Raise with what the server said before closing ``conn``, if it said anything."""
    goodbye = conn._dpb_goodbye
    if goodbye is not None and goodbye.message is not None:
        raise e.OperationalError(f"the server closed the connection: {goodbye.message}")
