"""The next borrower of a server connection sees nothing of the previous one.

Every case runs twice: on this backend, and on Django's own pool
(``OPTIONS["pool"]`` of the stock backend), where the cases it fails are
marked ``xfail(strict=True)``: they prove the test would catch the leak.
Both pools have one connection, so the next borrower gets the same server
connection; the test checks that with ``pg_backend_pid()``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from django.db import connection
from django.db.backends.postgresql.base import DatabaseWrapper as DjangoWrapper

from django_pooled_backend import registry
from django_pooled_backend.base import DatabaseWrapper

from .conftest import only_request_mode, pooled

ROLE = "dpb_tenant"


@dataclass
class Leak:
    """Something a borrower does, and how the next borrower would notice it."""

    do: list[str]
    probe: str
    clean: Any
    django_leaks: bool = True


LEAKS: dict[str, Leak] = {
    "set": Leak(["SET statement_timeout = 1234"], "SHOW statement_timeout", "0"),
    "set_search_path": Leak(
        ["SET search_path TO pg_catalog"], "SHOW search_path", '"$user", public'
    ),
    "set_config_tenant": Leak(
        ["SELECT set_config('app.tenant_id', '42', false)"],
        "SELECT coalesce(current_setting('app.tenant_id', true), '')",
        "",
    ),
    "set_local_in_open_transaction": Leak(
        ["BEGIN", "SET LOCAL statement_timeout = 77", "SELECT set_config('app.x', '1', true)"],
        "SHOW statement_timeout",
        "0",
        django_leaks=False,  # psycopg_pool rolls back an open transaction
    ),
    "set_role": Leak([f"SET ROLE {ROLE}"], "SELECT current_user::text", "postgres"),
    "session_authorization": Leak(
        [f"SET SESSION AUTHORIZATION {ROLE}"], "SELECT session_user::text", "postgres"
    ),
    "time_zone": Leak(["SET TIME ZONE 'Asia/Kolkata'"], "SHOW TimeZone", "UTC"),
    "prepared_statement": Leak(
        ["PREPARE dpb_leak AS SELECT 1"], "SELECT count(*) FROM pg_prepared_statements", 0
    ),
    "temp_table": Leak(
        ["CREATE TEMP TABLE dpb_leak (x int)"],
        "SELECT to_regclass('pg_temp.dpb_leak') IS NULL",
        True,
    ),
    "advisory_lock": Leak(
        ["SELECT pg_advisory_lock(4242)"],
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        0,
    ),
    "listen": Leak(["LISTEN dpb_leak"], "SELECT count(*) FROM pg_listening_channels()", 0),
    "with_hold_cursor": Leak(
        ["DECLARE dpb_leak CURSOR WITH HOLD FOR SELECT 1"], "SELECT count(*) FROM pg_cursors", 0
    ),
    "open_transaction": Leak(
        ["BEGIN", "CREATE TEMP TABLE dpb_tx (x int)"],
        "SELECT to_regclass('pg_temp.dpb_tx') IS NULL",
        True,
        django_leaks=False,
    ),
    "failed_transaction": Leak(
        ["BEGIN", "SELECT 1/0"], "SELECT 'usable'", "usable", django_leaks=False
    ),
}


Factory = Callable[[], Any]


@pytest.fixture
def role(admin: psycopg.Connection[Any]) -> str:
    admin.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') "
        f"THEN CREATE ROLE {ROLE} NOLOGIN; END IF; END $$"
    )
    return ROLE


def _settings(alias: str, pool: dict[str, Any]) -> dict[str, Any]:
    settings_dict = copy.deepcopy(connection.settings_dict)
    settings_dict["OPTIONS"] = {
        k: v for k, v in settings_dict["OPTIONS"].items() if k not in ("pool",)
    }
    settings_dict["OPTIONS"]["pool"] = pool
    return settings_dict


@pytest.fixture
def backend(request: pytest.FixtureRequest, transactional_db: None) -> Iterator[Factory]:
    """A factory of connection objects of one backend, all sharing one pool of size 1."""
    alias = f"isolation_{request.param.replace('-', '_')}"
    made: list[Any] = []
    wrapper_class = DjangoWrapper if request.param == "django" else DatabaseWrapper
    pool: Any = {"min_size": 1, "max_size": 1, "timeout": 10}
    if request.param == "pooled-auto":
        pool = {**pool, "reset": "auto"}  # only as good as the statement judge
    if request.param != "django":
        pool = pooled(pool)

    def make() -> Any:
        wrapper = wrapper_class(_settings(alias, pool), alias)
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        if wrapper.connection is not None:
            wrapper.close()
    if request.param != "django":
        registry.close_alias(alias)
    else:
        made[0].close_pool()


def _run(wrapper: Any, statements: list[str]) -> None:
    with wrapper.cursor() as cursor:
        for statement in statements:
            try:
                cursor.execute(statement)
            except Exception:
                if statement != "SELECT 1/0":
                    raise


def _probe(wrapper: Any, sql: str) -> tuple[int, Any]:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
        cursor.execute(sql)
        (value,) = cursor.fetchone()
    return pid, value


def _cases() -> list[Any]:
    cases = []
    for name, leak in LEAKS.items():
        cases.append(pytest.param(name, "pooled", id=f"{name}-pooled"))
        cases.append(pytest.param(name, "pooled-auto", id=f"{name}-pooled-auto"))
        marks = (
            [pytest.mark.xfail(strict=True, reason="Django's pool leaks this to the next borrower")]
            if leak.django_leaks
            else []
        )
        cases.append(pytest.param(name, "django", id=f"{name}-django", marks=marks))
    return cases


@pytest.mark.parametrize(("leak_name", "backend"), _cases(), indirect=["backend"])
def test_session_state_does_not_leak_to_next_borrower(
    leak_name: str, backend: Factory, role: str
) -> None:
    leak = LEAKS[leak_name]
    first = backend()
    with first.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    _run(first, leak.do)
    first.close()

    second = backend()
    next_pid, value = _probe(second, leak.probe)
    second.close()
    assert next_pid == pid, "the pool of size 1 lent another server connection"
    assert value == leak.clean


def test_orm_borrowers_on_the_default_alias_do_not_inherit_tenant_settings(
    transactional_db: None,
) -> None:
    from testproject.shop.models import Item

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), set_config('app.tenant_id', 'acme', false)")
        (pid, _) = cursor.fetchone()
    Item.objects.create(name="tenant row")
    connection.close()
    pool = connection.pool
    assert pool is not None
    # FIFO: within max_size borrows the same server connection comes back.
    seen = []
    for _ in range(pool.max_size + 1):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_backend_pid(), coalesce(current_setting('app.tenant_id', true), '')"
            )
            seen.append(cursor.fetchone())
        assert Item.objects.count() == 1
        connection.close()
    tenant_settings = {tenant for p, tenant in seen if p == pid}
    assert tenant_settings == {""}


@only_request_mode
def test_a_connection_whose_reset_fails_is_discarded_not_reused(
    make_wrapper: Any, admin: psycopg.Connection[Any]
) -> None:
    admin.execute("DROP ROLE IF EXISTS dpb_doomed")
    admin.execute("CREATE ROLE dpb_doomed NOLOGIN")
    try:
        options = {"min_size": 1, "max_size": 1, "timeout": 5}
        wrapper = make_wrapper("doomed", options, OPTIONS={"assume_role": "dpb_doomed"})
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), current_user::text")
            pid, user = cursor.fetchone()
            cursor.execute("SET statement_timeout = 1000")  # a session to reset
        assert user == "dpb_doomed"
        wrapper.ensure_connection()  # lent until close(), in both release modes
        # The reset ends with SET ROLE dpb_doomed: make it fail.
        admin.execute("DROP ROLE dpb_doomed")
        wrapper.close()
        # The reset is in flight: let the server fail it before the role
        # exists again (pg_stat_activity shows the last query and its state).
        for _ in range(200):
            row = admin.execute(
                "SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid]
            ).fetchone()
            if (
                row is not None
                and row[0] == "idle"
                and row[1].startswith(("DISCARD ALL", "CLOSE ALL"))
            ):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the reset never ran: {row}")
        admin.execute("CREATE ROLE dpb_doomed NOLOGIN")
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), current_user::text")
            new_pid, new_user = cursor.fetchone()
        wrapper.close()
    finally:
        registry.close_alias("doomed")
        admin.execute("DROP ROLE IF EXISTS dpb_doomed")
    assert new_pid != pid
    assert new_user == "dpb_doomed"
    still_there = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]
    ).fetchone()
    assert still_there == (0,)


def test_prepared_statements_of_psycopg_survive_the_reset(make_wrapper: Any) -> None:
    # With prepare_threshold=0 psycopg prepares every query; the reset's
    # DEALLOCATE ALL drops them, and psycopg must not try to reuse them.
    wrapper = make_wrapper(
        "prepared",
        {"min_size": 1, "max_size": 1},
        OPTIONS={"prepare_threshold": 0, "server_side_binding": True},
    )
    results = []
    for _ in range(3):
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT %s::int + 1", [1])
            results.append(cursor.fetchone()[0])
            cursor.execute("SELECT count(*) FROM pg_prepared_statements")
            prepared = cursor.fetchone()[0]
        wrapper.close()
    assert results == [2, 2, 2]
    assert prepared >= 1
