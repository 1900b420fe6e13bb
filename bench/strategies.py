"""The connection strategies, each one alias of ``DATABASES`` on the same database.

Every alias sets ``application_name`` to ``bench <name>`` so that the
sampler can count each strategy's server connections in
``pg_stat_activity`` (PgBouncer passes the client's application name on to
its server connections).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

POOL_MAX = 10


@dataclass(frozen=True)
class Strategy:
    """One way of getting a connection, as one ``DATABASES`` alias."""

    name: str
    description: str
    engine: str = "django.db.backends.postgresql"
    conn_max_age: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    via_pgbouncer: bool = False
    # connect()/close() borrow from and return to a pool in this process.
    pooled: bool = False
    # Only what this strategy needs installed, to say what is missing.
    requires: str | None = None

    @property
    def application_name(self) -> str:
        return f"bench {self.name}"

    @property
    def server_name_pattern(self) -> str:
        """A LIKE pattern for this strategy's server connections."""
        # The two PgBouncer strategies share PgBouncer's server pool: a server
        # connection keeps the name of the last client it served.
        return "bench pgbouncer%" if self.via_pgbouncer else self.application_name

    def settings(
        self, db: dict[str, Any], pgbouncer_port: int | None, max_size: int = POOL_MAX
    ) -> dict[str, Any]:
        """The ``DATABASES`` entry of this strategy, its pool bounded at ``max_size``."""
        options = dict(self.options)
        if "pool" in options:
            options["pool"] = {**options["pool"], "max_size": max_size}
        extra = dict(self.extra)
        if "POOL_OPTIONS" in extra:
            extra["POOL_OPTIONS"] = {**extra["POOL_OPTIONS"], "POOL_SIZE": max_size}
        entry: dict[str, Any] = {
            "ENGINE": self.engine,
            "NAME": db["NAME"],
            "USER": db["USER"],
            "PASSWORD": db["PASSWORD"],
            "HOST": db["HOST"],
            "PORT": db["PORT"],
            "CONN_MAX_AGE": self.conn_max_age,
            "OPTIONS": {"application_name": self.application_name, **options},
            **extra,
        }
        if self.via_pgbouncer:
            assert pgbouncer_port is not None
            entry["HOST"] = "127.0.0.1"
            entry["PORT"] = str(pgbouncer_port)
        return entry


STRATEGIES: list[Strategy] = [
    Strategy(
        "no-pool",
        "Django's PostgreSQL backend, CONN_MAX_AGE=0: a new server connection per request.",
    ),
    Strategy(
        "persistent",
        "Django's PostgreSQL backend, CONN_MAX_AGE=None: one connection per thread, kept "
        "(the reference; unbounded: one server connection per thread).",
        conn_max_age=None,
    ),
    Strategy(
        "django-pool",
        "Django's own pool: OPTIONS['pool'] = {'min_size': 1, 'max_size': 10} "
        "(psycopg_pool, no reset, no check).",
        options={"pool": {"min_size": 1, "max_size": POOL_MAX}},
        pooled=True,
    ),
    Strategy(
        "db-connection-pool",
        "django-db-connection-pool: SQLAlchemy QueuePool, POOL_SIZE=10, MAX_OVERFLOW=0, "
        "its defaults otherwise (pre_ping on).",
        engine="dj_db_conn_pool.backends.postgresql",
        extra={"POOL_OPTIONS": {"POOL_SIZE": POOL_MAX, "MAX_OVERFLOW": 0}},
        pooled=True,
        requires="dj_db_conn_pool",
    ),
    Strategy(
        "pg-real-pool",
        "django-pg-real-pool: Django's pool (min 1, max 10) released after every query "
        "outside atomic().",
        engine="django_pg_real_pool",
        options={"pool": {"min_size": 1, "max_size": POOL_MAX}},
        pooled=True,
        requires="django_pg_real_pool",
    ),
    Strategy(
        "pgbouncer",
        "PgBouncer, transaction mode, pool size 10; Django's backend with CONN_MAX_AGE=0 "
        "(a new client connection to PgBouncer per request).",
        via_pgbouncer=True,
    ),
    Strategy(
        "pgbouncer-persistent",
        "PgBouncer, transaction mode, pool size 10; Django's backend with "
        "CONN_MAX_AGE=None (one client connection per thread).",
        conn_max_age=None,
        via_pgbouncer=True,
    ),
    Strategy(
        "pooled",
        "This backend, defaults (session reset on, checks 'auto'), max_size 10.",
        engine="django_pooled_backend",
        options={"pool": {"max_size": POOL_MAX}},
        pooled=True,
    ),
    Strategy(
        "pooled-transaction",
        "This backend with 'release': 'transaction' (the connection goes back between "
        "statements outside a transaction), max_size 10.",
        engine="django_pooled_backend",
        options={"pool": {"max_size": POOL_MAX, "release": "transaction"}},
        pooled=True,
    ),
    Strategy(
        "pooled-no-reset",
        "This backend with 'reset': False (to show the reset's cost), max_size 10.",
        engine="django_pooled_backend",
        options={"pool": {"max_size": POOL_MAX, "reset": False}},
        pooled=True,
    ),
]

BY_NAME = {s.name: s for s in STRATEGIES}
REFERENCE = "persistent"


def missing_requirement(strategy: Strategy) -> str | None:
    """The module a strategy needs that is not installed, or None."""
    if strategy.requires is None:
        return None
    import importlib.util

    return None if importlib.util.find_spec(strategy.requires) else strategy.requires


def close_pools(strategy: Strategy) -> None:
    """Close the process-side pool of ``strategy`` so that the next cell starts cold."""
    closers: dict[str, Callable[[], None]] = {
        "django_pooled_backend": lambda: _close_pooled(strategy.name),
        "django_pg_real_pool": lambda: _close_django_pool(strategy.name),
        "django.db.backends.postgresql": lambda: _close_django_pool(strategy.name),
        "dj_db_conn_pool.backends.postgresql": lambda: _close_dbcp(strategy.name),
    }
    with contextlib.suppress(KeyError):
        closers[strategy.engine]()


def borrow_waits(strategy: Strategy) -> dict[str, int] | None:
    """psycopg_pool's borrow counters of ``strategy``'s pool, for a pool built on it.

    None for the strategies without a psycopg_pool in this process.  Read
    before :func:`close_pools`, which starts the next cell from zero.
    """
    pool: Any = None
    if strategy.engine == "django_pooled_backend":
        from django_pooled_backend import registry

        pools = registry.pools_for_alias(strategy.name)
        pool = pools[0] if pools else None
    elif strategy.engine in {"django_pg_real_pool", "django.db.backends.postgresql"}:
        # Not the pool property, which creates a pool when there is none.
        pool = _django_pools().get(strategy.name)
    return None if pool is None else pool_waits(pool)


def pool_waits(pool: Any) -> dict[str, int]:
    """A psycopg_pool's borrow counters (since it opened).

    ``borrows``: connections lent; ``queued``: borrows that found no idle
    connection and waited in the pool's queue; ``wait_ms``: their total wait.
    """
    stats = pool.get_stats()
    return {
        "borrows": stats.get("requests_num", 0),
        "queued": stats.get("requests_queued", 0),
        "wait_ms": stats.get("requests_wait_ms", 0),
    }


def _close_pooled(alias: str) -> None:
    from django.db import connections

    from django_pooled_backend.base import DatabaseWrapper

    wrapper = connections[alias]
    assert isinstance(wrapper, DatabaseWrapper)
    wrapper.close_pool()


def _django_pools() -> dict[str, Any]:
    """Django's pools by alias (its backend's, and django-pg-real-pool's)."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    pools: dict[str, Any] = DatabaseWrapper._connection_pools  # type: ignore[attr-defined]
    return pools


def _close_django_pool(alias: str) -> None:
    # Django's pool property creates a pool when there is none: look first.
    pool = _django_pools().pop(alias, None)
    if pool is not None:
        pool.close()


def _close_dbcp(alias: str) -> None:
    from dj_db_conn_pool.core import pool_container

    with pool_container.lock:
        pool = pool_container.pop(alias, None)
    if pool is not None:
        pool.dispose()
