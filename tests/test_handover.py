"""Who gets a connection that comes back while borrowers wait.

psycopg_pool hands it to the first waiter, which holds it from then on, also
while it wakes up and waits for the interpreter's lock.  A connection given
back between statements (transaction-scoped release) goes instead to
whichever borrower asks first, and the first waiter is woken to ask (see
``DjangoConnectionPool.park()``).  These tests show, against the real
server, that a waiter is passed over at most once, times out as any other,
and is told when the pool closes; and that transaction-scoped release takes this
path under load.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from psycopg_pool import PoolClosed, PoolTimeout

from django_pooled_backend import pool as pool_module
from django_pooled_backend.pool import DjangoConnectionPool, PooledConnection

from .conftest import Wrappers


@pytest.fixture
def no_forced_switches() -> Iterator[None]:
    """Keep the interpreter's lock with the test's thread until it blocks.

    So that, between two calls of the test's thread, a thread it has just
    woken does not run (unless the test's thread blocks: see pass_over()).
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def one_connection_pool(make_wrapper: Wrappers, alias: str, timeout: float) -> DjangoConnectionPool:
    wrapper = make_wrapper(alias, {"min_size": 1, "max_size": 1, "timeout": timeout})
    pool = wrapper.pool
    assert pool is not None
    return pool


def until(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after 10 s"
        time.sleep(0.005)


class Waiter(threading.Thread):
    """A thread that borrows once from ``pool``, and gives back what it got."""

    def __init__(self, pool: DjangoConnectionPool) -> None:
        super().__init__(name="waiter", daemon=True)
        self.pool = pool
        self.got: PooledConnection | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.got = self.pool.borrow()
        except BaseException as exc:  # the test looks at it
            self.error = exc
        else:
            self.pool.give_back(self.got)


def queued(pool: DjangoConnectionPool) -> int:
    return pool.get_stats().get("requests_queued", 0)


def pass_over(pool: DjangoConnectionPool) -> tuple[Waiter, PooledConnection, int]:
    """A waiter passed over: this thread gives the only connection back and takes it first.

    Returns the waiter (woken, it finds nothing), the connection this thread
    holds again, and the pool's count of queued borrows before the waiter's.
    This thread may block on the pool's lock in between (another of the
    pool's threads holding it), letting the woken waiter take the connection
    first; then the waiter gives it back, and the next round tries again.
    """
    conn = pool.borrow()
    for _ in range(5):
        before = queued(pool)
        waiter = Waiter(pool)
        waiter.start()
        until(lambda: pool.state()["waiting"] == 1, "waiting")
        # Back between statements: to the idle queue, and the waiter is woken...
        assert pool.park(conn, first_come=True) is False
        # ...but this thread asks first.
        conn = pool.borrow()
        if waiter.got is None:
            return waiter, conn, before
        waiter.join(10)  # it took the connection first, and gave it back
    pytest.fail("the woken waiter took the connection first in 5 rounds out of 5")


def test_a_waiter_passed_over_once_gets_the_next_connection_back(
    make_wrapper: Wrappers, no_forced_switches: None
) -> None:
    pool = one_connection_pool(make_wrapper, "first-come", timeout=10)
    waiter, conn, queued_before = pass_over(pool)
    # The waiter finds nothing, and is first in line again.
    until(lambda: pool.state()["waiting"] == 1, "back in line")
    assert pool._waiting[0].lost  # type: ignore[attr-defined]

    # The next connection back is handed to it, even between statements.
    assert pool.park(conn, first_come=True) is False
    assert not pool._pool
    waiter.join(10)
    assert waiter.error is None
    assert waiter.got is conn
    # One borrow that queued, however many times it was woken.
    assert queued(pool) == queued_before + 1


def test_a_waiter_passed_over_times_out_as_any_other(
    make_wrapper: Wrappers, no_forced_switches: None
) -> None:
    pool = one_connection_pool(make_wrapper, "deadline", timeout=0.5)
    waiter, held, _ = pass_over(pool)
    try:
        waiter.join(10)
        assert not waiter.is_alive()
        # This backend's timeout error, with the pool's state and holder.
        assert isinstance(waiter.error, PoolTimeout)
        message = str(waiter.error)
        assert "no connection became free within 0.5 seconds" in message
        assert "Held by: MainThread" in message
        assert waiter.got is None
    finally:
        pool.give_back(held)
    # Nothing was lost: the connection is lent again at once.
    pool.give_back(pool.borrow())


def test_closing_the_pool_tells_a_waiter_passed_over(
    make_wrapper: Wrappers, no_forced_switches: None
) -> None:
    pool = one_connection_pool(make_wrapper, "closed-waiter", timeout=10)
    waiter, held, _ = pass_over(pool)
    until(lambda: pool.state()["waiting"] == 1, "back in line")
    pool.close(timeout=1)
    waiter.join(10)
    assert isinstance(waiter.error, PoolClosed)
    held.close()


def test_request_scoped_release_hands_over_to_the_first_waiter(
    make_wrapper: Wrappers, no_forced_switches: None
) -> None:
    pool = one_connection_pool(make_wrapper, "fifo", timeout=10)
    conn = pool.borrow()
    waiter = Waiter(pool)
    waiter.start()
    until(lambda: pool.state()["waiting"] == 1, "waiting")
    # The end of a request: the first waiter gets it, nobody can take it first.
    assert pool.park(conn) is False
    assert not pool._pool
    waiter.join(10)
    assert waiter.got is conn


def test_every_thread_gets_its_turn_when_statements_outnumber_connections(
    make_wrapper: Wrappers, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakes = []
    wake = pool_module._Waiter.wake

    def counting_wake(self: Any) -> bool:
        woken = wake(self)
        wakes.append(woken)
        return woken

    monkeypatch.setattr(pool_module._Waiter, "wake", counting_wake)
    options = {"min_size": 2, "max_size": 2, "timeout": 20, "release": "transaction"}
    threads, statements = 12, 40
    done = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(n: int) -> None:
        wrapper = make_wrapper("turns", options)
        try:
            start.wait(10)
            for _ in range(statements):
                # Back to back: the thread that gave the connection back is
                # the one most likely to ask first.
                with wrapper.cursor() as cursor:
                    cursor.execute("SELECT 1")
                    assert cursor.fetchone() == (1,)
                done[n] += 1
        except BaseException as exc:  # the test reports it
            errors.append(exc)
        finally:
            wrapper.close()

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert errors == []
    assert done == [statements] * threads
    pool = make_wrapper("turns", options).pool
    assert pool is not None
    # Borrowers queued, and connections given back went to whoever asked first.
    assert queued(pool) > 0
    assert any(wakes)
