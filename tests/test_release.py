"""Transaction-scoped release (``OPTIONS["pool"]["release"] = "transaction"``), case by case.

Every test runs against the real server, on aliases of their own in
``release="transaction"`` mode (whatever mode the rest of the suite runs in),
reached the way Django code reaches them: ``connections[alias]``, one
connection object per thread, the ORM with ``using(alias)``.  What the pool
and the server see proves when the connection went back: the pool's
``lent`` and ``waiting`` counts, ``pg_backend_pid()``, ``pg_stat_activity``.

These tests do not use pytest-django's ``db`` fixtures, whose test case
refuses queries to aliases it was not told about: they unblock database
access themselves and delete the rows they made.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.management import call_command
from django.db import DatabaseError, InterfaceError, connection, connections, transaction
from django.db.backends.signals import connection_created
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from django_pooled_backend import registry
from django_pooled_backend.base import DatabaseWrapper
from django_pooled_backend.pool import DjangoConnectionPool
from testproject.launch import wait_for
from testproject.shop.models import Item, Order

from .conftest import admin_dsn, server_pids
from .test_lifecycle import fork_and_report
from .test_liveness import backend_pid

Aliases = Callable[..., str]


@pytest.fixture
def aliases(django_db_setup: None, django_db_blocker: Any) -> Iterator[Aliases]:
    """Adds transaction-scoped aliases to ``connections``; cleans up everything after.

    Each alias' pool is open with its one (min_size) connection when the test
    starts: a first borrow that finds a pool still empty makes it grow, and
    the tests count server connections.
    """
    added: list[str] = []

    def add(alias: str, **pool: Any) -> str:
        settings_dict = copy.deepcopy(connection.settings_dict)
        options = {k: v for k, v in settings_dict["OPTIONS"].items() if k != "pool"}
        options["application_name"] = f"dpb-test {alias}"
        options["pool"] = {"min_size": 1, "timeout": 10, **pool, "release": "transaction"}
        settings_dict["OPTIONS"] = options
        connections.settings[alias] = settings_dict
        added.append(alias)
        pool = connections[alias].pool
        assert pool is not None
        pool.wait(10)
        return alias

    with django_db_blocker.unblock():
        try:
            yield add
        finally:
            for alias in added:
                connections[alias].close()
                del connections[alias]
                del connections.settings[alias]
                registry.close_alias(alias)
            Order.objects.all().delete()
            Item.objects.all().delete()
            connection.close()


def pool_of(alias: str) -> DjangoConnectionPool:
    (pool,) = registry.pools_for_alias(alias)
    return pool


def pid(alias: str) -> int:
    """The backend pid of this thread's connection to ``alias``, from a query."""
    return backend_pid(connections[alias])


def in_thread(target: Callable[[], Any], name: str = "other") -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` in a thread that closes its connections at the end, as a request does."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:
            outcome.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, outcome


# -- statements outside transactions ----------------------------------------


def test_the_connection_goes_back_after_each_statement_and_a_changed_session_is_reset(
    aliases: Aliases, admin: psycopg.Connection[Any]
) -> None:
    alias = aliases("txn_basic", max_size=1)
    first = pid(alias)
    wrapper = connections[alias]
    assert wrapper.connection is None
    assert not pool_of(alias).holders
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert wrapper.connection is None
        # A statement that changes the session pins the connection to this
        # object until it is closed...
        cursor.execute("SELECT set_config('app.tenant_id', 'x', false)")
    assert wrapper.connection is not None
    assert pool_of(alias).state()["pinned"] == 1
    wrapper.close()
    assert wrapper.connection is None
    assert pool_of(alias).state()["pinned"] == 0
    # ...then the server ran the pipelined reset when the connection came back.
    wait_for(
        lambda: (
            admin.execute(
                "SELECT state, query FROM pg_stat_activity WHERE pid = %s", [first]
            ).fetchone()
            or ("", "")
        )[1].startswith(("DISCARD ALL", "CLOSE ALL"))
    )
    assert pid(alias) == first  # borrowed again: the one server connection
    assert server_pids(admin, f"dpb-test {alias}") == {first}


def test_two_threads_interleave_statements_on_one_server_connection(
    aliases: Aliases, admin: psycopg.Connection[Any]
) -> None:
    alias = aliases("txn_interleave", max_size=1, timeout=5)
    first_done = threading.Event()
    other_done = threading.Event()

    def other() -> int:
        assert first_done.wait(10)
        result = pid(alias)
        other_done.set()
        return result

    thread, outcome = in_thread(other)
    mine = [pid(alias)]
    first_done.set()
    # With request-scoped release the other thread would wait for this
    # thread's close() here, and time out.
    assert other_done.wait(10)
    mine.append(pid(alias))
    thread.join(10)
    assert outcome == [mine[0]]
    assert set(mine) == {outcome[0]} == server_pids(admin, f"dpb-test {alias}")


def test_a_cursor_used_again_after_a_release_runs_on_a_connection_it_holds(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_cursor", max_size=2)
    holding = threading.Event()
    done = threading.Event()

    def hold_in_a_transaction() -> int:
        with transaction.atomic(using=alias):
            held = pid(alias)
            holding.set()
            assert done.wait(10)
        return held

    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), 'kept'")
        assert connections[alias].connection is None
        # The other thread now borrows the only server connection there is:
        # the one this cursor ran its statement on.
        thread, outcome = in_thread(hold_in_a_transaction)
        assert holding.wait(10)
        # What the statement returned is still here, from psycopg's result.
        assert cursor.description[1].name == "?column?"
        assert cursor.rowcount == 1
        first, kept = cursor.fetchone()
        cursor.execute("SELECT pg_backend_pid()")
        (second,) = cursor.fetchone()
        done.set()
    thread.join(10)
    assert kept == "kept"
    assert outcome == [first], "the other thread got the connection the cursor had used"
    assert second != first, "the cursor ran on a connection lent to another thread"


@pytest.mark.parametrize("debug", [False, True], ids=["cursor", "debug-cursor"])
def test_executemany_callproc_copy_and_mogrify_after_a_release(
    aliases: Aliases, debug: bool
) -> None:
    alias = aliases("txn_cursor_methods", max_size=2)
    wrapper = connections[alias]
    wrapper.force_debug_cursor = debug
    insert = "INSERT INTO shop_item (name, quantity, created) VALUES (%s, 0, now())"
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert wrapper.connection is None
        cursor.executemany(insert, [("many 1",), ("many 2",)])
        assert wrapper.connection is None
        assert cursor.mogrify("SELECT %s", ["it's"]) == "SELECT 'it''s'"
        # A procedure, or COPY, may change the session: each pins the
        # connection to this object until it is closed.
        cursor.callproc("pg_backend_pid")
        (pinned,) = cursor.fetchone()
        assert wrapper.connection is not None
        with cursor.copy("COPY shop_item (name, quantity, created) FROM STDIN") as copy:
            copy.write_row(("copied", 0, "2026-01-01T00:00:00Z"))
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone() == (pinned,)
    assert wrapper.connection is not None
    wrapper.close()
    assert not pool_of(alias).holders
    with pytest.raises(InterfaceError, match="the cursor is closed"):
        cursor.execute("SELECT 1")  # closed stays closed, as with request-scoped release
    names = sorted(Item.objects.using(alias).values_list("name", flat=True))
    assert names == ["copied", "many 1", "many 2"]


def test_a_set_outside_a_transaction_lasts_until_the_connection_is_closed_and_no_longer(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_set", max_size=2)
    with connections[alias].cursor() as cursor:
        cursor.execute("SET statement_timeout = 1234")
        cursor.execute("SELECT count(*) FROM shop_item")
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone() == ("1234ms",)
        with transaction.atomic(using=alias):
            cursor.execute("SHOW statement_timeout")
            assert cursor.fetchone() == ("1234ms",)
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone() == ("1234ms",)
    connections[alias].close()  # the end of the request
    with connections[alias].cursor() as cursor:
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone() == ("0",)


def test_session_state_works_across_statements_until_the_connection_is_closed(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_pinned", max_size=2)
    wrapper = connections[alias]
    with wrapper.cursor() as cursor:
        cursor.execute("CREATE TEMP TABLE scratch (n int)")
        cursor.execute("INSERT INTO scratch VALUES (1), (2)")
        cursor.execute("PREPARE twice (int) AS SELECT $1 * 2")
        cursor.execute("LISTEN pinned_channel")
        cursor.execute("SELECT sum(n) FROM scratch")
        assert cursor.fetchone() == (3,)
        cursor.execute("EXECUTE twice (21)")
        assert cursor.fetchone() == (42,)
        cursor.execute("SELECT pg_listening_channels()")
        assert cursor.fetchall() == [("pinned_channel",)]
    assert pool_of(alias).state()["pinned"] == 1
    wrapper.close()
    assert pool_of(alias).state()["pinned"] == 0
    assert not pool_of(alias).holders
    with wrapper.cursor() as cursor:
        cursor.execute(
            "SELECT to_regclass('pg_temp.scratch'), count(*) FROM pg_prepared_statements"
        )
        assert cursor.fetchone() == (None, 0)
    wrapper.close()


def test_an_advisory_lock_outside_a_transaction_excludes_other_requests_until_closed(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_advisory", max_size=2)
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(777)")
        cursor.execute("SELECT count(*) FROM shop_item")  # more statements, same session

    def try_lock() -> bool:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(777)")
            (got,) = cursor.fetchone()
            if got:
                cursor.execute("SELECT pg_advisory_unlock(777)")
            return bool(got)

    thread, outcome = in_thread(try_lock)
    thread.join(10)
    assert outcome == [False]  # held by this request, which still holds it
    connections[alias].close()  # the end of the request: unlocked by the reset
    thread, outcome = in_thread(try_lock)
    thread.join(10)
    assert outcome == [True]


def test_the_next_borrower_sees_nothing_of_a_statement_outside_a_transaction(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_tenant", max_size=1)
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), set_config('app.tenant_id', 'acme', false)")
        (mine, _) = cursor.fetchone()
    connections[alias].close()  # the end of the request: pinned until then

    def probe() -> tuple[int, str]:
        with connections[alias].cursor() as cursor:
            cursor.execute(
                "SELECT pg_backend_pid(), coalesce(current_setting('app.tenant_id', true), '')"
            )
            return tuple(cursor.fetchone())  # type: ignore[return-value]

    thread, outcome = in_thread(probe)
    thread.join(10)
    assert outcome == [(mine, "")]


def test_a_transaction_begun_in_raw_sql_keeps_the_connection_until_it_ends(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_raw_begin", max_size=1)
    wrapper = connections[alias]
    with wrapper.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("SELECT pg_backend_pid()")
        (first,) = cursor.fetchone()
        assert wrapper.connection is not None  # the server says: in a transaction
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone() == (first,)
        cursor.execute("COMMIT")
        assert wrapper.connection is None


# -- transactions --------------------------------------------------------------


def test_atomic_keeps_the_connection_and_other_threads_wait_until_commit(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_atomic", max_size=1, timeout=10)

    def count() -> int:
        return Item.objects.using(alias).filter(name="atomic").count()

    with transaction.atomic(using=alias):
        Item.objects.using(alias).create(name="atomic")
        first = pid(alias)
        thread, outcome = in_thread(count)
        # The other thread waits for the one connection, held by this block.
        wait_for(lambda: pool_of(alias).state()["waiting"] == 1)
        Item.objects.using(alias).create(name="atomic")
        assert pid(alias) == first
    thread.join(10)
    assert outcome == [2], "the other thread ran before the commit"
    assert connections[alias].connection is None


def test_nested_atomic_savepoints_and_on_commit_callbacks_that_see_their_data(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_nested", max_size=2)
    ran: list[tuple[str, int, bool]] = []

    def callback(name: str) -> Callable[[], None]:
        def run() -> None:
            # After the commit: the rows are there for any connection.
            ran.append(
                (
                    name,
                    Item.objects.using(alias).filter(name__startswith="nested").count(),
                    transaction.get_autocommit(using=alias),
                )
            )

        return run

    pids = set()
    with transaction.atomic(using=alias):
        Item.objects.using(alias).create(name="nested outer")
        transaction.on_commit(callback("outer"), using=alias)
        pids.add(pid(alias))
        with transaction.atomic(using=alias):
            Item.objects.using(alias).create(name="nested kept")
            pids.add(pid(alias))
        try:
            with transaction.atomic(using=alias):
                Item.objects.using(alias).create(name="nested undone")
                transaction.on_commit(callback("undone"), using=alias)
                pids.add(pid(alias))
                raise ValueError("undo")
        except ValueError:
            pass
        assert not transaction.get_autocommit(using=alias)
        assert ran == []  # not before the commit
    assert len(pids) == 1, "the transaction moved between server connections"
    assert ran == [("outer", 2, True)]
    assert connections[alias].connection is None
    names = set(Item.objects.using(alias).values_list("name", flat=True))
    assert names == {"nested outer", "nested kept"}


def test_needs_rollback_and_set_rollback_roll_the_block_back(aliases: Aliases) -> None:
    alias = aliases("txn_rollback", max_size=1)
    with transaction.atomic(using=alias):
        Item.objects.using(alias).create(name="rolled back")
        try:
            with transaction.atomic(using=alias, savepoint=False):
                Item.objects.using(alias).create(name="rolled back too")
                raise ValueError("fail")
        except ValueError:
            pass
        assert connections[alias].needs_rollback
        assert transaction.get_rollback(using=alias)
    with transaction.atomic(using=alias):
        Item.objects.using(alias).create(name="rolled back")
        transaction.set_rollback(True, using=alias)
    assert connections[alias].connection is None
    assert not Item.objects.using(alias).filter(name__startswith="rolled back").exists()


def test_select_for_update_in_atomic_keeps_the_row_locked_until_commit(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_lock", max_size=2)
    item = Item.objects.using(alias).create(name="locked")

    def try_lock() -> str:
        try:
            with transaction.atomic(using=alias):
                Item.objects.using(alias).select_for_update(nowait=True).get(pk=item.pk)
        except DatabaseError:
            return "locked"
        return "free"

    with transaction.atomic(using=alias):
        Item.objects.using(alias).select_for_update().get(pk=item.pk)
        # More statements, each with the lock still held by this transaction.
        Item.objects.using(alias).filter(pk=item.pk).update(quantity=F("quantity") + 1)
        thread, while_held = in_thread(try_lock)
        thread.join(10)
        Item.objects.using(alias).filter(pk=item.pk).update(quantity=F("quantity") + 1)
    thread, after = in_thread(try_lock)
    thread.join(10)
    assert while_held == ["locked"]
    assert after == ["free"]
    assert Item.objects.using(alias).get(pk=item.pk).quantity == 2


def test_manual_transactions_keep_the_connection_until_autocommit_is_back(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_manual", max_size=1)
    wrapper = connections[alias]
    wrapper.set_autocommit(False)
    try:
        assert not transaction.get_autocommit(using=alias)
        Item.objects.using(alias).create(name="manual undone")
        first = pid(alias)
        wrapper.rollback()
        Item.objects.using(alias).create(name="manual kept")
        assert pid(alias) == first
        assert wrapper.connection is not None
        wrapper.commit()
        assert wrapper.connection is not None  # a new transaction begins with the next query
    finally:
        wrapper.set_autocommit(True)
    assert wrapper.connection is None
    assert list(Item.objects.using(alias).values_list("name", flat=True)) == ["manual kept"]


def test_get_autocommit_and_commit_outside_a_transaction_do_not_borrow(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_flags", max_size=1)
    pid(alias)
    assert transaction.get_autocommit(using=alias) is True
    connections[alias].commit()
    connections[alias].rollback()
    transaction.on_commit(lambda: None, using=alias)
    assert connections[alias].connection is None
    assert pool_of(alias).get_stats()["requests_num"] == 1


# -- server-side cursors -------------------------------------------------------


def test_iterator_keeps_the_connection_until_the_cursor_is_exhausted_or_dropped(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_iterator", max_size=2)
    Item.objects.using(alias).bulk_create(Item(name=f"row {i}") for i in range(5))
    wrapper = connections[alias]
    pool = pool_of(alias)
    seen = []
    for item in Item.objects.using(alias).order_by("pk").iterator(chunk_size=2):
        # Between chunks the same server connection holds the cursor open.
        seen.append((item.name, wrapper.connection.info.backend_pid, len(pool.holders)))
    assert [name for name, _, _ in seen] == [f"row {i}" for i in range(5)]
    assert len({backend for _, backend, _ in seen}) == 1
    assert {lent for _, _, lent in seen} == {1}
    assert wrapper.connection is None
    assert not pool.holders
    # Leaving the loop early closes the cursor, and the connection goes back.
    for _item in Item.objects.using(alias).iterator(chunk_size=2):
        assert wrapper.connection is not None
        break
    assert wrapper.connection is None
    assert not pool.holders


def test_disable_server_side_cursors_makes_iterator_release_at_once(aliases: Aliases) -> None:
    alias = aliases("txn_no_ssc", max_size=1)
    connections.settings[alias]["DISABLE_SERVER_SIDE_CURSORS"] = True
    Item.objects.using(alias).bulk_create(Item(name=f"row {i}") for i in range(5))
    names = []
    for item in Item.objects.using(alias).order_by("pk").iterator(chunk_size=2):
        assert connections[alias].connection is None  # fetched at once, already back
        names.append(item.name)
    assert names == [f"row {i}" for i in range(5)]


def test_a_chunked_cursor_keeps_the_connection_until_closed(aliases: Aliases) -> None:
    alias = aliases("txn_named", max_size=1)
    wrapper = connections[alias]
    cursor = wrapper.chunked_cursor()
    cursor.execute("SELECT g FROM generate_series(1, 5) AS g")
    assert cursor.fetchmany(2) == [(1,), (2,)]
    assert wrapper.connection is not None
    assert cursor.fetchmany(10) == [(3,), (4,), (5,)]
    assert cursor.fetchmany(10) == []
    assert wrapper.connection is not None  # exhausted, but still open
    cursor.close()
    assert wrapper.connection is None


# -- Django's tools --------------------------------------------------------------


def test_connection_queries_are_logged_with_a_debug_cursor(aliases: Aliases) -> None:
    alias = aliases("txn_debug", max_size=1)
    with CaptureQueriesContext(connections[alias]) as captured:
        Item.objects.using(alias).create(name="logged")
        assert Item.objects.using(alias).filter(name="logged").count() == 1
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT %s::int", [42])
            assert cursor.fetchone() == (42,)
    sql = [q["sql"] for q in captured.captured_queries]
    assert len(sql) == 3
    assert sql[0].startswith('INSERT INTO "shop_item"')
    assert sql[2] == "SELECT 42::int"
    assert connections[alias].connection is None


def test_execute_wrappers_see_every_statement_even_when_they_query_themselves(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_wrapper", max_size=2)
    seen: list[tuple[str, int | None]] = []
    auditing = threading.local()

    def audit(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if getattr(auditing, "busy", False):
            return execute(sql, params, many, context)
        # A wrapper that runs a query of its own first (released after it):
        # the statement it wraps must still run, on a connection it holds.
        auditing.busy = True
        try:
            with context["connection"].cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            auditing.busy = False
        result = execute(sql, params, many, context)
        seen.append((sql.split()[0], context["connection"].connection.info.backend_pid))
        return result

    with connections[alias].execute_wrapper(audit):
        Item.objects.using(alias).create(name="wrapped")
        assert Item.objects.using(alias).filter(name="wrapped").count() == 1
    assert [verb for verb, _ in seen[-2:]] == ["INSERT", "SELECT"]
    assert connections[alias].connection is None


def test_a_statement_run_while_connecting_leaves_the_cursor_a_connection(
    aliases: Aliases,
) -> None:
    # Code wrapping ensure_connection() that queries once connected (Django's
    # test_utils AssertNumQueriesUponConnectionTests does so): the statement
    # gives the connection back before Django creates the cursor it
    # connected for, which borrows again instead of failing on None.
    alias = aliases("txn_configuring", max_size=1)
    wrapper = connections[alias]
    real_ensure_connection = wrapper.ensure_connection
    configured: list[int] = []

    def ensure_connection_then_configure() -> None:
        opening = wrapper.connection is None
        real_ensure_connection()
        if opening and not configured:
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT 1")
                configured.append(cursor.fetchone()[0])

    wrapper.ensure_connection = ensure_connection_then_configure  # type: ignore[method-assign]
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 2")
            assert cursor.fetchone() == (2,)
    finally:
        del wrapper.ensure_connection
    assert configured == [1]
    assert wrapper.connection is None


def test_migrations_run_forwards_and_backwards(
    aliases: Aliases, admin: psycopg.Connection[Any]
) -> None:
    alias = aliases("txn_migrate", max_size=2)

    def tables() -> set[str]:
        with psycopg.connect(admin_dsn(connection.settings_dict["NAME"])) as conn:
            rows = conn.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'shop_%'"
            ).fetchall()
        return {name for (name,) in rows}

    call_command("migrate", "shop", "zero", database=alias, verbosity=0)
    assert tables() == set()
    call_command("migrate", "shop", database=alias, verbosity=0)
    assert tables() == {"shop_item", "shop_order"}
    # DDL is not proven harmless to the session: pinned until closed.
    assert pool_of(alias).state()["pinned"] == 1
    connections[alias].close()
    assert not pool_of(alias).holders


# -- connection_created --------------------------------------------------------


def test_connection_created_once_per_connect_and_for_server_connections_not_yet_seen(
    aliases: Aliases,
) -> None:
    alias = aliases("txn_created", max_size=2)
    created: list[int] = []

    def receiver(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias == alias:
            created.append(connection.connection.info.backend_pid)

    connection_created.connect(receiver)
    try:
        first = pid(alias)
        for _ in range(3):
            assert pid(alias) == first  # borrowed again, no signal
        assert created == [first]
        # Another thread holds that server connection: the next statement
        # here is lent a new one, which no receiver has seen yet.
        holding = threading.Event()
        done = threading.Event()

        def hold() -> None:
            with transaction.atomic(using=alias):
                pid(alias)
                holding.set()
                assert done.wait(10)

        thread, _ = in_thread(hold)
        assert holding.wait(10)
        second = pid(alias)
        done.set()
        thread.join(10)
        assert second != first
        assert created == [first, first, second]  # this thread, the other, the new one
        # After a close() (the end of a request) the next statement connects
        # again, and connection_created is sent as on every connect.
        connections[alias].close()
        third = pid(alias)
        assert created == [first, first, second, third]
    finally:
        connection_created.disconnect(receiver)


def test_the_next_request_borrows_again_without_a_full_connect(
    aliases: Aliases, monkeypatch: pytest.MonkeyPatch
) -> None:
    alias = aliases("txn_reconnect", max_size=2)
    wrapper = connections[alias]
    first = pid(alias)
    wrapper.close()  # the end of a request
    full_connects: list[str] = []
    check_settings = wrapper.check_settings

    def counting() -> None:
        full_connects.append(alias)
        check_settings()

    # Django's connect() starts with check_settings(); the short path skips it.
    monkeypatch.setattr(wrapper, "check_settings", counting)
    for _ in range(3):
        assert pid(alias) == first
        assert pid(alias) == first  # the next statement of the same request
        wrapper.close()
    assert full_connects == []
    # Settings or pool not those of the last full connect: connect in full.
    wrapper.close_pool()
    pid(alias)
    assert full_connects == [alias]


def test_adapters_registered_by_connection_created_apply_to_every_statement(
    aliases: Aliases,
) -> None:
    # What django.contrib.postgres does for hstore and citext.
    alias = aliases("txn_adapters", max_size=2)

    class Upper(psycopg.types.string.TextLoader):
        def load(self, data: Any) -> str:
            return str(super().load(data)).upper()

    def register(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias == alias:
            connection.connection.adapters.register_loader("text", Upper)

    def fetch() -> tuple[int, str]:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), 'abc'::text")
            return tuple(cursor.fetchone())  # type: ignore[return-value]

    connection_created.connect(register)
    try:
        first = fetch()
        holding = threading.Event()
        done = threading.Event()

        def hold() -> None:
            with transaction.atomic(using=alias):
                fetch()
                holding.set()
                assert done.wait(10)

        thread, _ = in_thread(hold)
        assert holding.wait(10)
        # Borrowed again, onto a server connection the pool just opened.
        second = fetch()
        done.set()
        thread.join(10)
        third = fetch()
    finally:
        connection_created.disconnect(register)
    assert first[0] != second[0]
    assert [value for _, value in (first, second, third)] == ["ABC"] * 3


# -- processes, threads and async code -----------------------------------------


def test_a_forked_child_never_borrows_again_from_the_parents_pool(
    aliases: Aliases, admin: psycopg.Connection[Any]
) -> None:
    alias = aliases("txn_fork", max_size=2)
    parent = pid(alias)  # gone back: the next statement would borrow again
    pool = pool_of(alias)

    def child() -> dict[str, Any]:
        return {"backend_pid": pid(alias), "same_pool": pool_of(alias) is pool}

    report = fork_and_report(child)
    assert report["exit_status"] == 0, report
    assert report["backend_pid"] != parent
    assert report["same_pool"] is False
    assert pid(alias) == parent  # the parent's connection was left alone
    assert parent in server_pids(admin, f"dpb-test {alias}")


def test_a_thread_that_ends_without_close_leaves_nothing_to_reclaim(
    aliases: Aliases, caplog: pytest.LogCaptureFixture
) -> None:
    alias = aliases("txn_forgetful", max_size=1)

    async def main() -> int:
        # A task on an executor thread that never closes its connection.
        return await sync_to_async(pid, thread_sensitive=False)(alias)

    asyncio.run(main())
    assert not pool_of(alias).holders
    assert not [r for r in caplog.records if "Reclaimed" in r.getMessage()]


def test_async_views_interleave_on_one_server_connection(
    aliases: Aliases, admin: psycopg.Connection[Any]
) -> None:
    alias = aliases("txn_async", max_size=1, timeout=5)
    Item.objects.using(alias).create(name="async")

    async def view(mine: asyncio.Event, theirs: asyncio.Event) -> list[int]:
        # Each view in its own context, as ASGI runs each request: its own
        # thread for sync code, its own Django connection objects.
        async with ThreadSensitiveContext():
            backends = [await sync_to_async(pid)(alias)]
            assert await Item.objects.using(alias).filter(name="async").acount() == 1
            mine.set()
            # Waiting on something else with a statement done: with
            # request-scoped release the other view could not query now.
            await asyncio.wait_for(theirs.wait(), 10)
            backends.append(await sync_to_async(pid)(alias))
            await sync_to_async(lambda: connections[alias].close())()
            return backends

    async def main() -> list[list[int]]:
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(view(a, b), view(b, a))

    results = asyncio.run(main())
    assert {backend for backends in results for backend in backends} == server_pids(
        admin, f"dpb-test {alias}"
    )
    assert not pool_of(alias).holders


def test_after_close_pool_the_next_statement_connects_to_a_new_pool(make_wrapper: Any) -> None:
    wrapper: DatabaseWrapper = make_wrapper("txn_hand", {"max_size": 1, "release": "transaction"})
    assert wrapper.releases_per_transaction
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
    (old,) = registry.pools_for_alias("txn_hand")
    assert wrapper.connection is None
    # What Django's test database creation and TIME_ZONE changes do.
    wrapper.close_pool()
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 2")
        assert cursor.fetchone() == (2,)
    (new,) = registry.pools_for_alias("txn_hand")
    assert new is not old
    assert old.closed
