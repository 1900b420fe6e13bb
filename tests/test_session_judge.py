"""The "auto" reset: which statements may dirty a session, judged against the real server.

The judge learns the catalog of the test database, where ``judge_corpus.SETUP``
made the objects some disguised changes need (a function of our own, a
trigger, an overload of a ``pg_catalog`` name...).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import psycopg
import pytest
from django.db import connection

from django_pooled_backend.reset import build_reset_query, finish_reset, send_reset
from django_pooled_backend.session import StatementJudge
from testproject.launch import wait_for

from . import judge_corpus
from .conftest import TRANSACTION_MODE, Wrappers, admin_dsn


def setup_objects() -> None:
    """Create the objects of ``judge_corpus.SETUP`` in the test database."""
    with psycopg.connect(admin_dsn(connection.settings_dict["NAME"]), autocommit=True) as conn:
        conn.execute(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
            f"'{judge_corpus.ROLE}') THEN CREATE ROLE {judge_corpus.ROLE} NOLOGIN; END IF; END $$"
        )
        for statement in judge_corpus.SETUP:
            conn.execute(statement)


@pytest.fixture(scope="module")
def judge(django_db_setup: None, django_db_blocker: Any) -> StatementJudge:
    with django_db_blocker.unblock():
        setup_objects()
        judge = StatementJudge()
        with psycopg.connect(admin_dsn(connection.settings_dict["NAME"])) as conn:
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
        'SELECT "lower"(%s)',
        "  /* a comment first */ SELECT 1",
        # Transaction control: a transaction is never lent open (rolled back on return).
        "BEGIN",
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        "START TRANSACTION READ ONLY",
        "COMMIT",
        "COMMIT AND CHAIN",
        "END",
        "ROLLBACK",
        "ABORT",
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
        'SELECT "LOWER"(%s)',
        "PREPARE p AS SELECT 1",
        "LISTEN x",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "CREATE TEMP TABLE t (x int)",
        "SELECT * INTO TEMP t FROM shop_item",
        "SELECT 1 INTO t",
        "DO $$ BEGIN PERFORM 1; END $$",
        "CALL proc()",
        "COPY shop_item FROM STDIN",
        "BEGIN; SET LOCAL statement_timeout = 5",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "PREPARE TRANSACTION 'x'",
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
    wrapper = make_wrapper("judged", {"min_size": 1, "max_size": 1, "reset": "auto"})
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    wrapper.close()
    assert last_query(admin, pid) == "SELECT pg_backend_pid()"
    with wrapper.cursor() as cursor:
        cursor.execute("SET statement_timeout = 1234")
    wrapper.close()
    # The reset was sent when the connection came back.
    wait_for(lambda: last_query(admin, pid).startswith(("DISCARD ALL", "CLOSE ALL")))


def test_a_function_of_your_own_that_sets_session_state_triggers_the_reset(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("ownfunc", {"min_size": 1, "max_size": 1, "reset": "auto"})
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
    wait_for(lambda: last_query(admin, pid).startswith(("DISCARD ALL", "CLOSE ALL")))


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


# -- the generated corpus ---------------------------------------------------------

CORPUS = judge_corpus.corpus()
KINDS = sorted({case.kind for case in CORPUS})


def test_the_corpus_disguises_every_change_every_way() -> None:
    per_kind = Counter(case.kind for case in CORPUS)
    assert len(CORPUS) > 5500, per_kind
    changes = {change.name for change in judge_corpus.CHANGES}
    for kind in ("plain", "separators", "leading", "case", "after_statement"):
        assert {case.change.name for case in CORPUS if case.kind == kind} == changes, kind
    calls = {change.name for change in judge_corpus.CHANGES if change.call is not None}
    for kind in ("name", "before_paren", "context", "call_separators"):
        assert {case.change.name for case in CORPUS if case.kind == kind} == calls, kind


@pytest.mark.parametrize("kind", KINDS)
def test_every_disguised_state_change_is_dirty(judge: StatementJudge, kind: str) -> None:
    cases = [case for case in CORPUS if case.kind == kind]
    missed = [case.sql for case in cases if not judge.judge(case.sql)]
    assert missed == [], f"{len(missed)} of {len(cases)} judged clean"
    # With parameters too: psycopg would send the same text.
    missed = [case.sql for case in cases if not judge.judge(case.sql, with_params=True)]
    assert missed == [], f"{len(missed)} of {len(cases)} judged clean with parameters"


@pytest.mark.parametrize("sql", judge_corpus.CLEAN)
def test_state_changes_inside_strings_and_comments_stay_clean(
    judge: StatementJudge, sql: str
) -> None:
    assert judge.judge(sql) is False


@pytest.mark.parametrize(("sql", "dirty"), judge_corpus.WITH_PARAMS)
def test_placeholders_that_could_change_the_text_are_dirty(
    judge: StatementJudge, sql: str, dirty: bool
) -> None:
    assert judge.dirties(sql, with_params=True) is dirty


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'unterminated",
        "SELECT E'unterminated\\'",
        'SELECT "unterminated',
        "SELECT 1 /* unterminated /* nested */",
        "SELECT $$unterminated",
        "SELECT $a$ $b$",
        "SELECT $x",
        "SELECT 1 \\ 2",
        "SELECT {1}",
        "SELECT 'a\\'",  # ends elsewhere with standard_conforming_strings off
        "SELECT U&\"set_config\"('a.b', 'c', false)",
        "SELECT unknown_function()",
        "SELECT public.lower('x')",
        "SELECT other_db.pg_catalog.lower('x')",
        "SELECT (r).lower('x') FROM dpb_judge_row r",
        "SELECT s\u00e9t_config('a.b', 'c', false)",
        "SELECT set_con\u212ag('a.b', 'c', false)",
        "SELECT abort()",  # an unreserved keyword can be a function of your own
        "SELECT x FROM dpb_judge_row JOIN dpb_judge_row y ON conflict(x)",
        "EXPLAIN ANALYZE SELECT 1",
        "MERGE INTO dpb_judge_row USING dpb_judge_row s ON true WHEN MATCHED THEN DO NOTHING",
        "START dpb_judge",
        "NOTIFY dpb_judge",
        "LOCK TABLE dpb_judge_row",
        "select lo_create(0)",
        "SELECT pg_create_logical_replication_slot('s', 'pgoutput', true)",
        "SELECT pg_backup_start('x')",
        "SELECT table_to_xml('dpb_judge_row', true, false, '')",
        "\x00SELECT 1",
    ],
)
def test_what_the_lexer_cannot_prove_harmless_is_dirty(judge: StatementJudge, sql: str) -> None:
    assert judge.judge(sql) is True


def test_an_overload_of_a_catalog_name_makes_its_unqualified_calls_dirty(
    judge: StatementJudge, transactional_db: None
) -> None:
    # substring(a, b) and overlay(a, b) look like keywords but are looked up
    # on the search_path, as any call is: an overload of your own may win.
    assert judge.judge("SELECT substring('abc', 2), overlay('abc' placing 'x' from 2)") is False
    with psycopg.connect(admin_dsn(connection.settings_dict["NAME"]), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA dpb_judge_shadow")
        try:
            for name in ("substring", "overlay", "lower"):
                conn.execute(
                    f"CREATE FUNCTION dpb_judge_shadow.{name}(integer, integer) RETURNS text "
                    "LANGUAGE sql AS $$ SELECT set_config('app.judge', 'shadow', false) $$"
                )
            shadowed = StatementJudge()
            shadowed.learn(conn)
        finally:
            conn.execute("DROP SCHEMA dpb_judge_shadow CASCADE")
    for sql in ("SELECT substring(1, 2)", "SELECT overlay(1, 2)", "SELECT lower(1, 2)"):
        assert shadowed.judge(sql) is True, sql
    # Qualified by pg_catalog, no overload of your own can be called.
    assert shadowed.judge("SELECT pg_catalog.lower('X')") is False


def test_orm_queries_stay_clean(judge: StatementJudge, transactional_db: None) -> None:
    from django.db.models import Count, F, Max, OuterRef, Q, Subquery, Sum, Value, Window
    from django.db.models.functions import Coalesce, Concat, Lower, RowNumber, TruncDay, Upper

    from testproject.shop.models import Item, Order

    seen: list[tuple[str, bool]] = []

    def capture(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append((sql, params is not None))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(capture):
        item = Item.objects.create(name="a", quantity=2)
        Item.objects.bulk_create([Item(name="b"), Item(name="c")])
        Item.objects.bulk_create([Item(name="a")], ignore_conflicts=True)
        Order.objects.create(item=item, quantity=3)
        list(Item.objects.filter(name__icontains="A", quantity__gte=1).order_by("-created")[:5])
        list(Item.objects.filter(Q(name__startswith="a") | Q(quantity__in=[1, 2])).exclude(id=0))
        list(Item.objects.annotate(n=Count("orders"), total=Coalesce(Sum("orders__quantity"), 0)))
        list(Item.objects.annotate(u=Upper("name"), c=Concat("name", Value("-"), Lower("name"))))
        list(Item.objects.annotate(rank=Window(RowNumber(), order_by=F("quantity").desc())))
        list(Item.objects.annotate(day=TruncDay("created")).values("day").annotate(n=Count("id")))
        list(Item.objects.annotate(n=Count("orders", filter=Q(orders__quantity__gt=1))))
        newest = Order.objects.filter(item=OuterRef("pk")).order_by("-created")
        list(Item.objects.annotate(last=Subquery(newest.values("quantity")[:1])))
        list(Order.objects.select_related("item").filter(item__name="a"))
        list(Item.objects.prefetch_related("orders"))
        Item.objects.aggregate(Max("quantity"))
        Item.objects.filter(name="a").exists()
        Item.objects.count()
        list(Item.objects.values_list("name", flat=True).distinct())
        list(Item.objects.filter(name="a").union(Item.objects.filter(name="b")).order_by("name"))
        Item.objects.filter(name="b").update(quantity=F("quantity") + 1)
        item.name = "z"
        item.save()
        Item.objects.filter(name="c").delete()
        Item.objects.get_or_create(name="d")
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    assert len(seen) > 20
    dirty = [sql for sql, with_params in seen if judge.dirties(sql, with_params)]
    assert dirty == []


# -- on the real server: the next borrower sees none of it --------------------------

PROBE = (
    "SELECT pg_backend_pid(), current_setting('search_path'), "
    "current_setting('statement_timeout'), coalesce(current_setting('app.judge', true), ''), "
    "current_user::text, session_user::text, current_setting('TimeZone'), "
    "(SELECT count(*) FROM pg_listening_channels()), "
    "(SELECT count(*) FROM pg_prepared_statements WHERE name NOT LIKE '\\_pg3\\_%%'), "
    "(SELECT count(*) FROM pg_cursors), "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), "
    "(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())"
)


def server_sample() -> list[Any]:
    """Every change plainly, and each disguise kind on a few changes, with readable ids."""
    sample: dict[str, judge_corpus.Case] = {}
    per_kind: Counter[str] = Counter()
    shuffled = list(CORPUS)
    random.Random(14).shuffle(shuffled)  # a few different changes per kind
    for case in sorted(shuffled, key=lambda case: case.kind != "plain"):
        if not case.change.on_server:
            continue
        limit = 40 if case.kind == "plain" else 3
        if per_kind[case.kind] >= limit or case.id in sample:
            continue
        sample[case.id] = case
        per_kind[case.kind] += 1
    return [pytest.param(case.sql, id=case_id) for case_id, case in sample.items()]


SERVER_SAMPLE = server_sample()


@pytest.mark.slow
@pytest.mark.skipif(TRANSACTION_MODE, reason="runs no pool: once is enough")
def test_every_generated_change_runs_on_the_server_and_changes_the_state(
    judge: StatementJudge,
) -> None:
    # What the corpus claims of itself: each text meant for the server is
    # valid SQL that leaves state a next borrower would see.  One
    # connection, reset as the pool resets between cases.
    cases = [case for case in CORPUS if case.change.on_server]
    failures: dict[str, str] = {}
    dsn = admin_dsn(connection.settings_dict["NAME"])
    conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
    try:
        reset_query = build_reset_query([], conn)
        clean = conn.execute(PROBE, []).fetchone()
        for case in cases:
            try:
                conn.execute(case.sql)
                if conn.execute(PROBE, []).fetchone() == clean:
                    failures.setdefault(case.id, f"no state changed: {case.sql!r}")
                # As the pool does: sent, then read (and psycopg's own
                # prepared statements forgotten with the server's).
                send_reset(conn, reset_query)
                finish_reset(conn, 10.0)
            except psycopg.Error as exc:
                failures.setdefault(case.id, f"{exc}: {case.sql!r}")
                conn.close()
                conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
                continue
            if conn.execute(PROBE, []).fetchone() != clean:
                conn.close()  # a state the reset does not undo: start afresh
                conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
    finally:
        conn.close()
    assert len(cases) > 4000
    assert failures == {}


def probe(wrapper: Any) -> tuple[Any, ...]:
    with wrapper.cursor() as cursor:
        cursor.execute(PROBE, [])
        row = cursor.fetchone()
    return tuple(row)


@pytest.mark.parametrize("sql", SERVER_SAMPLE)
def test_a_disguised_state_change_does_not_reach_the_next_borrower(
    make_wrapper: Wrappers, sql: str
) -> None:
    setup_objects()
    alias = "judged_corpus"
    first = make_wrapper(alias, {"min_size": 1, "max_size": 1, "timeout": 10, "reset": "auto"})
    before = probe(first)
    with first.cursor() as cursor:
        cursor.execute(sql)
    first.close()
    second = make_wrapper(alias, {"min_size": 1, "max_size": 1, "timeout": 10, "reset": "auto"})
    after = probe(second)
    second.close()
    assert after[0] == before[0], "the pool of size 1 lent another server connection"
    assert after == before
