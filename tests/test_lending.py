"""The hand-off lends the connection returned last, to waiting borrowers first.

A connection returned at the end of a request stays in the pool's hand-off
(see handoff.py), where the next borrow finds it without a pass through
psycopg_pool; one left unused goes to psycopg_pool's queue.  These tests
show, against the real server, that this costs no capacity (another
borrower takes a returned connection at once, a waiter gets it before any
newcomer), and keeps every guarantee of a plain return (reset, liveness
check, close with the pool, statistics).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from django_pooled_backend import pool as pool_module
from django_pooled_backend import registry
from testproject.launch import wait_for

from .conftest import Wrappers, only_request_mode, server_pids, timeout_while_held
from .test_pooling import request_cycle


def pool_of(wrapper: Any) -> Any:
    pool = wrapper.pool
    assert pool is not None
    return pool


pytestmark = only_request_mode


def test_the_next_request_gets_the_connection_returned_last(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("parked", {"min_size": 1, "max_size": 3})
    first = request_cycle(wrapper)
    pool = wrapper.pool
    assert pool is not None
    # Back, idle and not lent, in the hand-off.
    assert wrapper.connection is None
    assert pool.state()["lent"] == 0
    assert [c.info.backend_pid for c in pool.handoff.idle()] == [first]
    before = pool.get_stats()
    assert [request_cycle(wrapper) for _ in range(5)] == [first] * 5
    # Every request counted as a borrow, none had to wait.
    after = pool.get_stats()
    assert after["requests_num"] - before["requests_num"] == 5
    assert after.get("requests_queued", 0) == before.get("requests_queued", 0)
    assert server_pids(admin, make_wrapper.application_name("parked")) >= {first}


def test_another_borrower_takes_a_returned_connection_rather_than_open_one(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 2}
    first = make_wrapper("shared", options)
    pid = request_cycle(first)
    other = make_wrapper("shared", options)
    started = time.monotonic()
    # The only connection is back in the hand-off: `other` gets it, without
    # waiting for the housekeeping to give it to psycopg_pool.
    assert request_cycle(other) == pid
    assert time.monotonic() - started < 1.0
    assert request_cycle(first) == pid
    assert server_pids(admin, make_wrapper.application_name("shared")) == {pid}


def test_a_waiting_borrower_gets_the_connection_at_once(make_wrapper: Wrappers) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 10}
    holder = make_wrapper("waited", options)
    with holder.cursor() as cursor:
        cursor.execute("SELECT 1")
    pool = holder.pool
    assert pool is not None
    got: list[Any] = []

    def wait_for_it() -> None:
        waiter = make_wrapper("waited", options)
        got.append(request_cycle(waiter))

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    wait_for(lambda: pool.state()["waiting"] == 1, what="a waiting borrower")
    pid = holder.connection.info.backend_pid
    holder.close()
    thread.join(10)
    # Handed to the waiter.
    assert got == [pid]
    assert pool.handoff.waited == 1


def test_the_housekeeping_gives_psycopg_pool_a_connection_left_unused(
    make_wrapper: Wrappers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "IDLE_SECONDS", 0.2)
    wrapper = make_wrapper("unparked", {"min_size": 1, "max_size": 2})
    request_cycle(wrapper)
    pool = wrapper.pool
    assert pool is not None
    assert pool.handoff.idle_count == 1
    wait_for(lambda: pool.handoff.idle_count == 0, timeout=10)
    # In psycopg_pool's queue now, where max_idle and check() see it.
    assert ConnectionPool.get_stats(pool)["pool_available"] >= 1
    assert pool.handoff.out == 0
    assert len(pool.idle_connections()) == pool.state()["idle"] >= 1
    # The next request borrows from the queue as usual.
    request_cycle(wrapper)


def test_a_returned_connection_is_reset_before_its_next_use(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("dirty", {"min_size": 1, "max_size": 1})
    with wrapper.cursor() as cursor:
        cursor.execute("SET statement_timeout = '42s'")
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    wrapper.close()
    assert pool_of(wrapper).handoff.idle_count == 1
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_setting('statement_timeout')")
        assert cursor.fetchone() == (pid, "0")
    wrapper.close()


def test_a_returned_connection_the_server_closed_is_replaced(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("killed", {"min_size": 1, "max_size": 1})
    pid = request_cycle(wrapper)
    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    app = make_wrapper.application_name("killed")
    wait_for(lambda: pid not in server_pids(admin, app), what=f"backend {pid} to exit")
    # The borrow-time check sees the server's goodbye on the idle connection.
    new_pid = request_cycle(wrapper)
    assert new_pid != pid


def test_closing_the_pool_closes_the_connections_of_the_handoff(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("closing", {"min_size": 1, "max_size": 1})
    request_cycle(wrapper)
    pool = wrapper.pool
    assert pool is not None
    (idle,) = pool.handoff.idle()
    registry.close_alias("closing")
    assert idle.closed
    assert pool.handoff.idle_count == 0
    assert pool.connections() == []
    # The wrapper's next request opens a new pool.
    request_cycle(wrapper)
    assert wrapper.pool is not pool


def test_a_timeout_tells_where_the_holder_of_a_taken_back_connection_is_now(
    make_wrapper: Wrappers,
) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 0.3}

    def hold_in_second_request(holding: threading.Event, release: threading.Event) -> None:
        wrapper = make_wrapper("located", options)
        request_cycle(wrapper)  # a first request...
        with wrapper.cursor() as cursor:  # ...and a second borrow, without a stack walk
            cursor.execute("SELECT 1")
        holding.set()
        release.wait(10)
        wrapper.close()

    error = timeout_while_held(
        hold_in_second_request, make_wrapper("located", options), "second-request"
    )
    message = str(error)
    assert "Held by: second-request (held " in message
    # Where the holding thread is at the time of the timeout: waiting here.
    assert "now at tests/test_lending.py:" in message
    assert " in hold_in_second_request)" in message


def test_check_never_still_finishes_the_reset(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("unchecked", {"min_size": 1, "max_size": 1, "check": "never"})
    other = make_wrapper("unchecked", {"min_size": 1, "max_size": 1, "check": "never"})
    with wrapper.cursor() as cursor:
        cursor.execute("SET search_path = 'nowhere'")
    wrapper.close()
    # Another object takes the returned connection, then the first one again.
    for borrower in (other, wrapper):
        assert request_cycle(borrower, "SELECT current_setting('search_path')") == (
            '"$user", public'
        )
