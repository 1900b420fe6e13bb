"""The private details this backend relies on: a test fails the day they change.

Django, psycopg and psycopg_pool are used through their public APIs except
where listed here.

``DatabaseWrapper._reconnect()`` is the short path of ``connect()`` for a
Django connection object that connected in full before: it does what
Django's ``BaseDatabaseWrapper.connect()`` does on every call, less what a
pooled connection needs no more.  These tests read Django's ``connect()``
as installed (its bytecode, not its text, so that comments and formatting
do not matter) and fail when it sets an attribute or calls a method that the
short path does not account for.
"""

from __future__ import annotations

import dis
import inspect
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool
import pytest
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLWrapper
from psycopg_pool.pool import WaitingClient

from django_pooled_backend import registry
from django_pooled_backend.base import DatabaseWrapper

from .conftest import Wrappers

# What Django's connect() calls, and what the short path does instead.
CALLS_ACCOUNTED_FOR = {
    "check_settings": "checked by the first full connect(); the pool key is compared",
    "get_connection_params": "the pool keeps them; the pool key is compared",
    "get_new_connection": "replaced by the pool's unpark() or borrow()",
    "set_autocommit": "the pool lends every connection in autocommit (AUTOCOMMIT is on)",
    "init_connection_state": "the pool restores time zone and role on every reset",
    "send": "connection_created is sent, as Django sends it",
    "settings_dict": "read",
    "monotonic": "close_at is computed the same way",
    "__class__": "the signal's sender",
}


def stored_attributes(function: Callable[..., Any]) -> set[str]:
    return {
        ins.argval
        for ins in dis.get_instructions(inspect.unwrap(function))
        if ins.opname == "STORE_ATTR"
    }


def loaded_names(function: Callable[..., Any]) -> set[str]:
    return {
        ins.argval
        for ins in dis.get_instructions(inspect.unwrap(function))
        if ins.opname in ("LOAD_ATTR", "LOAD_METHOD")
    }


def test_djangos_postgresql_backend_uses_the_base_connect() -> None:
    # Were it to override connect(), the short path would have to follow it.
    assert "connect" not in PostgreSQLWrapper.__dict__


def test_the_short_path_sets_every_attribute_djangos_connect_sets() -> None:
    missing = stored_attributes(BaseDatabaseWrapper.connect) - stored_attributes(
        DatabaseWrapper._reconnect
    )
    assert missing == set(), (
        f"Django's connect() now sets {sorted(missing)}: make DatabaseWrapper._reconnect() "
        "set them too, as connect() does"
    )


def test_djangos_connect_calls_nothing_the_short_path_does_not_account_for() -> None:
    new = loaded_names(BaseDatabaseWrapper.connect) - set(CALLS_ACCOUNTED_FOR)
    assert new == set(), (
        f"Django's connect() now uses {sorted(new)}: decide what DatabaseWrapper._reconnect() "
        "must do about it, and list it in CALLS_ACCOUNTED_FOR"
    )


# -- psycopg_pool and psycopg ------------------------------------------------------

# ConnectionPool methods overridden by DjangoConnectionPool, with the
# parameters it expects them to have.
OVERRIDDEN = {
    "_get_ready_connection": ["self", "timeout"],
    "_connect": ["self", "timeout"],
    "_reset_connection": ["self", "conn"],
    "check_connection": ["conn"],
}
# ConnectionPool methods called, with their parameters.
CALLED = {"_putconn": ["self", "conn", "from_getconn"], "_close_connection": ["self", "conn"]}
# ConnectionPool instance attributes read or changed, and their types.
ATTRIBUTES = {
    "_pool": "deque",
    "_waiting": "deque",
    "_closed": "bool",
    "_nconns": "int",
    "_stats": "Counter",
}


@pytest.mark.parametrize("name", sorted({**OVERRIDDEN, **CALLED}))
def test_psycopg_pool_methods_the_pool_overrides_or_calls(name: str) -> None:
    method = getattr(psycopg_pool.ConnectionPool, name)
    parameters = list(inspect.signature(method).parameters)
    assert parameters == {**OVERRIDDEN, **CALLED}[name]


def test_psycopg_pool_attributes_the_pool_reads(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("contract", {"min_size": 1, "max_size": 1})
    wrapper.ensure_connection()
    (pool,) = registry.pools_for_alias("contract")
    for name, kind in ATTRIBUTES.items():
        assert type(getattr(pool, name)).__name__ == kind, name
    # Taken around the queue; reentrant or not (it is not before 3.3), so
    # never taken twice by one thread.
    assert hasattr(pool._lock, "__enter__")
    assert hasattr(pool._lock, "__exit__")
    assert isinstance(psycopg_pool.ConnectionPool._REQUESTS_NUM, str)
    assert pool._REQUESTS_NUM in pool.get_stats()
    conn = wrapper.connection
    # Set by psycopg_pool on every connection it opens (max_lifetime); read
    # with a default, as _created_at and the pool's _drained_at (3.3 and later).
    assert isinstance(conn._expire_at, float)
    # psycopg: the lock every operation of a connection takes (revoke() and
    # the reclaim take it not to close a socket under a running query), and
    # the prepared statements it remembers (forgotten after DEALLOCATE ALL).
    assert hasattr(conn.lock, "acquire")
    assert hasattr(conn.lock, "release")
    prepared = conn._prepared
    for name in ("_names", "_counts", "_to_flush", "clear"):
        assert hasattr(prepared, name), name
    with conn.cursor() as cursor:
        assert cursor._conn is conn  # how the cursor classes reach their connection
    wrapper.close()


def test_psycopg_pool_waiters_can_be_failed_and_read() -> None:
    waiter: WaitingClient[psycopg.Connection[Any]] = WaitingClient()
    assert waiter.conn is None
    assert waiter.error is None
    error = psycopg.OperationalError("down")
    assert waiter.fail(error) is True
    assert waiter.error is error
    assert waiter.fail(error) is False  # already failed: not accepted twice
