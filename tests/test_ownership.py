"""Ownership: a connection is its borrower's alone, and comes back when the borrower is done.

The cases here are those a Django connection object meets outside the
request cycle: shared with other threads (``inc_thread_sharing()``), asked
to ``connect()`` while open, kept by a thread that lives on (an executor of
``sync_to_async``, a worker loop).  Every test proves what it claims from
the server's side (backend pids, ``pg_stat_activity``, ``pg_locks``) or
from the pool's own state, in the suite's release mode.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connection, connections
from django.test import AsyncClient

from django_pooled_backend import registry, tracking
from django_pooled_backend.pool import DjangoConnectionPool
from testproject.launch import wait_for

from . import live
from .conftest import Wrappers, pooled
from .test_liveness import backend_pid


def pool_of(alias: str) -> DjangoConnectionPool:
    (pool,) = registry.pools_for_alias(alias)
    return pool


def alive(admin: psycopg.Connection[Any], pid: int) -> bool:
    row = admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row is not None


# -- shared objects and dead threads ---------------------------------------------


def test_a_shared_object_whose_thread_ended_keeps_its_connection(make_wrapper: Wrappers) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 2}
    wrapper = make_wrapper("shared_owner", options)
    wrapper.inc_thread_sharing()
    try:
        pids: list[int] = []

        def use() -> None:
            pids.append(backend_pid(wrapper))
            wrapper.ensure_connection()  # lent, in both release modes

        thread = threading.Thread(target=use, name="short-lived")
        thread.start()
        thread.join(10)
        pool = pool_of("shared_owner")
        assert tracking.reclaim_orphans(pool) == 0
        time.sleep(0.6)  # a housekeeping tick
        assert pool.state()["lent"] == 1
        # The object is alive and shared: this thread may use it, on its own
        # connection, which nobody else got meanwhile.
        assert backend_pid(wrapper) == pids[0]
    finally:
        wrapper.close()
        wrapper.dec_thread_sharing()


def test_a_dead_threads_connection_is_never_taken_while_a_statement_runs_on_it(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 5}
    handed: list[Any] = []
    end = threading.Event()

    def worker() -> None:
        wrapper = make_wrapper("running_query", options)
        wrapper.ensure_connection()
        handed.append(wrapper.connection)  # a raw connection given to another thread
        end.wait(10)

    thread = threading.Thread(target=worker, name="hands-over")
    thread.start()
    wait_for(lambda: bool(handed), timeout=10)
    raw = handed[0]
    result: list[Any] = []

    def query() -> None:
        try:
            result.append(raw.execute("SELECT pg_backend_pid(), pg_sleep(1.5)").fetchone()[0])
        except Exception as exc:
            result.append(exc)

    runner = threading.Thread(target=query)
    runner.start()
    pid = raw.info.backend_pid
    wait_for(
        lambda: (
            (
                admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
                or ("",)
            )[0]
            == "active"
        ),
        timeout=5,
    )
    end.set()
    thread.join(10)
    pool = pool_of("running_query")
    # The borrowing thread is gone, but a statement runs: nothing is taken.
    assert tracking.reclaim_orphans(pool) == 0
    assert pool.state()["lent"] == 1
    runner.join(10)
    assert result == [pid]  # answered: its socket was not closed under it
    wait_for(lambda: pool.state()["lent"] == 0, timeout=10)


def test_connect_on_an_open_object_gives_the_old_connection_back(
    make_wrapper: Wrappers,
) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 2}
    wrapper = make_wrapper("connect_open", options)
    wrapper.ensure_connection()
    for _ in range(3):  # more than max_size: each would hold one more
        wrapper.connect()
    pool = pool_of("connect_open")
    assert pool.state()["lent"] == 1
    assert backend_pid(wrapper) > 0
    wrapper.close()
    other = make_wrapper("connect_open", options)
    assert backend_pid(other) > 0
    other.close()
    assert pool.state()["lent"] == 0


# -- connections left unused by threads that live on (max_idle_lent) -------------


class Worker:
    """A thread that borrows, then waits, then uses its connection object again."""

    def __init__(self, wrappers: Wrappers, alias: str, options: dict[str, Any]) -> None:
        self.wrappers = wrappers
        self.alias = alias
        self.options = options
        self.holding = threading.Event()
        self.resume = threading.Event()
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self.run, name=f"worker-{alias}")

    def first(self, wrapper: Any) -> None:
        self.outcome["pid"] = backend_pid(wrapper)
        wrapper.ensure_connection()  # held, in both release modes

    def then(self, wrapper: Any) -> None:
        self.outcome["pid after"] = backend_pid(wrapper)

    def run(self) -> None:
        wrapper = self.wrappers(self.alias, self.options)
        try:
            self.first(wrapper)
            self.holding.set()
            self.resume.wait(20)
            self.then(wrapper)
        except Exception as exc:
            self.outcome["error"] = exc
            self.holding.set()
        finally:
            try:
                wrapper.close()
            except Exception as exc:
                self.outcome["close error"] = exc

    def __enter__(self) -> Worker:
        self.thread.start()
        assert self.holding.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.resume.set()
        self.thread.join(20)


@pytest.fixture
def idle_options() -> dict[str, Any]:
    return {"min_size": 1, "max_size": 1, "timeout": 5, "max_idle_lent": 0.5}


def test_a_connection_left_unused_by_a_live_thread_is_taken_back_and_borrowed_again(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any], idle_options: dict[str, Any]
) -> None:
    with Worker(make_wrapper, "idle_lent", idle_options) as worker:
        other = make_wrapper("idle_lent", idle_options)
        started = time.monotonic()
        # The only connection is lent to the worker, which does not use it:
        # it is taken back (closed, and replaced) within the bound.
        other_pid = backend_pid(other)
        assert time.monotonic() - started < 4
        other.close()
        assert other_pid != worker.outcome["pid"]
        assert not alive(admin, worker.outcome["pid"])
    assert "error" not in worker.outcome
    assert worker.outcome["pid after"] > 0  # borrowed again, transparently
    assert pool_of("idle_lent").counters.reclaims >= 1


def test_a_connection_with_session_state_is_never_taken_back_but_reported(
    make_wrapper: Wrappers,
    admin: psycopg.Connection[Any],
    idle_options: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="django_pooled_backend")

    class LockHolder(Worker):
        # A process that holds an advisory lock to be the only one doing
        # something, idle in between: the lock must stay held.
        def first(self, wrapper: Any) -> None:
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid(), pg_advisory_lock(4242)")
                self.outcome["pid"] = cursor.fetchone()[0]

    with LockHolder(make_wrapper, "idle_state", idle_options) as worker:
        time.sleep(1.5)  # three times the bound
        assert pool_of("idle_state").state()["lent"] == 1
        locks = admin.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
        ).fetchall()
        assert locks == [(worker.outcome["pid"],)]
    assert "error" not in worker.outcome
    assert worker.outcome["pid after"] == worker.outcome["pid"]
    reported = [r.getMessage() for r in caplog.records if "is not taken back" in r.getMessage()]
    assert len(reported) == 1  # once per borrow
    assert "pool 'idle_state'" in reported[0]
    assert "thread worker-idle_state" in reported[0]


def test_state_lost_with_a_connection_taken_from_a_dead_borrower_is_reported_at_next_use(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    # Made here, used by another thread while shared, then no longer shared:
    # the borrowing thread ended, this one may still use the object.
    wrapper = make_wrapper("dead_borrower", {"min_size": 1, "max_size": 1, "timeout": 5})
    wrapper.inc_thread_sharing()
    pids: list[int] = []

    def borrow() -> None:
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), pg_advisory_lock(4343)")
            pids.append(cursor.fetchone()[0])

    thread = threading.Thread(target=borrow, name="borrower")
    thread.start()
    thread.join(10)
    wrapper.dec_thread_sharing()
    pool = pool_of("dead_borrower")
    assert tracking.reclaim_orphans(pool) == 1
    wait_for(lambda: not alive(admin, pids[0]), timeout=5)  # closed, lock and all
    with pytest.raises(OperationalError) as excinfo:
        backend_pid(wrapper)
    message = str(excinfo.value)
    assert "database alias 'dead_borrower'" in message
    assert "thread 'borrower' ended without closing it" in message
    assert "advisory locks" in message
    assert backend_pid(wrapper) != pids[0]  # the next use connects again
    wrapper.close()


def test_a_connection_in_a_transaction_is_never_taken_back(
    make_wrapper: Wrappers, idle_options: dict[str, Any]
) -> None:
    class InTransaction(Worker):
        def first(self, wrapper: Any) -> None:
            wrapper.set_autocommit(False)
            self.outcome["pid"] = backend_pid(wrapper)

        def then(self, wrapper: Any) -> None:
            self.outcome["pid after"] = backend_pid(wrapper)
            wrapper.rollback()
            wrapper.set_autocommit(True)

    with InTransaction(make_wrapper, "idle_txn", idle_options) as worker:
        time.sleep(1.5)  # three times the bound
        assert pool_of("idle_txn").state()["lent"] == 1
    assert "error" not in worker.outcome
    assert worker.outcome["pid after"] == worker.outcome["pid"]


def test_a_long_statement_is_not_idleness(
    make_wrapper: Wrappers, idle_options: dict[str, Any]
) -> None:
    wrapper = make_wrapper("idle_long_query", idle_options)
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(1.5)")  # three times the bound
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    wrapper.close()
    assert pool_of("idle_long_query").counters.reclaims == 0


def test_max_idle_lent_none_never_takes_a_connection_back(make_wrapper: Wrappers) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 5, "max_idle_lent": None}
    with Worker(make_wrapper, "idle_never", options):
        time.sleep(1.2)
        assert pool_of("idle_never").state()["lent"] == 1
        assert tracking.take_back_idle(pool_of("idle_never"), time.monotonic() + 3600) == 0


# -- async views: ORM calls in executor threads that outlive every request -------


@pytest.fixture
def async_alias(django_db_setup: None, django_db_blocker: Any) -> Iterator[str]:
    alias = "async_views"
    settings_dict = copy.deepcopy(connection.settings_dict)
    options = {k: v for k, v in settings_dict["OPTIONS"].items() if k != "pool"}
    options["pool"] = pooled({"min_size": 1, "max_size": 4, "timeout": 5, "max_idle_lent": 0.5})
    settings_dict["OPTIONS"] = options
    connections.settings[alias] = settings_dict
    with django_db_blocker.unblock():
        try:
            yield alias
        finally:
            del connections.settings[alias]
            registry.close_alias(alias)


def test_async_views_at_six_times_max_size_all_succeed_and_the_pool_returns_to_idle(
    async_alias: str,
) -> None:
    requests = 24  # 6 x max_size, on the event loop's default executor
    gc.disable()  # a long-running event loop may not collect for a long time
    try:

        async def main() -> tuple[list[int], bool]:
            client = AsyncClient()
            responses = await asyncio.gather(
                *(client.get(f"/async/count/?using={async_alias}") for _ in range(requests))
            )
            # The loop keeps running (as a server's does): the executor
            # threads keep their connection objects, never closed.
            pool = pool_of(async_alias)
            await asyncio.to_thread(wait_for, lambda: pool.state()["lent"] == 0, 5, "lent 0")
            return [r.status_code for r in responses], pool.state()["lent"] == 0

        statuses, idle = asyncio.run(main())
    finally:
        gc.enable()
    assert statuses == [200] * requests
    assert idle


@pytest.mark.slow
def test_under_uvicorn_async_views_at_six_times_max_size_all_succeed_and_the_pool_returns_to_idle(
    transactional_db: None, tmp_path: Path
) -> None:
    """The same as above, served by a real ASGI server in a process of its own."""
    requests = 24  # 6 x max_size; uvicorn's event loop has 6 executor threads here
    env = {"POOL_MAX_IDLE_LENT": "0.5", "POOL_TIMEOUT": "10"}
    with live.serve(
        "dpb_asgi", tmp_path, max_size=4, migrate=True, asgi=True, extra_env=env
    ) as server:
        for _ in range(2):  # twice: the second burst finds the threads of the first
            threads, results = live.in_parallel(server.port, ["/async/count/"] * requests)
            live.join(threads)
            assert results == [{"count": 0}] * requests
            # The server keeps running, its executor threads with it: the
            # pool still comes back to no lent connection.
            wait_for(lambda: server.live() and server.total("lent") == 0, timeout=10, what="idle")
        assert server.master.poll() is None
