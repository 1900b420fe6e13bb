"""The "auto" reset: which statements may dirty a session, judged against the real server."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from django_pooled_backend.session import StatementJudge

from .conftest import Wrappers, admin_dsn
from .test_liveness import wait_until


@pytest.fixture(scope="module")
def judge() -> StatementJudge:
    judge = StatementJudge()
    with psycopg.connect(admin_dsn()) as conn:
        judge.learn(conn)
    return judge


@pytest.mark.parametrize(
    "sql",
    [
        'SELECT "shop_item"."id", "shop_item"."name" FROM "shop_item" WHERE "shop_item"."id" = %s '
        "LIMIT 21",
        'SELECT COUNT(*) AS "__count" FROM "shop_item"',
        'SELECT COALESCE(SUM("shop_item"."quantity"), 0) FROM "shop_item" WHERE UPPER("name") '
        "LIKE UPPER(%s)",
        'SELECT (1) AS "a" FROM "shop_item" WHERE EXISTS(SELECT 1 FROM "shop_order" U0) LIMIT 1',
        'INSERT INTO "shop_item" ("name", "quantity", "created") VALUES (%s, %s, %s) '
        'RETURNING "shop_item"."id"',
        'INSERT INTO "public"."shop_item" ("name") VALUES (%s) ON CONFLICT("name") DO NOTHING',
        'UPDATE "shop_item" SET "quantity" = ("shop_item"."quantity" + %s) WHERE "id" IN (%s, %s)',
        'DELETE FROM "shop_order" WHERE "shop_order"."item_id" IN (%s)',
        "SELECT CAST(%s AS numeric(10, 2)), now(), pg_catalog.lower(%s)",
        "WITH t AS (SELECT 1) SELECT * FROM t",
        'WITH a AS (SELECT 1) INSERT INTO "shop_item" ("name") SELECT %s',
        'SAVEPOINT "s1_x1"',
        'RELEASE SAVEPOINT "s1_x1"',
        'ROLLBACK TO SAVEPOINT "s1_x1"',
        "",
        "SELECT current_setting('TimeZone')",
        # Transaction control: a transaction is never lent open (rolled back on return).
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
    ],
)
def test_orm_statements_leave_the_session_clean(judge: StatementJudge, sql: str) -> None:
    assert judge.dirties(sql) is False


@pytest.mark.parametrize(
    "sql",
    [
        "SET statement_timeout = 5",
        "set search_path to x",
        "RESET ALL",
        "SELECT set_config('app.tenant_id', %s, false)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock(1)",
        "SELECT setseed(0.5)",
        "SELECT nextval('shop_item_id_seq')",
        "SELECT app_set_tenant(%s)",
        "SELECT public.lower(%s)",
        'SELECT "lower"(%s)',
        "PREPARE p AS SELECT 1",
        "LISTEN x",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "CREATE TEMP TABLE t (x int)",
        "SELECT * INTO TEMP t FROM shop_item",
        "SELECT 1 INTO t",
        "DO $$ BEGIN PERFORM 1; END $$",
        "CALL proc()",
        "COPY shop_item FROM STDIN",
        "  /* a comment first */ SELECT 1",
        b"SELECT 1",
    ],
)
def test_statements_that_may_change_session_state_are_dirty(
    judge: StatementJudge, sql: Any
) -> None:
    assert judge.dirties(sql) is True


def test_a_judge_that_has_not_read_the_catalog_finds_everything_dirty() -> None:
    assert StatementJudge().dirties("SELECT 1") is True


def last_query(admin: psycopg.Connection[Any], pid: int) -> str:
    row = admin.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    assert row is not None
    return str(row[0])


def test_a_clean_borrow_sends_no_reset_and_a_dirty_one_does(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("judged", {"min_size": 1, "max_size": 1})
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    wrapper.close()
    assert last_query(admin, pid) == "SELECT pg_backend_pid()"
    with wrapper.cursor() as cursor:
        cursor.execute("SET statement_timeout = 1234")
    wrapper.close()
    # The reset was sent when the connection came back.
    assert wait_until(lambda: last_query(admin, pid).startswith("CLOSE ALL"))


def test_a_function_of_your_own_that_sets_session_state_triggers_the_reset(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("ownfunc", {"min_size": 1, "max_size": 1})
    with wrapper.cursor() as cursor:
        cursor.execute(
            "CREATE OR REPLACE FUNCTION dpb_set_tenant(t text) RETURNS text LANGUAGE sql "
            "AS $$ SELECT set_config('app.tenant_id', t, false) $$"
        )
    wrapper.close()
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT dpb_set_tenant(%s)", ["acme"])
    wrapper.close()
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT coalesce(current_setting('app.tenant_id', true), '')")
        (tenant,) = cursor.fetchone()
    wrapper.close()
    assert tenant == ""


def test_reset_always_resets_even_a_clean_borrow(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("always", {"min_size": 1, "max_size": 1, "reset": "always"})
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    wrapper.close()
    assert wait_until(lambda: last_query(admin, pid).startswith("CLOSE ALL"))


def test_a_cursor_class_of_your_own_means_every_borrow_is_reset(
    make_wrapper: Wrappers,
) -> None:
    from django.db.backends.postgresql.base import Cursor

    class MyCursor(Cursor):  # type: ignore[misc]
        pass

    wrapper = make_wrapper(
        "owncursor", {"min_size": 1, "max_size": 1}, OPTIONS={"cursor_factory": MyCursor}
    )
    wrapper.ensure_connection()
    assert wrapper.pool is not None
    assert wrapper.pool.judge is None
    with wrapper.cursor() as cursor:
        # Not judged (a cursor of its own) but still reset on return.
        cursor.execute("SET statement_timeout = 99")
    wrapper.close()
    with wrapper.cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        (value,) = cursor.fetchone()
    wrapper.close()
    assert value == "0"
