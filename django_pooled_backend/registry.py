"""The process-wide pools: lookup, fork handling, closing.

One pool exists per database alias *and* effective connection settings, so
when the test runner renames ``NAME`` to ``test_...`` the next borrow gets a
pool of the test database, never a connection to the real one opened
earlier (even by a query made at import time).

After ``fork()`` the child forgets the parent's pools without touching their
sockets: it neither uses them nor closes them (closing would send the server
a Terminate message on the parent's behalf).  The child builds its own pools
on first use.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from . import stats

if TYPE_CHECKING:
    from .pool import DjangoConnectionPool

logger = logging.getLogger("django_pooled_backend")

PoolKey = tuple[str, Hashable]

_pools: dict[PoolKey, DjangoConnectionPool] = {}
_lock = threading.Lock()
# What a forked child inherited and must never use nor free.
_abandoned: list[Any] = []


def get_pool(key: PoolKey, factory: Callable[[], DjangoConnectionPool]) -> DjangoConnectionPool:
    """The open pool for ``key``, created by ``factory`` on first use.

    A new pool for an alias replaces the alias' pools with other settings
    (the real database before the test runner renamed it, an older
    TIME_ZONE): they are closed, and their lent-out connections close when
    they come back.
    """
    pool = _pools.get(key)
    if pool is not None:
        return pool
    stale: list[DjangoConnectionPool] = []
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = factory()
            pool.open()
            stale = [_pools.pop(k) for k in list(_pools) if k[0] == key[0]]
            _pools[key] = pool
            logger.debug("Opened pool %r for %s.", pool.name, pool.label)
            stats.start_publishing()  # once per process; see stats.py
    for old in stale:
        old.close()
    return pool


def all_pools() -> list[DjangoConnectionPool]:
    """Every pool of this process."""
    return list(_pools.values())


def pools_for_alias(alias: str) -> list[DjangoConnectionPool]:
    return [pool for (a, _), pool in list(_pools.items()) if a == alias]


def close_alias(alias: str, timeout: float = 5.0) -> None:
    """Close every pool of ``alias`` (all its connection settings)."""
    with _lock:
        keys = [key for key in _pools if key[0] == alias]
        pools = [_pools.pop(key) for key in keys]
    for pool in pools:
        pool.close(timeout=timeout)


def close_all(timeout: float = 5.0) -> None:
    """Close every pool of this process; lent-out connections close on return."""
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close(timeout=timeout)


def _detach(conn: Any) -> None:
    """Make an inherited connection harmless in the child.

    The socket is replaced by /dev/null: the child's copy of the TCP socket
    goes away without a FIN (the parent still holds it), and whatever libpq
    writes when the object is eventually freed goes nowhere.
    """
    try:
        fd = conn.pgconn.socket
    except Exception:  # noqa: BLE001 - already closed or broken: nothing to do
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    _abandoned.append(conn)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    pools = list(_pools.values())
    _pools.clear()
    for pool in pools:
        # Idle connections, and those lent to threads that do not exist in
        # the child (their objects may still be freed here one day).
        for conn in [*pool._pool, *(h.conn for h in list(pool.holders.values()))]:
            _detach(conn)
        _abandoned.append(pool)
    # The thread that forked may hold a connection in Django's connection
    # handler (gunicorn --preload, Celery prefork): forget it there.
    from django.db import connections

    from .base import DatabaseWrapper

    for wrapper in connections.all(initialized_only=True):
        pooled = isinstance(wrapper, DatabaseWrapper) and wrapper.is_pooled
        if pooled and wrapper.connection is not None:
            _detach(wrapper.connection)
            wrapper.connection = None


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(close_all)
