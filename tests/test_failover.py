"""Failover: a lost server connection drains the pool; a promoted standby takes over.

The drain is shown on the suite's server (``pg_terminate_backend`` on one
connection, then ``pg_stat_activity``); the failover itself against a real
primary and a synchronous hot standby (``testproject.pgserver.start_pair``)
under the load of ``bench/failover.py``: 16 threads, at most 4 connections.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from django.db import InterfaceError, OperationalError

from bench import failover as bench
from django_pooled_backend.failover import is_connection_lost, server_of
from testproject import pgserver

from .conftest import Wrappers, pooled, server_pids

PAIR_DIR = pgserver.DEFAULT_DATA_DIR.parent / "pair-failover"


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def hold_in_transaction(wrapper: Any) -> int:
    """Borrow and keep the connection (an open transaction, in either release mode)."""
    wrapper.ensure_connection()
    wrapper.set_autocommit(False)
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    return int(pid)


def test_one_lost_connection_closes_every_idle_connection_of_the_pool_at_once(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    options = {"min_size": 4, "max_size": 4}
    victim = make_wrapper("drained", options)
    holder = make_wrapper("drained", options)
    pool = victim.pool
    assert pool is not None
    pool.wait(timeout=10)
    name = make_wrapper.application_name("drained")
    before = server_pids(admin, name)
    assert len(before) == 4
    held = hold_in_transaction(holder)
    lost = hold_in_transaction(victim)
    admin.execute("SELECT pg_terminate_backend(%s)", [lost])
    with pytest.raises(OperationalError), victim.cursor() as cursor:
        cursor.execute("SELECT 1")
    (said,) = [r.getMessage() for r in caplog.records if "lost a connection" in r.getMessage()]
    assert said.startswith("Pool 'drained' lost a connection to 127.0.0.1:")
    assert "(primary) (terminating connection due to administrator command)" in said
    # Without another borrow: the two idle connections are closed now, not
    # when each is next borrowed; the lent one stays with its borrower...
    assert wait_until(lambda: server_pids(admin, name) & before == {held}, timeout=2)
    with holder.cursor() as cursor:
        cursor.execute("SELECT 1")
    holder.rollback()
    holder.set_autocommit(True)
    holder.close()
    # ... and is closed when it comes back; the pool opens new ones.
    assert wait_until(lambda: not server_pids(admin, name) & before, timeout=2)
    victim.close()
    victim.ensure_connection()
    with victim.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    assert pid not in before


def test_a_cancelled_statement_does_not_drain_the_pool(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("not_drained", {"min_size": 3, "max_size": 3})
    pool = wrapper.pool
    assert pool is not None
    pool.wait(timeout=10)
    name = make_wrapper.application_name("not_drained")
    before = server_pids(admin, name)
    hold_in_transaction(wrapper)
    with wrapper.cursor() as cursor:
        cursor.execute("SET LOCAL statement_timeout = '10ms'")
        with pytest.raises(OperationalError, match="statement timeout"):
            cursor.execute("SELECT pg_sleep(1)")
    wrapper.rollback()
    wrapper.set_autocommit(True)
    wrapper.close()
    time.sleep(0.2)
    assert server_pids(admin, name) == before


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (psycopg.errors.AdminShutdown("terminating connection"), True),  # 57P01
        (psycopg.errors.CrashShutdown("crash"), True),  # 57P02
        (psycopg.errors.CannotConnectNow("starting up"), True),  # 57P03
        (psycopg.errors.ConnectionFailure("gone"), True),  # 08006
        (psycopg.errors.QueryCanceled("statement timeout"), False),  # 57014
        (psycopg.errors.SerializationFailure("retry"), False),  # 40001
        (psycopg.errors.ReadOnlySqlTransaction("read-only"), False),  # 25006
    ],
)
def test_connection_class_errors_are_the_ones_that_mean_the_server_is_gone(
    error: psycopg.Error, lost: bool
) -> None:
    assert is_connection_lost(error) is lost
    # As Django raises it: its own class, psycopg's error as the cause.
    wrapped = OperationalError(*error.args)
    wrapped.__cause__ = error
    assert is_connection_lost(wrapped) is lost


@pytest.mark.slow
def test_failover_under_load_loses_no_acknowledged_write_and_requests_succeed_again(
    django_db_blocker: Any,
) -> None:
    seen: dict[str, Any] = {}

    def look_at_pool(wrapper: Any) -> None:
        pool = wrapper.pool
        seen["drained_at"] = pool._drained_at
        seen["servers"] = {server_of(conn) for conn in pool.idle_connections()}

    options = pooled({"min_size": 4, "max_size": bench.MAX_SIZE, "timeout": bench.POOL_TIMEOUT})
    with django_db_blocker.unblock():
        result = bench.run_failover(
            "pooled", PAIR_DIR, outage=0.5, after=2.0, pool=options, on_pool=look_at_pool
        )
    # The outage was seen: requests failed, each with a clean OperationalError,
    # within the pool's timeout (no hang, no InterfaceError).
    assert result.failures
    for failed in result.failures:
        assert isinstance(failed.error, OperationalError), repr(failed.error)
        assert not isinstance(failed.error, InterfaceError)
    assert result.longest_failure < bench.POOL_TIMEOUT + 1
    # Every write a request saw committed is on the promoted standby.
    assert result.acknowledged
    assert result.lost == set()
    written_after = [
        r for r in result.results if r.ok and r.write_key and r.started > result.writable_at
    ]
    assert written_after
    # Requests succeed again, every thread's, soon after promotion
    # (bench/failover.py measures how soon; the bound here allows for a busy machine).
    assert result.first_success is not None
    assert result.all_succeed is not None
    assert result.all_succeed < 3.0, result.all_succeed
    # The pool was drained after the crash, and its connections are on the new primary.
    assert seen["drained_at"] >= result.stopped_at
    assert seen["servers"]
    assert {(s.port, s.role) for s in seen["servers"]} == {(result.standby_port, "primary")}
