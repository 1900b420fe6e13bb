"""psycopg_pool's ConnectionPool, taught to reset sessions and explain itself.

What this adds to :class:`psycopg_pool.ConnectionPool`:

* a pipelined session reset (see :mod:`django_pooled_backend.reset`),
* a borrow-time health check that costs no round trip for a connection used
  a moment ago (HikariCP's "alive bypass window"), and catches connections
  the server closed while they sat idle without one,
* a record of who holds each lent-out connection, and timeout errors that
  give the pool's state and those holders.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as e
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests

from . import reset, signals
from .errors import ConnectionFailed, advice_for, server_reason
from .options import PoolOptions
from .session import StatementJudge
from .stats import PoolCounters
from .tracking import Holder, current_holder

logger = logging.getLogger("django_pooled_backend")

PARK_SECONDS = 1.0
"""How long a connection stays parked for its last borrower (see ``park()``) at most.

After that the housekeeping thread puts it back in psycopg_pool's queue,
where ``max_idle`` and ``check()`` see it.  Long enough to cover the gap
between two requests of a busy worker thread; parked connections are lent to
anyone who needs one meanwhile, so the figure costs no capacity.
"""


RETRY_BACKOFF = (0.25, 1.0)
"""While no connection works and attempts to open one fail: the first and the longest
wait (seconds) before a borrow may wait for a new attempt rather than fail at once
with the last attempt's reason (see ``DjangoConnectionPool.borrow()``).

Short, so that the pool connects again within a second of the server's return
(a request made within that second may still get the last attempt's error);
long enough that a burst of requests against a server that is down makes a
few attempts a second, not one per request.
"""

RECLAIM_INTERVAL = 0.05
"""How often (seconds) a borrow about to wait looks for connections of dead borrowers, at most."""


class _Goodbye:
    """A notice handler that keeps the error a server sent between queries.

    libpq hands an ErrorResponse that arrives while no query runs to the
    notice handlers: it is the server saying why it closes the connection
    (``terminating connection due to administrator command``).  Held by the
    connection, holding nothing: no reference cycle.
    """

    __slots__ = ("message",)

    def __init__(self) -> None:
        self.message: str | None = None

    def __call__(self, diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized in ("ERROR", "FATAL", "PANIC"):
            self.message = diag.message_primary or diag.severity_nonlocalized


@dataclass(frozen=True)
class Revoked:
    """Why a pool took a connection back from a borrower that could still use it."""

    why: str
    # The borrower had changed the session (SET, temporary tables, advisory
    # locks...): that state is gone, which its next use must be told.
    lost_session_state: bool


class PooledConnection(psycopg.Connection[Any]):
    """A psycopg connection with the pool's bookkeeping attached."""

    # Time (monotonic) the connection was last returned or checked.
    _dpb_last_ok: float = 0.0
    # A reset query was sent and its answer has not been read yet.
    _dpb_reset_pending: bool = False
    # The session needs a reset before the next borrower: a statement may
    # have changed its state, or a cursor WITH HOLD was declared.
    _dpb_dirty: bool = False
    # A statement may have changed session state that the borrower's later
    # statements rely on: transaction-scoped release pins the connection.
    _dpb_stateful: bool = False
    # Notes the error a server sends outside a query before it closes the connection.
    _dpb_goodbye: _Goodbye | None = None
    # Judges the statements run on this connection (None: every one dirties).
    _dpb_judge: StatementJudge | None = None
    # signals: the pool that opened it, and why it closes it (or None).
    _dpb_pool: weakref.ref[DjangoConnectionPool] | None = None
    _dpb_discard_reason: str | None = None

    def close(self) -> None:
        # signals: every way a pool closes a connection ends here.
        pool = self._dpb_pool() if self._dpb_pool is not None else None
        if pool is not None:
            self._dpb_pool = None
            if not self.closed:
                # stats: closed on purpose (expired, idle, pool closing, failed
                # a check); broken ones are counted as lost by psycopg_pool.
                pool.counters.closed += 1
            if signals.connection_discarded.receivers:
                pool._send_discarded(self)
        super().close()

    # connection_created was sent for a Django connection holding this one
    # (see "release" in the configuration docs).
    _dpb_announced: bool = False
    # Time (monotonic) it was parked (see DjangoConnectionPool.park()).
    _dpb_parked_at: float = 0.0
    # A statement ran since the housekeeping thread last looked (see
    # DjangoConnectionPool.take_back_idle()); set by the cursor classes.
    _dpb_active: bool = False
    # Set when the pool took the connection back from a borrower that is
    # still alive (see DjangoConnectionPool.revoke()): the connection is
    # closed, and this says why, for the borrower's next use.
    _dpb_revoked: Revoked | None = None


class DjangoConnectionPool(ConnectionPool[PooledConnection]):
    """The pool of one database alias (and one set of connection settings)."""

    def __init__(
        self,
        *,
        alias: str,
        label: str,
        options: PoolOptions,
        kwargs: dict[str, Any],
        configure_sql: list[psycopg.sql.Composable],
        isolation_level: int | None = None,
        judge: StatementJudge | None = None,
    ) -> None:
        self.alias = alias
        # Judges statements, for the "auto" reset and for pinning in
        # transaction-scoped release; None when the cursor class is the
        # user's own, so that nothing can be judged (every borrow is dirty).
        self.judge = judge
        # Django's IsolationLevel and psycopg's share values, not a type.
        self._isolation_level = (
            None if isolation_level is None else psycopg.IsolationLevel(isolation_level)
        )
        self.isolation_level = self._isolation_level
        # A description of the target that is safe to print: no password.
        self.label = label
        self.options = options
        self.connect_kwargs = kwargs
        self.holders: dict[int, Holder] = {}
        # Connections back from their borrower but kept for it (see park()):
        # id -> connection.  Taken with atomic dict operations, so that the
        # borrower taking its connection back and another thread taking it
        # over (under the pool's lock) never both get it.
        self.parked: dict[int, PooledConnection] = {}
        # Set by the registry when it no longer hands this pool out (closed,
        # replaced, or inherited through fork()): a Django connection that
        # gave a connection back between statements must not borrow here again.
        self.retired = False
        self.last_connect_error: str | None = None
        # Connection attempts that failed in a row (0 once one succeeds), and
        # when a borrow with no working connection may next wait for one
        # (monotonic; see borrow()).
        self._failed_attempts = 0
        self._next_attempt_at = 0.0
        # When a borrow about to wait may next look for orphans (monotonic).
        self._next_reclaim = 0.0
        self.counters = PoolCounters()  # stats: see stats.py
        self._configure_sql = configure_sql
        self._reset_query: bytes | None = None
        self._reset_lock = threading.Lock()
        super().__init__(
            kwargs=kwargs,
            connection_class=PooledConnection,
            min_size=options.min_size,
            max_size=options.max_size,
            name=options.name or alias,
            timeout=options.timeout,
            max_waiting=options.max_waiting,
            max_lifetime=options.max_lifetime,
            max_idle=options.max_idle,
            reconnect_timeout=options.reconnect_timeout,
            num_workers=options.num_workers,
            configure=self._configure_new,
            # Also with check="never": it finishes the pipelined reset.
            check=self._check_borrowed,
            open=False,
        )

    # -- the request path ------------------------------------------------

    def borrow(self, owner: object | None = None, *, locate: bool = True) -> PooledConnection:
        """Lend a clean, live connection to the calling thread (for ``owner``).

        ``owner`` is the Django connection object borrowing: if it is
        garbage-collected while it holds the connection, the connection is
        reclaimed.  ``locate``: whether the holder records where the borrow
        was made (see :meth:`unpark`).
        """
        started = time.monotonic()  # stats: wait time
        if self._failed_attempts and not self._pool and not self.parked and not self.holders:
            self._fail_fast_or_try(started)
        if not self._pool and self.holders and started >= self._next_reclaim:
            # About to wait: first take back what dead borrowers still hold.
            # Not on every borrow: when borrowers outnumber connections,
            # nearly every borrow waits, and looking at every holder each
            # time cost more than the wait's own bookkeeping (the
            # housekeeping thread looks twice a second anyway).
            self._next_reclaim = started + RECLAIM_INTERVAL
            self.reclaim_orphans()
        try:
            conn = self.getconn()
        except TooManyRequests as exc:
            self.counters.rejected += 1  # stats
            message = self.describe_failure(
                f"{self.state()['waiting']} requests are already waiting "
                f"(max_waiting={self.max_waiting})"
            )
            self._send_timed_out("max_waiting", message)  # signals
            raise TooManyRequests(message) from exc
        except ConnectionFailed as exc:
            self._send_timed_out("connection_failed", str(exc))  # signals
            raise ConnectionFailed(str(exc)) from None
        except PoolTimeout as exc:
            self.counters.timeouts += 1  # stats
            self.counters.waits.append(time.monotonic() - started)  # stats
            message = self.describe_failure(
                f"no connection became free within {self.timeout:g} seconds"
            )
            self._send_timed_out("timeout", message)  # signals
            raise PoolTimeout(message) from exc
        self.holders[id(conn)] = current_holder(
            conn,
            owner,
            self._owner_gone,
            full_stack=self.options.leak_threshold is not None,
            locate=locate,
        )
        waited = time.monotonic() - started
        self.counters.waits.append(waited)  # stats
        if signals.connection_borrowed.receivers:  # signals
            signals.connection_borrowed.send(self, alias=self.alias, connection=conn, waited=waited)
        return conn

    # -- when the server cannot be reached ----------------------------------

    def _fail_fast_or_try(self, now: float) -> None:
        """A borrow while no connection works and the last attempts to open one failed.

        Waiting for the pool's timeout would only delay the error: raise at
        once, with the server's reason, unless the back-off allows this
        borrow to wait for a new attempt (which it makes happen, as any
        borrow that waits does).  So a burst of requests against a server
        that is down makes one attempt per back-off period (see
        ``RETRY_BACKOFF``), not one per request.
        """
        if now >= self._next_attempt_at:
            first, longest = RETRY_BACKOFF
            self._next_attempt_at = now + min(first * 2 ** (self._failed_attempts - 1), longest)
            return
        message = self._connection_failed_message(
            self.last_connect_error or "unknown", self._next_attempt_at - now
        )
        self._send_timed_out("connection_failed", message)  # signals
        raise ConnectionFailed(message)

    def _connection_failed_message(self, reason: str, retry_in: float | None) -> str:
        s = self.state()
        when = (
            f"; this process waits for a new attempt {retry_in:.1f}s from now at the earliest"
            if retry_in is not None
            else ""
        )
        return (
            f"{reason} (database alias {self.alias!r}, {self.label})\n"
            f"The pool of database alias {self.alias!r} has no working connection and "
            f"could not open one: {self._failed_attempts} attempt(s) in a row failed. "
            f"Pool state: size {s['size']} of max {s['max']}, {s['lent']} lent out, "
            f"{s['idle']} idle, {s['waiting']} waiting. It keeps trying in the "
            f"background{when}.\n{advice_for(reason, self.alias)}"
        )

    def _connect_failed(self, exc: BaseException) -> None:
        """After a failed connection attempt: when nothing works, fail the waiting borrows now."""
        reason = server_reason(exc)
        self.last_connect_error = reason
        self._failed_attempts += 1
        if self._pool or self.parked or self.holders:
            return  # connections work, or will come back: waiting is worth it
        # The message reads the state, which takes the lock: before taking it
        # (psycopg_pool < 3.3 has a lock that cannot be taken twice).
        error = ConnectionFailed(self._connection_failed_message(reason, None))
        with self._lock:
            for waiter in list(self._waiting):
                if waiter.fail(error):
                    self._waiting.remove(waiter)

    def give_back(self, conn: PooledConnection) -> None:
        """Take ``conn`` back from its borrower and start its reset."""
        self._take_back(conn)
        self.putconn(conn)

    def park(self, conn: PooledConnection) -> bool:
        """Take ``conn`` back, but keep it for its borrower's next :meth:`unpark`.

        Request-scoped release: the thread that returns a connection at the
        end of a request most often borrows again for its next request.  A
        parked connection is back (reset started, no holder, counted idle),
        but not in psycopg_pool's queue: its borrower takes it again with
        :meth:`unpark`, which costs a dict operation instead of a pass
        through psycopg_pool.  Any other borrower that finds no idle
        connection in the queue takes a parked one over (see
        :meth:`_get_ready_connection`), before waiting or opening a new
        one; and the housekeeping thread puts back in the queue a connection
        parked for more than ``PARK_SECONDS`` (see :meth:`housekeep`).

        Returns False when the connection went back to the queue instead:
        other requests are waiting (they get it now), or it is broken,
        expired or the pool closed.
        """
        self._take_back(conn)
        now = conn._dpb_last_ok
        status = conn.pgconn.transaction_status
        parked = False
        if (status == TransactionStatus.IDLE or conn._dpb_reset_pending) and (
            getattr(conn, "_expire_at", now + 1) > now
        ):
            with self._lock:
                if not self._waiting and not self._closed:
                    conn._dpb_parked_at = now
                    self.parked[id(conn)] = conn
                    parked = True
        if not parked:
            self.putconn(conn)
        return parked

    def unpark(
        self, conn: PooledConnection, owner: object | None = None, *, locate: bool = False
    ) -> PooledConnection:
        """Lend ``conn`` again to the borrower that parked it, or any connection if it is gone.

        Unless ``locate``, the holder does not record where the borrow was
        made (the walk up the stack is the dearest part of a borrow): then
        it tells where its thread is now (see :class:`tracking.Holder`).
        """
        if self.parked.pop(id(conn), None) is not conn:
            # Taken over by another borrower, or put back in the queue.
            return self.borrow(owner, locate=locate)
        try:
            self._check_borrowed(conn)  # closes a connection that fails
        except Exception:  # noqa: BLE001 - whatever failed, the connection is gone
            # As psycopg_pool does for a connection that failed its check:
            # it replaces it, and this borrower gets another one.
            self._putconn(conn, from_getconn=True)
            return self.borrow(owner, locate=locate)
        self._stats[self._REQUESTS_NUM] += 1  # psycopg_pool's statistics, as getconn() counts
        self.holders[id(conn)] = current_holder(
            conn,
            owner,
            self._owner_gone,
            full_stack=self.options.leak_threshold is not None,
            locate=locate,
        )
        self.counters.waits.append(0.0)  # stats: it did not wait
        if signals.connection_borrowed.receivers:  # signals
            signals.connection_borrowed.send(self, alias=self.alias, connection=conn, waited=0.0)
        return conn

    def return_parked(self, older_than: float) -> int:
        """Put back in the queue the connections parked before ``older_than`` (monotonic)."""
        moved = 0
        for key, conn in list(self.parked.items()):
            if conn._dpb_parked_at < older_than and self.parked.pop(key, None) is conn:
                self.putconn(conn)
                moved += 1
        return moved

    def _take_back(self, conn: PooledConnection) -> None:
        """What a connection coming back goes through: holder, signal, reset started."""
        if signals.connection_returned.receivers:  # signals
            self._send_returned(conn)
        holder = self.holders.pop(id(conn), None)
        if holder is not None and holder.warned:
            logger.info(
                "A connection of pool %r reported as a possible leak came back from %s "
                "after %.1fs.",
                self.name,
                holder.thread.name,
                holder.held_for(),
            )
        # The borrower's last use proves the connection was alive a moment
        # ago: the next borrow within check_after skips the round trip.
        conn._dpb_last_ok = time.monotonic()
        if not conn.closed:
            try:
                self._prepare_return(conn)
            except Exception as exc:  # noqa: BLE001 - any failure discards it
                self.counters.resets_failed += 1  # stats
                logger.warning(
                    "Discarding a connection of pool %r: the session reset failed (%s).",
                    self.name,
                    exc,
                )
                conn._dpb_discard_reason = f"reset failed: {exc}"  # signals
                conn.close()

    def _prepare_return(self, conn: PooledConnection) -> None:
        status = conn.pgconn.transaction_status
        if status == TransactionStatus.ACTIVE:
            # Returned in the middle of an operation: nothing sane to do.
            raise e.OperationalError("the connection was returned during a query")
        if status != TransactionStatus.IDLE:
            # Rare (Django commits or rolls back its own transactions): pay a
            # round trip here rather than teach the pipelined reset about it.
            conn.rollback()
        # Even without the session reset, every borrower gets a connection in
        # autocommit at the pool's isolation level: a Django connection that
        # borrows again between statements does not set them (see base.py).
        if not conn.autocommit:
            conn.autocommit = True
        if conn.isolation_level != self.isolation_level:
            conn.isolation_level = self._isolation_level
        mode = self.options.reset
        if mode == "always" or (mode == "auto" and (conn._dpb_dirty or self.judge is None)):
            reset.send_reset(conn, self._reset_query_for(conn))
            conn._dpb_reset_pending = True
            self.counters.resets += 1  # stats
        elif conn.read_only is not None or conn.deferrable is not None:
            reset.forget_transaction_options(conn)
        conn._dpb_dirty = conn._dpb_stateful = False

    def _get_ready_connection(self, timeout: float | None) -> PooledConnection | None:
        # Last in, first out (psycopg_pool lends the connection idle the
        # longest).  At low concurrency the same connection, and the same
        # server process, then serves request after request with warm
        # caches, as a persistent connection does; round-robin over every
        # idle connection woke a cold server process for each query (bench/
        # measured it at tens of µs per request).  The connections left at
        # the bottom go idle for real, so max_idle closes the surplus.
        # Called by getconn() with the pool's lock held.
        if self.max_waiting and not self._pool and len(self._waiting) >= self.max_waiting:
            self._drop_gone_waiters()
        if not self._pool and self.parked:
            # Nothing idle in the queue: take over the connection parked last
            # (see park()) rather than wait or open a new one.
            if timeout is not None and timeout <= 0.0:
                raise PoolTimeout()
            return self.parked.popitem()[1]
        conn = super()._get_ready_connection(timeout)
        if conn is not None and self._pool:
            self._pool.appendleft(conn)
            conn = self._pool.pop()
        return conn

    def _drop_gone_waiters(self) -> None:
        """Forget the borrows that stopped waiting (timed out, failed).

        psycopg_pool removes a waiter from its queue only when it hands it a
        connection, so the queue keeps those that timed out until then, and
        its max_waiting check counts them: only borrows still waiting count.
        Called with the pool's lock held.
        """
        gone = [w for w in self._waiting if w.error is not None]
        for waiter in gone:
            self._waiting.remove(waiter)

    def _reset_query_for(self, conn: PooledConnection) -> bytes:
        if self._reset_query is None:
            with self._reset_lock:
                if self._reset_query is None:
                    self._reset_query = reset.build_reset_query(self._configure_sql, conn)
        return self._reset_query

    def _check_borrowed(self, conn: PooledConnection) -> None:
        # Called by getconn(); raising discards the connection and getconn()
        # tries another one.
        try:
            # Under the connection's lock, as psycopg reads results: a cursor
            # of a transaction-scoped borrower may still read this
            # connection's parameters (see release.py).
            with conn.lock:
                if conn._dpb_reset_pending:
                    conn._dpb_reset_pending = False
                    self._finish_reset(conn)  # stats: counts failures
                pgconn = conn.pgconn
                if pgconn.status != ConnStatus.OK:
                    raise e.OperationalError("the connection is closed")
                if self.options.check == "never":
                    return
                # A server that closed the connection (pg_terminate_backend,
                # idle_session_timeout, shutdown) sent a FATAL message, then
                # closed its end: reading what arrived shows either, without a
                # round trip.  consume_input() (a non-blocking read) raises on
                # the close; get_result() parses a message that came first,
                # which libpq hands to the notice handlers (see _Goodbye), and
                # returns None at once on an idle connection.  Both keep the
                # GIL in psycopg's C implementation, where poll() or
                # notifies() release it: with other threads running, every
                # release hands the GIL to one of them and the borrower waits
                # to get it back (bench/: 0.79x persistent connections' throughput
                # at 4 threads, against 0.94x without).
                try:
                    pgconn.consume_input()
                except e.OperationalError:
                    # The goodbye may have been read already (with the
                    # reset's answer): it, not the closed socket, is why.
                    self._raise_goodbye(conn)
                    raise
                if pgconn.transaction_status == TransactionStatus.ACTIVE:
                    raise e.OperationalError("the connection is still running a query")
                pgconn.get_result()
                self._raise_goodbye(conn)
            if (
                self.options.check == "always"
                or time.monotonic() - conn._dpb_last_ok > self.options.check_after
            ):
                conn.execute("")
                if self.options.custom_check is not None:
                    self.options.custom_check(conn)
                conn._dpb_last_ok = time.monotonic()
        except Exception as exc:
            # Never let getconn() put a suspect connection back in the pool.
            reason = conn._dpb_discard_reason or "check failed"  # signals
            conn._dpb_discard_reason = f"{reason}: {exc}"  # signals
            conn.close()
            raise

    @staticmethod
    def _raise_goodbye(conn: PooledConnection) -> None:
        """Raise with what the server said before closing ``conn``, if it said anything."""
        goodbye = conn._dpb_goodbye
        if goodbye is not None and goodbye.message is not None:
            raise e.OperationalError(f"the server closed the connection: {goodbye.message}")

    # -- borrowers that never come back ------------------------------------

    def _owner_gone(self, ref: object) -> None:
        # A weakref callback: it may run inside the garbage collector, at
        # any point of any thread (even one holding the pool's lock), so it
        # only asks the housekeeping thread to look.
        from . import registry

        registry.wake_housekeeper()

    def reclaim_orphans(self) -> int:
        """Take back connections whose borrower can no longer use them.

        A borrower is gone when its Django connection object was
        garbage-collected, or when the thread that borrowed has ended and
        the object is not shared with other threads
        (``inc_thread_sharing()``): Django refuses to let another thread use
        it.  A shared object that is still alive may be used by any thread,
        so its connection stays with it (``max_idle_lent`` takes it back
        once it is left unused, see :meth:`take_back_idle`).
        """
        reclaimed = 0
        for holder in list(self.holders.values()):
            why = holder.orphaned()
            if why is None:
                continue
            owner = holder.owner() if holder.owner is not None else None
            if owner is not None and owner.allow_thread_sharing:
                continue
            if owner is not None and owner._thread_ident != holder.thread.ident:
                # Made by another thread, which may still use it: the
                # connection must never reach it again once lent to others.
                if self.revoke(holder, f"{why} without closing it", idle_only=False):
                    reclaimed += 1
                    self._log_reclaim(holder, why)
                continue
            if not self._take_from_holder(holder):
                continue
            if owner is not None and owner.connection is holder.conn:
                # Nothing else may use this object (see above); should it be
                # used anyway, it connects again rather than touch a
                # connection lent to someone else.
                owner.connection = None
            self._log_reclaim(holder, why)
            self.counters.reclaims += 1  # stats
            self.putconn(holder.conn)
            reclaimed += 1
        return reclaimed

    def _take_from_holder(self, holder: Holder) -> bool:
        """Remove ``holder`` and start its connection's return, unless a statement runs on it.

        A statement running means someone still uses the connection (a
        cursor of the dead thread handed to another, a query started by
        another thread on a shared object): closing its socket under it
        would leave that thread waiting forever for an answer.
        """
        conn = holder.conn
        if not conn.lock.acquire(blocking=False):
            return False
        try:
            if conn.pgconn.transaction_status == TransactionStatus.ACTIVE:
                return False
            if self.holders.get(id(conn)) is not holder:
                return False  # returned meanwhile
        finally:
            conn.lock.release()
        # Not under the lock: the return may roll back, which takes it.
        self._take_back(conn)
        return True

    def revoke(self, holder: Holder, why: str, *, idle_only: bool = True) -> bool:
        """Take a connection back from a borrower that may still hold a reference to it.

        The connection is closed, not lent again: whatever the borrower
        kept (its Django connection object, a psycopg cursor, a local
        variable) can then never run a statement on a session lent to
        someone else; psycopg_pool opens a connection in its place.  The
        Django connection object borrows again at its next use (see
        ``DatabaseWrapper.ensure_connection()``).  With ``idle_only``, only
        a connection outside any transaction, with its session unchanged,
        is taken.  Returns whether it was taken.
        """
        conn = holder.conn
        if not conn.lock.acquire(blocking=False):
            return False  # a statement is running
        try:
            status = conn.pgconn.transaction_status
            if status == TransactionStatus.ACTIVE:
                return False
            owner = holder.owner() if holder.owner is not None else None
            if idle_only and (
                conn._dpb_dirty
                or status != TransactionStatus.IDLE
                or (owner is not None and (owner.in_atomic_block or not owner.autocommit))
            ):
                return False
            if self.holders.get(id(conn)) is not holder:
                return False  # returned meanwhile
            del self.holders[id(conn)]
            conn._dpb_revoked = Revoked(why, conn._dpb_dirty)
            conn._dpb_discard_reason = f"taken back: {why}"  # signals
            conn.close()
        finally:
            conn.lock.release()
        self.counters.reclaims += 1  # stats
        self.putconn(conn)  # psycopg_pool replaces a closed connection
        return True

    def take_back_idle(self, now: float) -> int:
        """Take back lent connections left unused outside a transaction for ``max_idle_lent``.

        A thread that is not a request (an executor of ``sync_to_async``, a
        worker loop) may keep its Django connection object, and so a
        connection, for as long as it lives.  A statement sets the
        connection's ``_dpb_active``; the housekeeping thread clears it and
        notes when it last saw it set.

        Only a connection whose session is as the pool lent it: one that
        carries session state (a ``SET``, an advisory lock, a temporary
        table, a cursor ``WITH HOLD``) is its borrower's, which may rely on
        it while idle (a process holding an advisory lock to be the only
        one doing something); it is reported once, not taken.
        """
        bound = self.options.max_idle_lent
        if bound is None:
            return 0
        taken = 0
        for holder in list(self.holders.values()):
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
                        self.name,
                        holder.thread.name,
                        quiet,
                        bound,
                    )
                continue
            why = (
                f"left unused outside a transaction for {quiet:.1f}s (max_idle_lent is {bound:g}s)"
            )
            if self.revoke(holder, why):
                taken += 1
                logger.info(
                    "Took back a connection of pool %r from thread %s: %s. Its Django "
                    "connection object borrows again at its next use.",
                    self.name,
                    holder.thread.name,
                    why,
                )
        return taken

    def _log_reclaim(self, holder: Holder, why: str) -> None:
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
            self.name,
            why,
            holder.held_for(),
            where,
        )

    def report_leaks(self, now: float) -> int:
        """Warn (once per borrow) about connections held past ``leak_threshold``."""
        threshold = self.options.leak_threshold
        if threshold is None:
            return 0
        reported = 0
        for holder in list(self.holders.values()):
            if holder.warned or holder.held_for(now) <= threshold:
                continue
            holder.warned = True
            reported += 1
            self.counters.leaks += 1  # stats
            logger.warning(
                "Possible connection leak in pool %r: thread %s has held a connection "
                "for %.1fs (leak_threshold is %gs). It was borrowed at:\n%s",
                self.name,
                holder.thread.name,
                holder.held_for(now),
                threshold,
                holder.stack_text() or holder.where_text(),
            )
        return reported

    def housekeep(self, now: float) -> None:
        """Periodic work, run by the registry's housekeeping thread."""
        self.reclaim_orphans()
        self.take_back_idle(now)
        self.report_leaks(now)
        self.return_parked(now - PARK_SECONDS)

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        # Parked connections are idle: they close with the pool (a borrower
        # that parked one finds it gone, as the pool is).
        while self.parked:
            try:
                _, conn = self.parked.popitem()
            except KeyError:  # taken back meanwhile
                break
            self._close_connection(conn)

    # -- connections coming and going ------------------------------------

    def _configure_new(self, conn: PooledConnection) -> None:
        # Runs in a pool worker thread: nothing here may touch Django's
        # per-thread connection objects (that is how Django's own pool
        # deadlocks with assume_role).
        conn._dpb_goodbye = goodbye = _Goodbye()
        conn.add_notice_handler(goodbye)
        conn.isolation_level = self._isolation_level
        if self._configure_sql:
            conn.execute(psycopg.sql.SQL("; ").join(self._configure_sql), prepare=False)
        if self.options.configure is not None:
            self.options.configure(conn)
        judge = self.judge
        if judge is not None and not judge.ready:
            try:
                judge.learn(conn)
            except psycopg.Error as exc:
                # Until it knows the server, the judge finds every statement dirty.
                logger.warning("Pool %r could not read the server's catalog: %s", self.name, exc)
        conn._dpb_judge = judge
        conn._dpb_dirty = conn._dpb_stateful = False
        conn._dpb_last_ok = time.monotonic()

    def _connect(self, timeout: float | None = None) -> PooledConnection:
        started = time.monotonic()  # signals
        try:
            conn = super()._connect(timeout)
        except Exception as exc:
            # libpq's messages name host and port, never the password.
            self._connect_failed(exc)
            raise
        self.last_connect_error = None
        self._failed_attempts = 0
        self.counters.opened += 1  # stats
        conn._dpb_pool = weakref.ref(self)  # signals
        if signals.connection_opened.receivers:  # signals
            signals.connection_opened.send(
                self, alias=self.alias, connection=conn, seconds=time.monotonic() - started
            )
        return conn

    def _reset_connection(self, conn: PooledConnection) -> None:
        if conn._dpb_reset_pending and not conn.closed:
            # The reset is in flight: the connection is busy on purpose and
            # will be finished by the next borrower's check.
            return
        super()._reset_connection(conn)

    def check_connection(self, conn: PooledConnection) -> None:  # type: ignore[override]
        """Used by :meth:`check` on idle connections: finish any reset first."""
        if conn._dpb_reset_pending:
            conn._dpb_reset_pending = False
            with conn.lock:
                self._finish_reset(conn)  # stats: counts failures
        ConnectionPool.check_connection(conn)

    # -- statistics (see stats.py) -----------------------------------------

    def _finish_reset(self, conn: PooledConnection) -> None:
        try:
            conn._dpb_discard_reason = "reset failed"  # signals
            reset.finish_reset(conn, self.timeout)
            conn._dpb_discard_reason = None  # signals
        except Exception:
            self.counters.resets_failed += 1
            raise
        if signals.connection_reset.receivers:  # signals
            signals.connection_reset.send(self, alias=self.alias, connection=conn)

    # -- explaining itself -------------------------------------------------

    def idle_connections(self) -> list[PooledConnection]:
        """The connections not lent out: psycopg_pool's queue, then the parked ones."""
        with self._lock:
            return [*self._pool, *self.parked.values()]

    def state(self) -> dict[str, int]:
        """Size, lent out, idle and waiting, from the pool's own counters."""
        with self._lock:
            size = self._nconns
            idle = len(self._pool) + len(self.parked)
            # Not len(): a borrow that timed out stays in psycopg_pool's
            # queue until a connection comes back (see _drop_gone_waiters()).
            waiting = sum(1 for w in self._waiting if w.error is None and w.conn is None)
        holders = list(self.holders.values())
        return {
            "min": self.min_size,
            "max": self.max_size,
            "size": size,
            "idle": idle,
            # Not size - idle: size also counts connections being opened.
            "lent": len(holders),
            "pinned": self.count_pinned(holders),
            "waiting": waiting,
        }

    def count_pinned(self, holders: list[Holder]) -> int:
        """How many of ``holders`` keep their connection for session state (see release.py)."""
        if self.options.release != "transaction":
            return 0
        return sum(1 for h in holders if h.conn._dpb_stateful or self.judge is None)

    def describe_failure(self, what: str) -> str:
        """A message for a failed borrow: what happened, the state, the holders, the fix."""
        s = self.state()
        now = time.monotonic()
        holders = sorted(self.holders.values(), key=lambda h: h.since)
        lines = [
            f"Could not get a connection from the pool of database alias "
            f"{self.alias!r} ({self.label}): {what}. Pool state: size {s['size']} "
            f"of max {s['max']}, {s['lent']} lent out"
            f"{f' ({pinned} pinned)' if (pinned := s['pinned']) else ''}, {s['idle']} idle, "
            f"{s['waiting']} waiting."
        ]
        if self.last_connect_error:
            lines.append(f"Last connection error: {self.last_connect_error}")
        if holders:
            shown = "; ".join(h.describe(now) for h in holders[:10])
            more = f" and {len(holders) - 10} more" if len(holders) > 10 else ""
            lines.append(f"Held by: {shown}{more}.")
        lines.append(
            "Raise OPTIONS['pool']['max_size'] or 'timeout', run fewer threads per "
            "process, or find what holds connections for long (see 'leak_threshold')."
        )
        return "\n".join(lines)

    # -- signals (django_pooled_backend.signals) ---------------------------
    # Called only when the signal has receivers: nothing here runs otherwise.

    def _send_returned(self, conn: PooledConnection) -> None:
        holder = self.holders.get(id(conn))
        held = holder.held_for() if holder is not None else 0.0
        signals.connection_returned.send(self, alias=self.alias, connection=conn, held=held)

    def _send_discarded(self, conn: PooledConnection) -> None:
        reason = conn._dpb_discard_reason
        if reason is None:
            # Closed by psycopg_pool itself: tell why from the pool's state.
            now = time.monotonic()
            if self._closed:
                reason = "pool closed"
            elif getattr(conn, "_expire_at", now + 1) <= now:
                reason = "max_lifetime"
            elif getattr(conn, "_created_at", now) <= getattr(self, "_drained_at", 0.0):
                reason = "drained"
            else:
                reason = "max_idle"
        signals.connection_discarded.send(self, alias=self.alias, connection=conn, reason=reason)

    def _send_timed_out(self, reason: str, message: str) -> None:
        if signals.borrow_timed_out.receivers:
            signals.borrow_timed_out.send(
                self,
                alias=self.alias,
                connection=None,
                reason=reason,
                state=self.state(),
                message=message,
            )
