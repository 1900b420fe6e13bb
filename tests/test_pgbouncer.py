"""Behind a real PgBouncer in transaction mode: the pool, its resets, transactions, the ORM.

PgBouncer comes from the system (``apt-get install pgbouncer``; ``.ci/run``
installs it).  Without it these tests are skipped, except in CI (``CI`` set),
where a missing PgBouncer fails them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import connections

from django_pooled_backend import signals
from testproject import pgbouncer
from testproject.shop.models import Item

from .conftest import Wrappers, only_request_mode, require_pgbouncer
from .test_pooling import request_cycle

pytestmark = pytest.mark.slow

BEHIND = {"transaction_pooling": True}


@pytest.fixture(scope="module")
def bouncer() -> Iterator[pgbouncer.PgBouncer]:
    require_pgbouncer()
    running = pgbouncer.start(os.environ["DATABASE_URL"], pool_mode="transaction")
    try:
        yield running
    finally:
        running.stop()


def through(make_wrapper: Wrappers, bouncer: pgbouncer.PgBouncer, alias: str, pool: Any) -> Any:
    """A wrapper on the test database whose HOST and PORT are PgBouncer's."""
    return make_wrapper(
        alias, pool, HOST=bouncer.host, PORT=bouncer.port, DISABLE_SERVER_SIDE_CURSORS=True
    )


def show(bouncer: pgbouncer.PgBouncer, what: str) -> list[dict[str, Any]]:
    """A SHOW command of PgBouncer's admin console (simple query protocol only)."""
    with psycopg.connect(
        bouncer.admin_dsn(), autocommit=True, cursor_factory=psycopg.ClientCursor
    ) as conn:
        cursor = conn.cursor()
        cursor.execute(f"SHOW {what}")
        names = [column.name for column in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@only_request_mode
def test_the_session_reset_works_through_transaction_mode(
    make_wrapper: Wrappers, bouncer: pgbouncer.PgBouncer, transactional_db: None
) -> None:
    events: list[str] = []

    def record(sender: Any, *, signal: Any, **kwargs: Any) -> None:
        if kwargs["alias"] == "bounced":
            events.append("reset" if signal is signals.connection_reset else "discarded")

    signals.connection_reset.connect(record)
    signals.connection_discarded.connect(record)
    try:
        wrapper = through(make_wrapper, bouncer, "bounced", {**BEHIND, "max_size": 1})
        with wrapper.cursor() as cursor:
            # Session state that PgBouncer tracks and carries from server
            # connection to server connection for its client: our reset must
            # put it back for the next borrower.
            cursor.execute("SET TIME ZONE 'Asia/Tokyo'")
            cursor.execute("SET application_name = 'changed'")
        first = wrapper.connection
        wrapper.close()
        row = request_cycle(
            wrapper,
            "SELECT current_setting('TimeZone') || ' ' || current_setting('application_name')",
        )
        assert row == "UTC dpb-test bounced"
        request_cycle(wrapper)
        assert wrapper.pool.idle_connections() == [first]  # type: ignore[union-attr]
    finally:
        signals.connection_reset.disconnect(record)
        signals.connection_discarded.disconnect(record)
    # The reset (the default, "always": after every borrow) went through
    # both times, and nothing had to be thrown away.
    assert events == ["reset", "reset"]
    assert "ERROR" not in bouncer.log()


def test_transactions_commit_and_roll_back_through_pgbouncer(
    make_wrapper: Wrappers, bouncer: pgbouncer.PgBouncer, transactional_db: None
) -> None:
    wrapper = through(make_wrapper, bouncer, "bounced", BEHIND)
    for name, keep in (("rolled back", False), ("committed", True)):
        wrapper.set_autocommit(False)
        with wrapper.cursor() as cursor:
            cursor.execute(
                "INSERT INTO shop_item (name, quantity, created) VALUES (%s, 0, now())", [name]
            )
        wrapper.commit() if keep else wrapper.rollback()
        wrapper.set_autocommit(True)
        wrapper.close()
    assert list(Item.objects.values_list("name", flat=True)) == ["committed"]


def test_app_connections_share_fewer_server_connections(
    make_wrapper: Wrappers, bouncer: pgbouncer.PgBouncer, transactional_db: None
) -> None:
    # 8 threads, a pool of 4 client connections, PgBouncer's 2 server connections.
    options = {**BEHIND, "min_size": 4, "max_size": 4, "timeout": 30}
    errors: list[BaseException] = []
    pids: set[int] = set()

    def work() -> None:
        wrapper = through(make_wrapper, bouncer, "bounced_many", options)
        try:
            for _ in range(5):
                pids.add(request_cycle(wrapper, "SELECT pg_backend_pid() FROM pg_sleep(0.01)"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert 1 <= len(pids) <= 2  # server backends behind the 4 client connections
    # PgBouncer's view: our pool's 4 clients, at most its 2 server connections.
    app = make_wrapper.application_name("bounced_many")
    clients = [c for c in show(bouncer, "CLIENTS") if c["application_name"] == app]
    servers = [s for s in show(bouncer, "SERVERS") if s["database"] == "test_testproject"]
    assert len(clients) == 4
    assert 1 <= len(servers) <= 2


def test_the_orm_iterates_without_server_side_cursors(
    make_wrapper: Wrappers, bouncer: pgbouncer.PgBouncer, transactional_db: None
) -> None:
    Item.objects.bulk_create(Item(name=f"item {i}", quantity=i) for i in range(25))
    wrapper = through(make_wrapper, bouncer, "bounced", BEHIND)
    connections["bounced"] = wrapper
    try:
        names = [item.name for item in Item.objects.using("bounced").iterator(chunk_size=4)]
        # Repeated queries are not prepared (Django's prepare_threshold=None),
        # which PgBouncer 1.18 in transaction mode could not serve.
        for _ in range(10):
            assert Item.objects.using("bounced").filter(quantity__gte=20).count() == 5
    finally:
        del connections["bounced"]
        wrapper.close()
    assert len(names) == 25
