"""What happens in a pool, told once: to its counters and to Django's signals.

The pool calls one method of its :class:`PoolEvents` per event; that method
updates the counters that :mod:`django_pooled_backend.stats` publishes and
sends the matching signal of :mod:`django_pooled_backend.signals` when the
signal has receivers.  Nothing else in the pool counts or signals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import signals
from .stats import PoolCounters

if TYPE_CHECKING:
    from .connection import PooledConnection
    from .pool import DjangoConnectionPool
    from .tracking import Holder


class PoolEvents:
    """The counters of one pool, and its signals."""

    __slots__ = ("alias", "counters", "pool")

    def __init__(self, pool: DjangoConnectionPool) -> None:
        self.pool = pool
        self.alias = pool.alias
        self.counters = PoolCounters()

    # -- the request path: attribute reads when no receiver is connected ---

    def borrowed(self, conn: PooledConnection, waited: float) -> None:
        counters = self.counters
        counters.served += 1
        counters.waits.append(waited)
        if signals.connection_borrowed.receivers:
            signals.connection_borrowed.send(
                self.pool, alias=self.alias, connection=conn, waited=waited
            )

    def returned(self, conn: PooledConnection, holder: Holder | None) -> None:
        if signals.connection_returned.receivers:
            held = holder.held_for() if holder is not None else 0.0
            signals.connection_returned.send(
                self.pool, alias=self.alias, connection=conn, held=held
            )

    def reset_started(self) -> None:
        self.counters.resets += 1

    def reset_done(self, conn: PooledConnection) -> None:
        if signals.connection_reset.receivers:
            signals.connection_reset.send(self.pool, alias=self.alias, connection=conn)

    # -- rarer ------------------------------------------------------------

    def reset_failed(self) -> None:
        self.counters.resets_failed += 1

    def opened(self, conn: PooledConnection, seconds: float) -> None:
        self.counters.opened += 1
        if signals.connection_opened.receivers:
            signals.connection_opened.send(
                self.pool, alias=self.alias, connection=conn, seconds=seconds
            )

    def closed(self, conn: PooledConnection, reason: str) -> None:
        """``conn`` is being closed by the pool (``reason``: see signals.connection_discarded)."""
        self.counters.closed += 1
        if signals.connection_discarded.receivers:
            signals.connection_discarded.send(
                self.pool, alias=self.alias, connection=conn, reason=reason
            )

    def borrow_failed(self, reason: str, message: str, waited: float | None = None) -> None:
        """A borrow raised, for ``reason`` "timeout", "max_waiting" or "connection_failed"."""
        counters = self.counters
        counters.failed += 1
        if reason == "timeout":
            counters.timeouts += 1
        elif reason == "max_waiting":
            counters.rejected += 1
        if waited is not None:
            counters.waits.append(waited)
        if signals.borrow_timed_out.receivers:
            signals.borrow_timed_out.send(
                self.pool,
                alias=self.alias,
                connection=None,
                reason=reason,
                state=self.pool.state(),
                message=message,
            )

    def reclaimed(self) -> None:
        self.counters.reclaims += 1

    def leaked(self) -> None:
        self.counters.leaks += 1
