"""When the server cannot be reached: fail at once, with the server's reason first.

A borrow from a pool that has no working connection, and whose attempts to
open one fail, raises after one attempt (not after the pool's timeout), with
``OperationalError`` whose first line is what the server or libpq said, then
the alias, the pool's state and advice that fits the cause.  A burst of
borrows makes one attempt per back-off period.  Every test here uses a real
server, refusing for real: a wrong password, a database that does not exist,
a port where nothing listens.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from django.core.checks import Warning as CheckWarning
from django.db import OperationalError
from psycopg import sql

from django_pooled_backend import registry
from django_pooled_backend.checks import server_capacity_messages
from django_pooled_backend.errors import ConnectionFailed
from django_pooled_backend.pool import DjangoConnectionPool
from testproject.launch import free_port, wait_for

from .conftest import Wrappers
from .test_liveness import backend_pid

# Long enough that a borrow waiting for it would be plainly the slow path.
OPTIONS = {"min_size": 1, "max_size": 2, "timeout": 30}


def pool_of(alias: str) -> DjangoConnectionPool:
    (pool,) = registry.pools_for_alias(alias)
    return pool


def failure(wrapper: Any) -> OperationalError:
    with pytest.raises(OperationalError) as excinfo:
        wrapper.ensure_connection()
    assert isinstance(excinfo.value.__cause__, ConnectionFailed), excinfo.value
    return excinfo.value


@pytest.mark.parametrize(
    ("settings", "reason", "advice"),
    [
        (
            {"PASSWORD": "not-the-password"},
            'password authentication failed for user "',
            "Check USER and PASSWORD in DATABASES['refused']",
        ),
        (
            {"NAME": "no_such_database"},
            'database "no_such_database" does not exist',
            "Check NAME in DATABASES['refused'], or create the database.",
        ),
        (
            {"PORT": "free"},
            "Connection refused",
            "Check that the server is running and reachable at HOST and PORT",
        ),
    ],
    ids=["wrong-password", "missing-database", "stopped-server"],
)
def test_a_borrow_fails_at_once_with_the_servers_reason_first(
    make_wrapper: Wrappers, settings: dict[str, str], reason: str, advice: str
) -> None:
    if settings.get("PORT") == "free":
        settings = {"PORT": str(free_port())}
    wrapper = make_wrapper("refused", OPTIONS, **settings)
    message = str(failure(wrapper))
    first, *rest = message.splitlines()
    assert first.startswith(reason)
    assert "database alias 'refused'" in first
    assert "no connection became free" not in message  # not the slow path's words
    assert "max_size" not in message or "max_connections" in message
    assert rest[-1].startswith(advice)
    assert "not-the-password" not in message


def test_a_burst_against_a_refusing_server_makes_one_attempt_per_back_off(
    make_wrapper: Wrappers,
) -> None:
    wrapper = make_wrapper("burst", OPTIONS, PASSWORD="not-the-password")
    messages = [str(failure(wrapper)) for _ in range(20)]
    pool = pool_of("burst")
    attempts = pool.get_stats()["connections_errors"]
    # The pool's own first attempt, and the one that the first borrow
    # waited for: the 19 borrows after it did not make one each.
    assert attempts <= 4, attempts
    assert "waits for a new attempt" in messages[-1]
    assert all(m.splitlines()[0].startswith("password authentication failed") for m in messages)


def test_the_pool_connects_as_soon_as_the_database_appears(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    name = "dpb_appears_later"
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    wrapper = make_wrapper("appears", OPTIONS, NAME=name)
    failure(wrapper)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:

        def borrows() -> bool:
            try:
                return backend_pid(wrapper) > 0
            except OperationalError:
                return False

        # Within the back-off (at most 10 seconds between two attempts).
        wait_for(borrows, timeout=30)
        wrapper.close()
    finally:
        registry.close_alias("appears")
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_the_capacity_check_gives_the_servers_reason(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("checked", OPTIONS, PASSWORD="not-the-password")
    (message,) = server_capacity_messages(wrapper)
    assert isinstance(message, CheckWarning)
    assert message.id == "django_pooled_backend.W005"
    assert 'password authentication failed for user "' in message.msg
    assert "no connection became free" not in message.msg


def test_borrows_that_timed_out_are_not_counted_as_waiting(make_wrapper: Wrappers) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 0.3, "max_waiting": 2}
    holder = make_wrapper("ghosts", options)
    holder.ensure_connection()  # the only connection, held
    pool = pool_of("ghosts")
    for _ in range(3):  # more than max_waiting, one after the other
        waiter = make_wrapper("ghosts", options)
        with pytest.raises(OperationalError) as excinfo:
            waiter.ensure_connection()
        message = str(excinfo.value)
        # Each waited its turn and timed out: none was turned away because
        # of those that had timed out before it.
        assert "no connection became free within 0.3 seconds" in message
        assert ", 0 waiting." in message
        assert pool.state()["waiting"] == 0
    holder.close()
