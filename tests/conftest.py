"""Shared fixtures: everything runs against the real PostgreSQL server.

Without ``DATABASE_URL``, the plugin ``tests/database_server.py`` starts the
embedded server before the settings are read (and stops it when the test
process exits).

The whole suite runs in either release mode: ``POOL_RELEASE=transaction``
gives the default alias (``testproject.settings``) and every pool made here
transaction-scoped release, unless a test names its mode.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connection

from django_pooled_backend import registry
from django_pooled_backend.base import DatabaseWrapper
from testproject.launch import wait_for

RELEASE = os.environ.get("POOL_RELEASE", "request")
TRANSACTION_MODE = RELEASE == "transaction"

only_request_mode = pytest.mark.skipif(
    TRANSACTION_MODE,
    reason="about request-scoped release: the connection is held from the first query "
    "until close(), which transaction-scoped release does not do",
)


def require_pgbouncer() -> None:
    """Skip the calling test when PgBouncer is not installed; in CI (``CI`` set), fail it."""
    from testproject import pgbouncer

    if pgbouncer.find() is None:
        message = "pgbouncer is not installed: apt-get install -y pgbouncer (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def pooled(options: Any = True) -> Any:
    """Pool options for this backend, in the suite's release mode unless they name one."""
    if not TRANSACTION_MODE or options is False or options is None:
        return options
    if options is True:
        return {"release": RELEASE}
    return {"release": RELEASE, **options}


def admin_dsn(dbname: str = "postgres") -> str:
    """A libpq connection string to ``dbname`` on the test server, for the server's view."""
    url = os.environ["DATABASE_URL"]
    return psycopg.conninfo.make_conninfo(
        url.replace("postgres://", "postgresql://", 1), dbname=dbname
    )


@pytest.fixture
def admin() -> Iterator[psycopg.Connection[Any]]:
    """A plain psycopg connection outside any pool, to look from the server's side."""
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        yield conn


def wait_gone(admin: psycopg.Connection[Any], pid: int) -> None:
    """Until backend ``pid`` has left ``pg_stat_activity`` (killed or closed)."""
    wait_for(
        lambda: (
            not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
        ),
        what=f"backend {pid} to exit",
    )


def server_pids(admin: psycopg.Connection[Any], application_name: str) -> set[int]:
    """Backend pids of the server connections opened under ``application_name``."""
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [application_name]
    ).fetchall()
    return {pid for (pid,) in rows}


class Wrappers:
    """Builds DatabaseWrappers for extra aliases on the test database.

    Each alias gets its own pool; every pool made here is closed at the end.
    """

    def __init__(self) -> None:
        self.made: list[DatabaseWrapper] = []
        self.aliases: set[str] = set()

    def __call__(self, alias: str, pool: Any = True, **settings: Any) -> DatabaseWrapper:
        settings_dict = copy.deepcopy(connection.settings_dict)
        options = settings.pop("OPTIONS", {})
        options.setdefault("application_name", self.application_name(alias))
        settings_dict["OPTIONS"] = {
            **{k: v for k, v in settings_dict["OPTIONS"].items() if k != "pool"},
            **options,
            "pool": pooled(pool),
        }
        settings_dict.update(settings)
        wrapper = DatabaseWrapper(settings_dict, alias)
        self.made.append(wrapper)
        self.aliases.add(alias)
        return wrapper

    def application_name(self, alias: str) -> str:
        return f"dpb-test {alias}"

    def close(self) -> None:
        for wrapper in self.made:
            if wrapper.connection is not None:
                with contextlib.suppress(Exception):
                    wrapper.close()
        for alias in self.aliases:
            registry.close_alias(alias)


@pytest.fixture
def make_wrapper(transactional_db: None) -> Iterator[Wrappers]:
    wrappers = Wrappers()
    try:
        yield wrappers
    finally:
        wrappers.close()


def timeout_while_held(
    hold: Callable[[threading.Event, threading.Event], None],
    borrower: DatabaseWrapper,
    thread_name: str,
) -> OperationalError:
    """The error of a borrow by ``borrower`` while ``hold`` holds the pool's connections.

    ``hold(holding, release)`` runs in a thread named ``thread_name``: it sets
    ``holding`` once it holds what it holds, then waits for ``release``.
    """
    holding = threading.Event()
    release = threading.Event()
    thread = threading.Thread(target=hold, args=(holding, release), name=thread_name)
    thread.start()
    try:
        assert holding.wait(10)
        with pytest.raises(OperationalError) as excinfo:
            borrower.ensure_connection()
    finally:
        release.set()
        thread.join(10)
    return excinfo.value
