"""Request-scoped release keeps a returned connection for its borrower, but never from others.

A Django connection object that gave its server connection back at the end
of a request most often asks again at its next one: the pool parks the
connection for it (see ``DjangoConnectionPool.park()``).  These tests show,
against the real server, that parking costs no capacity (another borrower
takes a parked connection at once, a waiter gets it, the housekeeping puts
it back in the queue), and keeps every guarantee of a plain return (reset,
liveness check, close with the pool, statistics).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from django_pooled_backend import pool as pool_module
from django_pooled_backend import registry
from testproject.launch import wait_for

from .conftest import Wrappers, only_request_mode, server_pids, timeout_while_held
from .test_pooling import request_cycle

pytestmark = only_request_mode


def test_the_next_request_takes_back_its_own_connection(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("parked", {"min_size": 1, "max_size": 3})
    first = request_cycle(wrapper)
    pool = wrapper.pool
    assert pool is not None
    # Back, idle and not lent, but kept for this Django connection object.
    assert wrapper.connection is None
    assert pool.state()["lent"] == 0
    assert [c.info.backend_pid for c in pool.parked.values()] == [first]
    before = pool.get_stats()
    assert [request_cycle(wrapper) for _ in range(5)] == [first] * 5
    # Every request counted as a borrow, none had to wait.
    after = pool.get_stats()
    assert after["requests_num"] - before["requests_num"] == 5
    assert after.get("requests_queued", 0) == before.get("requests_queued", 0)
    assert server_pids(admin, make_wrapper.application_name("parked")) >= {first}


def test_another_borrower_takes_a_parked_connection_rather_than_open_one(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 2}
    first = make_wrapper("shared", options)
    pid = request_cycle(first)
    other = make_wrapper("shared", options)
    started = time.monotonic()
    # The only connection is parked for `first`: `other` gets it, without
    # waiting for the housekeeping to put it back in the queue.
    assert request_cycle(other) == pid
    assert time.monotonic() - started < 1.0
    # And `first`, finding its connection gone, borrows like anyone else.
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
    # Handed to the waiter, not parked for the holder.
    assert holder._parked is None
    thread.join(10)
    assert got == [pid]


def test_the_housekeeping_puts_a_long_parked_connection_back_in_the_queue(
    make_wrapper: Wrappers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "PARK_SECONDS", 0.2)
    wrapper = make_wrapper("unparked", {"min_size": 1, "max_size": 2})
    request_cycle(wrapper)
    pool = wrapper.pool
    assert pool is not None
    assert len(pool.parked) == 1
    wait_for(lambda: not pool.parked, what="the parked connection to go back")
    assert len(pool.idle_connections()) == pool.state()["idle"] >= 1
    # The next request borrows from the queue as usual.
    request_cycle(wrapper)


def test_a_parked_connection_is_reset_before_its_next_use(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("dirty", {"min_size": 1, "max_size": 1})
    with wrapper.cursor() as cursor:
        cursor.execute("SET statement_timeout = '42s'")
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    wrapper.close()
    assert wrapper._parked is not None
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_setting('statement_timeout')")
        assert cursor.fetchone() == (pid, "0")
    wrapper.close()


def test_a_parked_connection_the_server_closed_is_replaced(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("killed", {"min_size": 1, "max_size": 1})
    pid = request_cycle(wrapper)
    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    app = make_wrapper.application_name("killed")
    wait_for(lambda: pid not in server_pids(admin, app), what=f"backend {pid} to exit")
    # The borrow-time check sees the server's goodbye on the parked connection.
    new_pid = request_cycle(wrapper)
    assert new_pid != pid


def test_closing_the_pool_closes_parked_connections(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("closing", {"min_size": 1, "max_size": 1})
    request_cycle(wrapper)
    pool = wrapper.pool
    assert pool is not None
    (parked,) = pool.parked.values()
    registry.close_alias("closing")
    assert parked.closed
    assert not pool.parked
    # The wrapper's next request opens a new pool.
    request_cycle(wrapper)
    assert wrapper.pool is not pool


def test_a_timeout_tells_where_the_holder_of_a_taken_back_connection_is_now(
    make_wrapper: Wrappers,
) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 0.3}

    def hold_in_second_request(holding: threading.Event, release: threading.Event) -> None:
        wrapper = make_wrapper("located", options)
        request_cycle(wrapper)  # the connection is parked for this object...
        with wrapper.cursor() as cursor:  # ...and taken back here, without a stack walk
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
    assert "now at tests/test_parking.py:" in message
    assert " in hold_in_second_request)" in message


def test_check_never_still_finishes_the_reset(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("unchecked", {"min_size": 1, "max_size": 1, "check": "never"})
    other = make_wrapper("unchecked", {"min_size": 1, "max_size": 1, "check": "never"})
    with wrapper.cursor() as cursor:
        cursor.execute("SET search_path = 'nowhere'")
    wrapper.close()
    # Another object takes the parked connection over, then the same one.
    for borrower in (other, wrapper):
        assert request_cycle(borrower, "SELECT current_setting('search_path')") == (
            '"$user", public'
        )
