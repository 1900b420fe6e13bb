"""Test databases are dropped and cloned with pools open on them, of any alias.

PostgreSQL refuses ``DROP DATABASE`` and ``CREATE DATABASE ... TEMPLATE``
while anyone is connected: the pools of the alias, and of other aliases on
the same database (a copy of its settings under another name), are closed
first.  Proven from the server's side: no session on the database remains.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from django_pooled_backend import registry

from .conftest import Wrappers


def sessions_on(admin: psycopg.Connection[Any], dbname: str) -> int:
    (count,) = admin.execute(  # type: ignore[misc]
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [dbname]
    ).fetchone()
    return int(count)


def exists(admin: psycopg.Connection[Any], dbname: str) -> bool:
    row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone()
    return row is not None


@pytest.fixture
def scratch_db(admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A database of its own, dropped (with any clone) at the end whatever happened."""
    name = f"dpb_creation_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        for db in (name, f"{name}_1"):
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )


def used_and_returned(make_wrapper: Wrappers, alias: str, dbname: str) -> Any:
    """A wrapper on ``dbname`` whose pool keeps a connection after its request ended."""
    wrapper = make_wrapper(alias, {"min_size": 1, "max_size": 2}, NAME=dbname)
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
    wrapper.close()
    return wrapper


def test_destroying_a_test_database_closes_every_pool_to_it_first(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any], scratch_db: str
) -> None:
    own = used_and_returned(make_wrapper, "creation_own", scratch_db)
    # Another alias on the same database, as Django's backends tests make.
    other = used_and_returned(make_wrapper, "creation_copy", scratch_db)
    assert sessions_on(admin, scratch_db) >= 2

    own.creation._destroy_test_db(scratch_db, verbosity=0)

    assert not exists(admin, scratch_db)
    assert sessions_on(admin, scratch_db) == 0
    assert registry.pools_for_alias("creation_own") == []
    assert registry.pools_for_alias("creation_copy") == []
    assert other.connection is None


def test_a_pool_to_another_database_stays_open(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any], scratch_db: str
) -> None:
    own = used_and_returned(make_wrapper, "creation_own", scratch_db)
    elsewhere = make_wrapper("creation_elsewhere", {"min_size": 1, "max_size": 2})
    with elsewhere.cursor() as cursor:
        cursor.execute("SELECT 1")
    elsewhere.close()
    pool = elsewhere.pool

    own.creation._destroy_test_db(scratch_db, verbosity=0)

    assert registry.pools_for_alias("creation_elsewhere") == [pool]
    assert not pool.closed


def test_cloning_a_test_database_closes_every_pool_to_its_template_first(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any], scratch_db: str
) -> None:
    own = used_and_returned(make_wrapper, "creation_own", scratch_db)
    used_and_returned(make_wrapper, "creation_copy", scratch_db)

    own.creation._clone_test_db("1", verbosity=0)

    assert exists(admin, f"{scratch_db}_1")
    assert registry.pools_for_alias("creation_copy") == []
