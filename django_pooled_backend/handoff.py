"""The hand-off: who gets the next connection, in what order.

A :class:`Handoff` lends at most ``capacity`` items.  It keeps the items
that came back in a stack (last in, first out) and the borrowers that found
none in a queue (first in, first out).  An item coming back goes straight to
the borrower that has waited longest, if any: a new borrower never takes it
from under a waiting one, so no thread waits while later ones are served.

It does not make items.  When it has none idle but has lent fewer than
``capacity``, it gives the borrower a *permit* instead (``None``): the right
to fetch an item from elsewhere (psycopg_pool, which opens connections).  A
borrower that fetched nothing, or an item that is gone for good, gives its
permit back with :meth:`forfeit`, which passes it to the next waiter.

Why not psycopg_pool's own queue: it makes a ``threading.Condition`` per
waiting borrower and wakes it through Python code under the pool's lock.
Here a waiter is a C lock (``_thread.allocate_lock``) that the waiter
blocks on and the giver releases: one lock operation each, and no Python
code runs in the waiter between the release and its return.  The stack
keeps the connections used last in use (warm server processes and caches)
and lets the others go idle for real, where ``max_idle`` closes them.
"""

from __future__ import annotations

import threading
import time
from _thread import allocate_lock
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class HandoffTimeout(Exception):
    """No item and no permit became free in time."""


class HandoffFull(Exception):
    """As many borrowers as ``max_waiting`` allows are already waiting."""


class _Waiter(Generic[T]):
    __slots__ = ("item", "lock", "served", "since")

    def __init__(self, since: float) -> None:
        self.lock = allocate_lock()
        self.lock.acquire()
        self.item: T | None = None
        self.served = False
        self.since = since


class Handoff(Generic[T]):
    """At most ``capacity`` items out at once, lent last-in-first-out to waiters in turn."""

    def __init__(self, capacity: int, max_waiting: int = 0) -> None:
        self._lock = threading.Lock()
        self._idle: list[T] = []
        self._waiters: deque[_Waiter[T]] = deque()
        # Items out of the source: idle here, lent, or being fetched by a
        # permit holder.
        self._out = 0
        self.capacity = capacity
        self.max_waiting = max_waiting
        # Borrowers that had to wait, since the start.
        self.waited = 0

    def take(self, timeout: float | None) -> T | None:
        """An idle item, or ``None``: a permit to fetch one (see the module's docstring).

        Waits at most ``timeout`` seconds (None: no limit) behind the
        borrowers already waiting.  Raises :class:`HandoffTimeout` or
        :class:`HandoffFull`.
        """
        with self._lock:
            if self._idle:  # only when nobody waits: a returned item goes to a waiter first
                return self._idle.pop()
            if self._out < self.capacity and not self._waiters:
                self._out += 1
                return None
            if self.max_waiting and len(self._waiters) >= self.max_waiting:
                raise HandoffFull()
            waiter: _Waiter[T] = _Waiter(time.monotonic())
            self._waiters.append(waiter)
            self.waited += 1
        if waiter.lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            return waiter.item
        with self._lock:
            if not waiter.served:
                self._waiters.remove(waiter)
                raise HandoffTimeout()
        # Served between the timeout and the lock above: it is ours.
        return waiter.item

    def give(self, item: T) -> None:
        """Take ``item`` back: to the longest waiting borrower, or onto the stack."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.item = item
                waiter.served = True
                waiter.lock.release()
            else:
                self._idle.append(item)

    def exchange(self, item: T) -> T | None:
        """Put ``item`` back on top of the stack and take the one below it, if there is one.

        For a borrower that took an item not ready yet (a connection whose
        reset the server has not answered): another may be.
        """
        with self._lock:
            if not self._idle:
                return None
            other = self._idle.pop()
            self._idle.append(item)
            return other

    def take_idle_for_permit(self) -> T | None:
        """For a permit holder: an idle item, if one came back meanwhile, for its permit.

        The permit goes back (to the first waiter, if any), the item is the
        holder's.  None: nothing idle, the permit stays.
        """
        with self._lock:
            if not self._idle:
                return None
            item = self._idle.pop()
            if self._waiters:  # pragma: no cover - never with an idle item (see take())
                waiter = self._waiters.popleft()
                waiter.served = True
                waiter.lock.release()
            else:
                self._out -= 1
            return item

    def forfeit(self) -> None:
        """An item left for good (or a permit holder fetched none): one more may be fetched."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.served = True  # with item None: a permit
                waiter.lock.release()
            else:
                self._out -= 1

    def remove_idle(self, item: T) -> bool:
        """Take ``item`` off the stack if it is there (for housekeeping); its permit stays taken."""
        with self._lock:
            try:
                self._idle.remove(item)
            except ValueError:
                return False
            return True

    def drain_idle(self) -> list[T]:
        """Take every idle item off the stack; their permits stay taken."""
        with self._lock:
            items, self._idle = self._idle, []
            return items

    def idle(self) -> list[T]:
        """The idle items, the one lent next last."""
        with self._lock:
            return list(self._idle)

    def resize(self, capacity: int) -> None:
        """Lend at most ``capacity`` items from now on (waiters get the new permits)."""
        with self._lock:
            self.capacity = capacity
            while self._waiters and self._out < capacity:
                waiter = self._waiters.popleft()
                waiter.served = True
                self._out += 1
                waiter.lock.release()

    def would_wait(self) -> bool:
        """Whether a borrower arriving now would wait (nothing idle, no permit left)."""
        return not self._idle and self._out >= self.capacity

    @property
    def out(self) -> int:
        """Items out of the source: idle here, lent, or being fetched."""
        return self._out

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def oldest_wait(self, now: float) -> float | None:
        """How long the borrower that has waited longest has waited (seconds), or None."""
        with self._lock:
            return now - self._waiters[0].since if self._waiters else None
