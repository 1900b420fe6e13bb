"""The drop-in ENGINE: borrow on connect, return on close, proven from the server's side."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import psycopg
import psycopg_pool
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished, request_started
from django.db import OperationalError, connection, connections

from django_pooled_backend import registry, reset
from testproject.launch import wait_for

from .conftest import Wrappers, only_request_mode, server_pids, timeout_while_held


def request_cycle(wrapper: Any, sql: str = "SELECT pg_backend_pid()") -> Any:
    """What one Django request does with a connection: query, then close at the end."""
    with wrapper.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    wrapper.close()
    return row[0] if row else None


def test_successive_requests_reuse_one_server_connection(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("reuse", {"min_size": 1, "max_size": 1})
    pids = [request_cycle(wrapper) for _ in range(5)]
    assert len(set(pids)) == 1
    # The server connection outlived every close(): it went back to the pool.
    assert server_pids(admin, make_wrapper.application_name("reuse")) == set(pids)


@only_request_mode
def test_request_signals_return_the_connection_to_the_pool(transactional_db: None) -> None:
    request_started.send(sender=None)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    assert connection.connection is not None
    pool = connection.pool
    assert pool is not None
    assert pool.state()["lent"] == 1
    request_finished.send(sender=None)
    assert connection.connection is None
    assert pool.state()["lent"] == 0


def test_close_all_returns_connections(transactional_db: None) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    connection.ensure_connection()  # held until close(), in both release modes
    pool = connection.pool
    assert pool is not None
    assert pool.state()["lent"] == 1
    connections.close_all()
    assert pool.state()["lent"] == 0


def test_server_connections_never_exceed_max_size_with_4x_threads(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    max_size, threads, rounds = 4, 16, 5
    app = make_wrapper.application_name("bounded")
    errors: list[BaseException] = []
    done = threading.Event()
    peak = 0

    def sample() -> None:
        nonlocal peak
        with psycopg.connect(admin.info.dsn, password=admin.info.password, autocommit=True) as c:
            while not done.is_set():
                (count,) = c.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app]
                ).fetchone()  # type: ignore[misc]
                peak = max(peak, count)
                time.sleep(0.005)

    def work() -> None:
        # One DatabaseWrapper per thread, as Django's connection handler does.
        wrapper = make_wrapper("bounded", {"min_size": 1, "max_size": max_size, "timeout": 30})
        try:
            for _ in range(rounds):
                request_cycle(wrapper, "SELECT pg_sleep(0.02)")
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=work, name=f"worker-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    done.set()
    sampler.join(10)
    assert errors == []
    assert 1 <= peak <= max_size
    (pool,) = registry.pools_for_alias("bounded")
    assert pool.state()["size"] <= max_size
    assert pool.get_stats()["requests_num"] >= threads * rounds


def test_exhausted_pool_raises_operational_error_with_alias_state_and_holder(
    make_wrapper: Wrappers,
) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 0.3}

    def hold(holding: threading.Event, release: threading.Event) -> None:
        wrapper = make_wrapper("tight", options)
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
        wrapper.ensure_connection()  # held until close(), in both release modes
        holding.set()
        release.wait(10)
        wrapper.close()

    error = timeout_while_held(hold, make_wrapper("tight", options), "slow-holder")
    message = str(error)
    assert "database alias 'tight'" in message
    assert "no connection became free within 0.3 seconds" in message
    assert "size 1 of max 1, 1 lent out, 0 idle" in message
    assert "Held by: slow-holder (held " in message
    assert "test_pooling.py:" in message  # where the holder borrowed it
    assert "Raise OPTIONS['pool']['max_size']" in message
    assert isinstance(error.__cause__, psycopg_pool.PoolTimeout)
    password = connection.settings_dict["PASSWORD"]
    assert password
    assert password not in message


def test_max_waiting_turns_excess_waiters_away_at_once(make_wrapper: Wrappers) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 5, "max_waiting": 1}
    holding = threading.Event()
    release = threading.Event()
    waiter_started = threading.Event()
    outcomes: list[str] = []

    def hold() -> None:
        wrapper = make_wrapper("waiting", options)
        wrapper.ensure_connection()
        holding.set()
        release.wait(10)
        wrapper.close()

    def wait() -> None:
        wrapper = make_wrapper("waiting", options)
        waiter_started.set()
        wrapper.ensure_connection()
        outcomes.append("served")
        wrapper.close()

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    assert holding.wait(10)
    threads.append(threading.Thread(target=wait))
    threads[1].start()
    assert waiter_started.wait(10)
    (pool,) = registry.pools_for_alias("waiting")
    wait_for(lambda: pool.state()["waiting"] >= 1, what="a waiting borrower")
    wrapper = make_wrapper("waiting", options)
    started = time.monotonic()
    with pytest.raises(OperationalError) as excinfo:
        wrapper.ensure_connection()
    elapsed = time.monotonic() - started
    release.set()
    for t in threads:
        t.join(10)
    assert "1 requests are already waiting (max_waiting=1)" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, psycopg_pool.TooManyRequests)
    # Turned away without waiting for the 5 second timeout.
    assert elapsed < 4
    assert outcomes == ["served"]


def test_each_alias_gets_its_own_pool(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    primary = make_wrapper("primary", {"min_size": 1, "max_size": 2})
    replica = make_wrapper("replica", {"min_size": 1, "max_size": 2})
    primary.ensure_connection()
    replica.ensure_connection()
    assert primary.pool is not replica.pool
    assert primary.connection.info.backend_pid != replica.connection.info.backend_pid
    assert server_pids(admin, make_wrapper.application_name("primary"))
    assert server_pids(admin, make_wrapper.application_name("replica"))


def test_conn_max_age_is_refused_with_a_fix(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("aged", True, CONN_MAX_AGE=60)
    with pytest.raises(ImproperlyConfigured) as excinfo:
        wrapper.ensure_connection()
    message = str(excinfo.value)
    assert "DATABASES['aged']['CONN_MAX_AGE'] is 60" in message
    assert "Set CONN_MAX_AGE to 0" in message


def test_pool_property_refuses_persistent_connections_before_making_a_pool(
    make_wrapper: Wrappers,
) -> None:
    # As Django's pool property does (Django's own backends tests rely on it):
    # a pool made here would stay open, on the test database, for good.
    wrapper = make_wrapper("aged_pool", True, CONN_MAX_AGE=10)
    with pytest.raises(ImproperlyConfigured) as excinfo:
        wrapper.pool  # noqa: B018
    message = str(excinfo.value)
    # Django's own sentence first: its tests look for it.
    assert message.startswith("Pooling doesn't support persistent connections. ")
    assert "DATABASES['aged_pool']['CONN_MAX_AGE'] is 10" in message
    assert registry.pools_for_alias("aged_pool") == []


def test_connect_while_connected_gives_the_previous_connection_back(
    make_wrapper: Wrappers,
) -> None:
    wrapper = make_wrapper("reconnected", {"min_size": 1, "max_size": 2})
    wrapper.ensure_connection()
    pool = wrapper.pool
    assert pool is not None
    # Django's connect() replaces the connection without closing it.
    wrapper.connect()
    wrapper.connect()
    assert len(pool.holders) == 1
    wrapper.close()
    assert pool.holders == {}


def test_pool_false_uses_plain_connections(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("unpooled", False)
    pid = request_cycle(wrapper)
    assert wrapper.pool is None
    assert registry.pools_for_alias("unpooled") == []
    # Closed for real: the server process goes away (a moment after close()).
    app = make_wrapper.application_name("unpooled")
    wait_for(lambda: pid not in server_pids(admin, app), what=f"backend {pid} to exit")


def test_bad_pool_option_fails_on_connect_with_improperly_configured(
    make_wrapper: Wrappers,
) -> None:
    wrapper = make_wrapper("typo", {"max_sise": 3})
    with pytest.raises(ImproperlyConfigured, match=r"unknown key 'max_sise'.*Did you mean"):
        wrapper.ensure_connection()


def test_assume_role_is_applied_to_every_borrower_without_deadlock(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    admin.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dpb_app') "
        "THEN CREATE ROLE dpb_app NOLOGIN; END IF; END $$"
    )
    results: list[str] = []

    def borrow_twice() -> None:
        wrapper = make_wrapper(
            "role", {"min_size": 1, "max_size": 1}, OPTIONS={"assume_role": "dpb_app"}
        )
        results.append(request_cycle(wrapper, "SELECT current_user"))
        # A borrower that switches role does not hand it on.
        with wrapper.cursor() as cursor:
            cursor.execute("RESET ROLE")
        wrapper.close()
        results.append(request_cycle(wrapper, "SELECT current_user"))

    # Django's own pool deadlocks here; a thread lets the test fail instead.
    thread = threading.Thread(target=borrow_twice)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "borrowing with assume_role deadlocked"
    assert results == ["dpb_app", "dpb_app"]


def test_time_zone_setting_is_the_session_time_zone_of_every_borrower(
    make_wrapper: Wrappers, settings: Any
) -> None:
    wrapper = make_wrapper("tz", {"min_size": 1, "max_size": 1}, TIME_ZONE="Asia/Tokyo")
    assert request_cycle(wrapper, "SELECT current_setting('TimeZone')") == "Asia/Tokyo"
    with wrapper.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'America/Lima'")
    wrapper.close()
    assert request_cycle(wrapper, "SELECT current_setting('TimeZone')") == "Asia/Tokyo"


def test_isolation_level_option_applies_to_transactions(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper(
        "iso",
        {"min_size": 1, "max_size": 1},
        OPTIONS={"isolation_level": psycopg.IsolationLevel.SERIALIZABLE},
    )
    wrapper.set_autocommit(False)
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT current_setting('transaction_isolation')")
        (level,) = cursor.fetchone()
    wrapper.rollback()
    wrapper.set_autocommit(True)
    wrapper.close()
    assert level == "serializable"


def test_bad_isolation_level_is_improperly_configured(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("badiso", True, OPTIONS={"isolation_level": 42})
    with pytest.raises(ImproperlyConfigured, match=r"\['isolation_level'\] is 42"):
        wrapper.ensure_connection()


def test_autocommit_false_borrower_work_is_rolled_back_on_return(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("manual", {"min_size": 1, "max_size": 1}, AUTOCOMMIT=False)
    with wrapper.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS dpb_manual (x int)")
    wrapper.commit()
    with wrapper.cursor() as cursor:
        cursor.execute("INSERT INTO dpb_manual VALUES (1)")
    assert not wrapper.get_autocommit()
    wrapper.close()  # never committed
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM dpb_manual")
        (count,) = cursor.fetchone()
    wrapper.rollback()
    with wrapper.cursor() as cursor:
        cursor.execute("DROP TABLE dpb_manual")
    wrapper.commit()
    wrapper.close()
    assert count == 0


def test_libpq_options_are_session_defaults_that_survive_reset(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper(
        "libpq",
        {"min_size": 1, "max_size": 1},
        OPTIONS={"options": "-c statement_timeout=4321", "connect_timeout": 5},
    )
    assert request_cycle(wrapper, "SELECT current_setting('statement_timeout')") == "4321ms"
    with wrapper.cursor() as cursor:
        cursor.execute("SET statement_timeout = 5")
    wrapper.close()
    assert request_cycle(wrapper, "SELECT current_setting('statement_timeout')") == "4321ms"


def test_server_side_binding_option_selects_server_binding_cursors(
    make_wrapper: Wrappers,
) -> None:
    from django.db.backends.postgresql.base import ServerBindingCursor

    wrapper = make_wrapper(
        "ssb", {"min_size": 1, "max_size": 1}, OPTIONS={"server_side_binding": True}
    )
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT %s::int + 1", [41])
        (answer,) = cursor.fetchone()
        assert isinstance(cursor.cursor, ServerBindingCursor)
    wrapper.close()
    assert answer == 42


def test_conn_health_checks_makes_every_borrow_a_round_trip_check(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper(
        "healthy", {"min_size": 1, "max_size": 1, "check_after": 3600}, CONN_HEALTH_CHECKS=True
    )
    assert wrapper.pool_options is not None
    assert wrapper.pool_options.check == "always"
    pid = request_cycle(wrapper)
    wrapper.ensure_connection()
    # The borrow ran the empty query of the check, though check_after is an hour.
    row = admin.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    wrapper.close()
    assert row == ("",)


@only_request_mode
def test_the_connection_given_back_last_is_lent_first(make_wrapper: Wrappers) -> None:
    first = make_wrapper("lifo", {"min_size": 2, "max_size": 2})
    second = make_wrapper("lifo", {"min_size": 2, "max_size": 2})
    with first.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid_first,) = cursor.fetchone()
    with second.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid_second,) = cursor.fetchone()
    assert pid_first != pid_second
    first.close()
    second.close()
    # Both are back in the hand-off (see test_lending.py), their resets
    # answered (a borrow passes over one whose reset is not, see
    # test_a_connection_whose_reset_is_not_answered_gives_way); a third
    # borrower gets the one given back last: the most recently used server
    # connection serves the next requests (warm, like a persistent
    # connection), and the other one stays idle.
    pool = first.pool
    assert pool is not None
    third = make_wrapper("lifo", {"min_size": 2, "max_size": 2})
    served = []
    for _ in range(3):
        wait_for(lambda: all(reset.answered(c) for c in pool.handoff.idle()), what="resets")
        served.append(request_cycle(third))
    assert served == [pid_second] * 3


@only_request_mode
def test_a_connection_whose_reset_is_not_answered_gives_way(make_wrapper: Wrappers) -> None:
    options = {"min_size": 2, "max_size": 2}
    first, second = make_wrapper("giveway", options), make_wrapper("giveway", options)
    pid_first = backend_pid_of(first)
    pid_second = backend_pid_of(second)
    first.close()
    pool = first.pool
    assert pool is not None
    wait_for(lambda: all(reset.answered(c) for c in pool.handoff.idle()), what="the reset")
    # The server process of `second` stopped: its reset, sent when it comes
    # back, cannot be answered.
    os.kill(pid_second, signal.SIGSTOP)
    try:
        second.close()
        assert [c.info.backend_pid for c in pool.handoff.idle()] == [pid_first, pid_second]
        # The one given back last is on top, but not ready: the one below serves.
        assert request_cycle(make_wrapper("giveway", options)) == pid_first
    finally:
        os.kill(pid_second, signal.SIGCONT)
    assert request_cycle(make_wrapper("giveway", options)) in {pid_first, pid_second}


def backend_pid_of(wrapper: Any) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    return int(pid)
