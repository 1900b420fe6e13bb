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
import time
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
            stale = [_retire(_pools.pop(k)) for k in list(_pools) if k[0] == key[0]]
            _pools[key] = pool
            _start_housekeeper()
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
        pools = [_retire(_pools.pop(key)) for key in keys]
    for pool in pools:
        pool.close(timeout=timeout)


def close_database(
    dbname: str, host: str | None, port: str | int | None, timeout: float = 5.0
) -> list[str]:
    """Close every pool, of any alias, whose connections go to ``dbname`` on ``host:port``.

    Before a database is dropped or used as a template (test databases),
    no pool may keep connections to it: the server refuses both while
    anyone is connected.  The pools of other aliases count too (a copy of
    an alias' settings under another name has a pool of its own).  Returns
    the names of the pools closed.
    """

    def goes_there(pool: DjangoConnectionPool) -> bool:
        kwargs = pool.connect_kwargs
        return (
            kwargs.get("dbname") == dbname
            and (kwargs.get("host") or "") == (host or "")
            and str(kwargs.get("port") or "") == str(port or "")
        )

    with _lock:
        keys = [key for key, pool in _pools.items() if goes_there(pool)]
        pools = [_retire(_pools.pop(key)) for key in keys]
    for pool in pools:
        pool.close(timeout=timeout)
    return [pool.name for pool in pools]


def close_all(timeout: float = 5.0) -> None:
    """Close every pool of this process; lent-out connections close on return."""
    with _lock:
        pools = [_retire(pool) for pool in _pools.values()]
        _pools.clear()
    for pool in pools:
        pool.close(timeout=timeout)


def _retire(pool: DjangoConnectionPool) -> DjangoConnectionPool:
    """Mark ``pool`` as no longer handed out (see ``DjangoConnectionPool.retired``)."""
    pool.retired = True
    return pool


HOUSEKEEPING_INTERVAL = 0.5
_housekeeper: threading.Thread | None = None
_wake = threading.Event()


def wake_housekeeper() -> None:
    """Ask the housekeeping thread to run now rather than at its next tick."""
    _wake.set()


def _start_housekeeper() -> None:
    # Called with _lock held.
    global _housekeeper
    if _housekeeper is None or not _housekeeper.is_alive():
        _housekeeper = threading.Thread(
            target=_housekeep_forever, name="django_pooled_backend housekeeping", daemon=True
        )
        _housekeeper.start()


def _housekeep_forever() -> None:
    """Reclaim connections of dead borrowers and report leaks, twice a second."""
    while True:
        _wake.wait(HOUSEKEEPING_INTERVAL)
        _wake.clear()
        now = time.monotonic()
        for pool in list(_pools.values()):
            try:
                pool.housekeep(now)
            except Exception:
                logger.exception("Housekeeping of pool %r failed.", pool.name)


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
    global _lock, _housekeeper
    _lock = threading.Lock()
    # Threads do not survive fork(): the child starts its own when it needs one.
    _housekeeper = None
    pools = [_retire(pool) for pool in _pools.values()]
    _pools.clear()
    for pool in pools:
        for conn in pool.connections():
            _detach(conn)
        # Lent-out connections: the Django connection objects holding them
        # (the forking thread's, as with gunicorn --preload or Celery
        # prefork, and other threads' that do not exist in the child) must
        # forget them, so that the child's next query opens its own.
        for holder in list(pool.holders.values()):
            owner = None if holder.owner is None else holder.owner()
            if owner is not None and owner.connection is holder.conn:
                owner.connection = None
        _abandoned.append(pool)


stats.use_pools(all_pools)
os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(close_all)
