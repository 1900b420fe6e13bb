"""The pool of one database alias: psycopg_pool underneath, a fair hand-off on top.

Who does what:

* psycopg_pool's :class:`~psycopg_pool.ConnectionPool` opens connections
  (in its worker threads, with its reconnection back-off), closes them, and
  keeps those nobody used for a while (``min_size``, ``max_idle``,
  ``check()``); it is used through its public API only;
* the :class:`~django_pooled_backend.handoff.Handoff` lends the connections
  in use: last in, first out, to waiting borrowers in turn;
* :mod:`~django_pooled_backend.reset` makes a returned connection clean for
  the next borrower and checks it when lent;
* :mod:`~django_pooled_backend.tracking` records who holds what, and takes
  back what dead or idle borrowers keep;
* :class:`~django_pooled_backend.events.PoolEvents` counts and signals.

A borrow takes a connection from the hand-off.  When it has none but fewer
than ``max_size`` are out, the borrow fetches one from psycopg_pool (which
has one idle, or opens one).  A returned connection goes back to the
hand-off, where the next borrow finds it; the housekeeping thread gives
psycopg_pool the ones left unused for ``IDLE_SECONDS``, so that its
``max_idle`` and ``check()`` see them.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import weakref
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests

from . import registry, reset, tracking
from .connection import Goodbye, PooledConnection, Revoked
from .errors import (
    ConnectionFailed,
    borrow_failure_message,
    connection_failed_message,
    server_reason,
)
from .events import PoolEvents
from .handoff import Handoff, HandoffFull, HandoffTimeout
from .options import PoolOptions
from .session import StatementJudge
from .tracking import Holder, current_holder

logger = logging.getLogger("django_pooled_backend")

IDLE_SECONDS = 1.0
"""How long a returned connection stays in the hand-off unused before it goes to psycopg_pool.

Long enough to cover the gap between two requests of a busy thread: in use,
a connection never leaves the hand-off.  Left unused, it goes to
psycopg_pool's queue, where ``max_idle`` closes the surplus and ``check()``
sees it.
"""

RETRY_BACKOFF = (0.1, 0.5)
"""While no connection works and attempts to open one fail: the first and the longest
wait (seconds) before a borrow may wait for a new attempt rather than fail at once
with the last attempt's reason (see ``DjangoConnectionPool.borrow()``).

Short, so that the pool connects again within a second of the server's return;
long enough that a burst of requests against a server that is down makes a
few attempts a second, not one per request.
"""

RECOVERING = 10.0
"""For how long (seconds) after a failed attempt, once the server answers again, a borrow
that psycopg_pool does not serve within ``FETCH_SLICE`` opens a connection itself.

psycopg_pool's own attempts are then still spaced by its back-off; the
connections the pool opened itself go back (closed) as soon as psycopg_pool
has idle ones of its own (see ``give_back()``).
"""

FETCH_SLICE = 0.1
"""How long (seconds) a borrow waits for psycopg_pool at a time while it opens a connection.

Between two slices the borrow looks whether an attempt failed meanwhile:
then it fails at once with the server's reason instead of waiting for the
pool's timeout.
"""

RECLAIM_INTERVAL = 0.05
"""How often (seconds) a borrow about to wait looks for connections of dead borrowers, at most."""


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
        # A description of the target that is safe to print: no password.
        self.label = label
        self.options = options
        self.connect_kwargs = kwargs
        # Judges statements, for the "auto" reset and for pinning in
        # transaction-scoped release; None when the cursor class is the
        # user's own, so that nothing can be judged (every borrow is dirty).
        self.judge = judge
        # Django's IsolationLevel and psycopg's share values, not a type.
        self.isolation_level = (
            None if isolation_level is None else psycopg.IsolationLevel(isolation_level)
        )
        self.configure_sql = configure_sql
        self.events = PoolEvents(self)
        self.counters = self.events.counters
        self.handoff: Handoff[PooledConnection] = Handoff(options.max_size, options.max_waiting)
        # id(connection) -> who borrowed it (see tracking.py).
        self.holders: dict[int, Holder] = {}
        # Every open connection of this pool, wherever it is.
        self._live: weakref.WeakSet[PooledConnection] = weakref.WeakSet()
        # Set by the registry when it no longer hands this pool out (closed,
        # replaced, or inherited through fork()): a Django connection that
        # gave a connection back between statements must not borrow here again.
        self.retired = False
        self.last_connect_error: str | None = None
        # Connection attempts that failed in a row (0 once one succeeds),
        # when the last one failed, and when a borrow with no working
        # connection may next wait for one (monotonic; see _fetch()).
        self.failed_attempts = 0
        self._failed_at = 0.0
        self._next_attempt_at = 0.0
        self._connected_at = 0.0
        # Borrows fetching from psycopg_pool (waiting for a connection to open).
        self._fetching = 0
        # When a borrow about to wait may next look for orphans (monotonic).
        self._next_reclaim = 0.0
        # Connections opened before this (monotonic) close when they come back.
        self._drained_at = 0.0
        self._reset_query: bytes | None = None
        self._reset_lock = threading.Lock()
        super().__init__(
            kwargs=kwargs,
            connection_class=PooledConnection.for_pool(self),
            min_size=options.min_size,
            max_size=options.max_size,
            name=options.name or alias,
            timeout=options.timeout,
            max_lifetime=options.max_lifetime,
            max_idle=options.max_idle,
            reconnect_timeout=options.reconnect_timeout,
            num_workers=options.num_workers,
            configure=self._set_up,
            check=self._check_fetched,
            open=False,
        )

    # -- the request path ------------------------------------------------

    def borrow(self, owner: object | None = None, *, locate: bool = True) -> PooledConnection:
        """Lend a clean, live connection to the calling thread (for ``owner``).

        ``owner`` is the Django connection object borrowing: if it is
        garbage-collected while it holds the connection, the connection is
        reclaimed.  ``locate``: whether the holder records where the borrow
        was made (the walk up the stack is the dearest part of a borrow; a
        holder that did not tells where its thread is now instead).
        """
        started = time.monotonic()
        handoff = self.handoff
        remaining = self.timeout
        while True:
            if started >= self._next_reclaim and handoff.would_wait() and self.holders:
                # About to wait: first take back what dead borrowers still
                # hold (not on every borrow: the housekeeping thread looks
                # twice a second anyway).
                self._next_reclaim = started + RECLAIM_INTERVAL
                tracking.reclaim_orphans(self)
            try:
                conn = handoff.take(remaining)
            except HandoffTimeout:
                waited = time.monotonic() - started
                message = borrow_failure_message(
                    self, f"no connection became free within {self.timeout:g} seconds"
                )
                self.events.borrow_failed("timeout", message, waited)
                raise PoolTimeout(message) from None
            except HandoffFull:
                message = borrow_failure_message(
                    self,
                    f"{handoff.waiting} requests are already waiting "
                    f"(max_waiting={handoff.max_waiting})",
                )
                self.events.borrow_failed("max_waiting", message)
                raise TooManyRequests(message) from None
            if conn is None:
                conn = self._fetch(started)  # a permit: from psycopg_pool
                break
            if conn._dpb_reset_pending and not reset.answered(conn):
                # Returned a moment ago, its reset not answered yet: the
                # one returned before it is most likely ready (this one
                # stays on top, for the next borrow); else wait for the answer.
                conn = handoff.exchange(conn) or conn
            if reset.check_lent(conn, self):
                break
            # Failed its check (closed by it): psycopg_pool replaces it.
            self._to_psycopg_pool(conn)
            remaining = self.timeout - (time.monotonic() - started)
        self.holders[id(conn)] = current_holder(
            conn,
            owner,
            self._owner_gone,
            full_stack=self.options.leak_threshold is not None,
            locate=locate,
        )
        self.events.borrowed(conn, time.monotonic() - started)
        return conn

    def give_back(self, conn: PooledConnection) -> None:
        """Take ``conn`` back from its borrower, start its reset, lend it again."""
        holder = self.holders.pop(id(conn), None)
        self.events.returned(conn, holder)
        if holder is not None and holder.warned:
            logger.info(
                "A connection of pool %r reported as a possible leak came back from %s "
                "after %.1fs.",
                self.name,
                holder.thread.name,
                holder.held_for(),
            )
        now = conn._dpb_last_ok = time.monotonic()
        if not conn.closed:
            reset.start_return(conn, self)  # closes the connection if it cannot
        if (
            conn.closed
            or conn._dpb_expire_at <= now
            or conn._dpb_created_at <= self._drained_at
            or self.closed
            or (conn._dpb_own and ConnectionPool.get_stats(self).get("pool_available", 0))
        ):
            # Also a connection the pool opened itself, once psycopg_pool
            # has one idle to take its place.
            self._to_psycopg_pool(conn)
        else:
            self.handoff.give(conn)

    # -- psycopg_pool underneath -------------------------------------------

    def _fetch(self, started: float) -> PooledConnection:
        """With a permit of the hand-off: a connection from psycopg_pool, idle or new."""
        try:
            if self.failed_attempts and not self.holders and not self.handoff.idle_count:
                self._fail_fast_or_try(started)
                # psycopg_pool retries on its own schedule (1 s, 2 s, 4 s...):
                # this borrow makes the attempt of this back-off period now.
                return self._open_own()
            self._fetching += 1
            fetch_started = time.monotonic()
            try:
                while True:
                    remaining = self.timeout - (time.monotonic() - started)
                    if remaining <= 0:
                        waited = time.monotonic() - started
                        message = borrow_failure_message(
                            self, f"no connection became free within {self.timeout:g} seconds"
                        )
                        self.events.borrow_failed("timeout", message, waited)
                        raise PoolTimeout(message)
                    try:
                        return self.getconn(min(remaining, FETCH_SLICE))
                    except PoolTimeout:
                        # A connection that came back to the hand-off
                        # meanwhile serves as well as a new one.
                        conn = self.handoff.take_idle_for_permit()
                        if conn is not None:
                            if reset.check_lent(conn, self):
                                return conn
                            # Failed its check (closed): its place is this
                            # borrow's permit again.
                            if not conn._dpb_own:
                                self.putconn(conn)
                            continue
                        if (
                            self._connected_at > self._failed_at > 0.0
                            and time.monotonic() - self._failed_at < RECOVERING
                        ):
                            # The server answers again, but psycopg_pool
                            # waits out its back-off (1, 2, 4... seconds)
                            # before its next attempt: connect now.
                            return self._open_own()
                        if (
                            self._failed_at >= fetch_started
                            and not self.holders
                            and not self.handoff.idle_count
                        ):
                            # An attempt failed while this borrow waited, and
                            # no connection works: waiting is no use.
                            message = connection_failed_message(
                                self, self.last_connect_error or "unknown", None
                            )
                            self.events.borrow_failed("connection_failed", message)
                            raise ConnectionFailed(message) from None
            finally:
                self._fetching -= 1
        except BaseException:
            self.handoff.forfeit()
            raise

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
            self._next_attempt_at = now + min(first * 2 ** (self.failed_attempts - 1), longest)
            return
        message = connection_failed_message(
            self, self.last_connect_error or "unknown", self._next_attempt_at - now
        )
        self.events.borrow_failed("connection_failed", message)
        raise ConnectionFailed(message)

    def _open_own(self) -> PooledConnection:
        """Open a connection in the borrowing thread, psycopg_pool aside (see _fetch()).

        It is the pool's like any other while in use; when it would go to
        psycopg_pool (unused, expired, broken), it is closed instead, and
        psycopg_pool's own connections take over.
        """
        try:
            # The settings this pool was made with (psycopg_pool's conninfo
            # and kwargs may be callables; this pool's are not).
            conn = self.connection_class.connect("", **self.connect_kwargs)
        except psycopg.Error as exc:
            message = connection_failed_message(self, server_reason(exc), None)
            self.events.borrow_failed("connection_failed", message)
            raise ConnectionFailed(message) from None
        conn._dpb_own = True
        try:
            self._set_up(conn)
        except Exception:
            conn._dpb_discard_reason = "configure failed"
            conn.close()
            raise
        return conn

    def _to_psycopg_pool(self, conn: PooledConnection) -> None:
        """Give ``conn`` to psycopg_pool (which closes, replaces or keeps it); free its place."""
        try:
            # psycopg_pool before 3.3 has no drain(): it would keep it.
            self._close_if_drained(conn)
            if conn._dpb_own:
                conn.close()  # not psycopg_pool's to take
            else:
                if conn._dpb_reset_pending and not conn.closed:
                    reset.finish(conn, self)  # psycopg_pool wants it idle
                self.putconn(conn)
        finally:
            self.handoff.forfeit()

    def _set_up(self, conn: PooledConnection) -> None:
        # psycopg_pool's configure callback, in its worker thread: nothing
        # here may touch Django's per-thread connection objects (that is how
        # Django's own pool deadlocks with assume_role).
        conn._dpb_goodbye = goodbye = Goodbye()
        conn.add_notice_handler(goodbye)
        conn.isolation_level = self.isolation_level
        if self.configure_sql:
            conn.execute(psycopg.sql.SQL("; ").join(self.configure_sql), prepare=False)
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
        # What ran here (the judge reading the catalog) is the pool's own.
        conn._dpb_dirty = conn._dpb_stateful = False
        conn._dpb_last_ok = time.monotonic()
        if self.max_lifetime < float("inf"):
            # Within the last 5% (as psycopg_pool): not all at once.
            jitter = 1.0 - 0.05 * random.random()
            conn._dpb_expire_at = conn._dpb_created_at + self.max_lifetime * jitter

    def _check_fetched(self, conn: PooledConnection) -> None:
        # psycopg_pool's check callback, for a connection from its queue:
        # raising makes it discard the connection and try another.
        if self._close_if_drained(conn):
            raise psycopg.OperationalError("opened before drain()")
        if not reset.check_lent(conn, self):
            raise psycopg.OperationalError(conn._dpb_discard_reason or "check failed")

    # -- called by the connections (see connection.py) ---------------------

    def connected(self, conn: PooledConnection, seconds: float) -> None:
        """A connection attempt succeeded."""
        self._connected_at = time.monotonic()
        self.last_connect_error = None
        self.failed_attempts = 0
        self._live.add(conn)
        self.events.opened(conn, seconds)

    def connect_failed(self, exc: BaseException, started: float) -> None:
        """A connection attempt failed (libpq's messages hold no password).

        An attempt that started before one that succeeded says nothing new:
        the server answers again.
        """
        if started < self._connected_at:
            return
        self.last_connect_error = server_reason(exc)
        self.failed_attempts += 1
        self._failed_at = time.monotonic()

    def closing(self, conn: PooledConnection) -> None:
        """``conn`` is being closed, by the pool or by psycopg_pool."""
        self._live.discard(conn)
        reason = conn._dpb_discard_reason
        if reason is None:
            if conn.closed:
                reason = "lost"
            elif self.closed:
                reason = "pool closed"
            elif conn._dpb_expire_at <= time.monotonic():
                reason = "max_lifetime"
            elif conn._dpb_created_at <= self._drained_at:
                reason = "drained"
            else:
                reason = "max_idle"
        self.events.closed(conn, reason)

    # -- taking connections back -------------------------------------------

    def revoke(self, holder: Holder, why: str, *, idle_only: bool = True) -> bool:
        """Take a connection back from a borrower that may still hold a reference to it.

        The connection is closed, not lent again: whatever the borrower
        kept (its Django connection object, a psycopg cursor, a local
        variable) can then never run a statement on a session lent to
        someone else; psycopg_pool opens a connection in its place.  The
        Django connection object borrows again at its next use (see
        ``DatabaseWrapper.drop_if_revoked()``).  With ``idle_only``, only a
        connection outside any transaction, with its session unchanged, is
        taken.  Returns whether it was taken.
        """
        conn = holder.conn
        if not conn.lock.acquire(blocking=False):
            return False  # a statement is running
        try:
            status = conn.pgconn.transaction_status
            if status == psycopg.pq.TransactionStatus.ACTIVE:
                return False
            owner = holder.owner() if holder.owner is not None else None
            if idle_only and (
                conn._dpb_dirty
                or status != psycopg.pq.TransactionStatus.IDLE
                or (owner is not None and (owner.in_atomic_block or not owner.autocommit))
            ):
                return False
            if self.holders.get(id(conn)) is not holder:
                return False  # returned meanwhile
            del self.holders[id(conn)]
            conn._dpb_revoked = Revoked(why, conn._dpb_dirty)
            conn._dpb_discard_reason = f"taken back: {why}"
            conn.close()
        finally:
            conn.lock.release()
        self.events.reclaimed()
        self._to_psycopg_pool(conn)
        return True

    def take_from_dead(self, holder: Holder, why: str) -> bool:
        """Return the connection of a borrower that is gone, unless a statement runs on it.

        A statement running means someone still uses the connection (a
        cursor of the dead thread handed to another, a query started by
        another thread on a shared object): closing its socket under it
        would leave that thread waiting forever for an answer.
        """
        conn = holder.conn
        if not conn.lock.acquire(blocking=False):
            return False
        try:
            if conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
                return False
            if self.holders.get(id(conn)) is not holder:
                return False  # returned meanwhile
        finally:
            conn.lock.release()
        owner = holder.owner() if holder.owner is not None else None
        if owner is not None and owner.connection is conn:
            # Nothing else may use this object (see tracking.reclaim_orphans());
            # should it be used anyway, it connects again rather than touch
            # a connection lent to someone else.
            owner.connection = None
        tracking.log_reclaim(self, holder, why)
        # Not under the lock: the return may roll back, which takes it.
        self.events.reclaimed()
        self.give_back(conn)
        return True

    def _owner_gone(self, ref: object) -> None:
        # A weakref callback: it may run inside the garbage collector, at
        # any point of any thread (even one holding a lock of the pool's),
        # so it only asks the housekeeping thread to look.
        registry.wake_housekeeper()

    # -- housekeeping ------------------------------------------------------

    def housekeep(self, now: float) -> None:
        """Periodic work, run by the registry's housekeeping thread."""
        tracking.reclaim_orphans(self)
        tracking.take_back_idle(self, now)
        tracking.report_leaks(self, now)
        self.return_unused(now - IDLE_SECONDS)

    def return_unused(self, older_than: float) -> int:
        """Give psycopg_pool the connections of the hand-off unused since ``older_than``."""
        moved = 0
        for conn in self.handoff.idle():
            if conn._dpb_last_ok < older_than and self.handoff.remove_idle(conn):
                with contextlib.suppress(Exception):  # the reset failed: it was closed
                    self._to_psycopg_pool(conn)
                moved += 1
        return moved

    def drain(self) -> None:
        """Close every connection now idle, and every lent one when it comes back.

        psycopg_pool's ``drain()``, extended to the hand-off: after a
        failover, no connection to the old server is lent again.
        """
        self._drained_at = time.monotonic()
        for conn in self.handoff.drain_idle():
            conn._dpb_discard_reason = "drained"
            conn.close()
            self._to_psycopg_pool(conn)
        if hasattr(ConnectionPool, "drain"):  # psycopg_pool >= 3.3
            super().drain()
        else:
            # psycopg_pool's check() replaces the idle connections of its
            # queue that fail check_connection(): those opened before now.
            self.check()

    def check_connection(self, conn: PooledConnection) -> None:  # type: ignore[override]
        """What psycopg_pool's ``check()`` runs on each idle connection of its queue.

        A connection opened before :meth:`drain` fails it (psycopg_pool then
        closes and replaces it); others get psycopg_pool's own check.
        """
        # Closed, not only refused: psycopg_pool 3.2 replaces a connection
        # that fails this check without closing it.
        if self._close_if_drained(conn):
            raise psycopg.OperationalError("opened before drain()")
        ConnectionPool.check_connection(conn)

    def _close_if_drained(self, conn: PooledConnection) -> bool:
        """Close ``conn`` if it was opened before the last :meth:`drain`; whether it was."""
        if not self.drained_since(conn):
            return False
        if not conn.closed:
            conn._dpb_discard_reason = "drained"
            conn.close()
        return True

    def drained_since(self, conn: PooledConnection) -> bool:
        """Whether ``conn`` was opened before the last :meth:`drain` (and so is on its way out)."""
        return conn._dpb_created_at <= self._drained_at

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        super().resize(min_size, max_size)
        self.handoff.resize(self.max_size)

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        # The hand-off's idle connections close with the pool; lent ones
        # when they come back (see give_back()).
        for conn in self.handoff.drain_idle():
            conn._dpb_discard_reason = "pool closed"
            conn.close()
            self.handoff.forfeit()

    # -- explaining itself -------------------------------------------------

    def connections(self) -> list[PooledConnection]:
        """Every open connection of this pool: idle, lent, or in psycopg_pool's queue."""
        return list(self._live)

    def idle_connections(self) -> list[PooledConnection]:
        """The connections not lent out."""
        lent = set(self.holders)
        return [c for c in self.connections() if id(c) not in lent and not c.closed]

    def get_stats(self) -> dict[str, int]:
        """psycopg_pool's statistics, with the borrows counted by the hand-off.

        psycopg_pool sees a request only when a borrow fetches a connection
        from it; ``requests_*`` and ``pool_available`` here count every
        borrow and every idle connection, as psycopg_pool's would if it
        lent them all itself.
        """
        stats = super().get_stats()
        counters = self.counters
        state = self.state(stats)
        stats["pool_available"] = state["idle"]
        stats["requests_waiting"] = state["waiting"]
        stats["requests_num"] = counters.served + counters.failed + state["waiting"]
        stats["requests_queued"] = self.handoff.waited
        stats["requests_errors"] = counters.failed
        return stats

    def state(self, stats: dict[str, int] | None = None) -> dict[str, int]:
        """Size, lent out, idle and waiting."""
        ps = super().get_stats() if stats is None else stats
        holders = list(self.holders.values())
        return {
            "min": self.min_size,
            "max": self.max_size,
            "size": ps.get("pool_size", 0),
            "idle": self.handoff.idle_count + ps.get("pool_available", 0),
            # Not size - idle: size also counts connections being opened.
            "lent": len(holders),
            "pinned": self.count_pinned(holders),
            "waiting": self.handoff.waiting + self._fetching,
        }

    def count_pinned(self, holders: list[Holder]) -> int:
        """How many of ``holders`` keep their connection for session state (see release.py)."""
        if self.options.release != "transaction":
            return 0
        return sum(1 for h in holders if h.conn._dpb_stateful or self.judge is None)

    def reset_query(self, conn: PooledConnection) -> bytes:
        """The reset this pool's connections get (built once, see reset.py)."""
        if self._reset_query is None:
            with self._reset_lock:
                if self._reset_query is None:
                    self._reset_query = reset.build_reset_query(self.configure_sql, conn)
        return self._reset_query
