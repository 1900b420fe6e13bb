"""Failover under load: how soon requests succeed again once the standby accepts writes.

A primary and a synchronous hot standby on 127.0.0.1 (``testproject.pgserver``),
``HOST`` listing both with ``target_session_attrs=read-write``; 16 threads
make requests (every other one a write and a read in ``atomic()``, the others
a read), each request opening and closing its Django connection as a
request does.  Then the primary is stopped as in a crash (``pg_ctl stop -m
immediate``), the standby is promoted a moment later, and the load goes on.

Measured for each way of connecting (this ENGINE, Django's own pool with
and without ``CONN_HEALTH_CHECKS``, no pool), from the moment the promoted
standby is seen accepting writes:

* ``first``: until the first request succeeds;
* ``all``: until every thread has had a request succeed after its last failure;

and checked: every write a request saw committed is on the new primary,
and every failure is a ``django.db.OperationalError``.  Usage::

    .venv/bin/python bench/failover.py [--runs 3] [--engines pooled,django-pool,no-pool]

The load driver (:class:`Load`) is also what ``tests/test_failover.py`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testproject import pgserver  # noqa: E402

DATABASE = "failover"
# The pair's data directories (removed after each run).
BASE_DIR = pgserver.DEFAULT_DATA_DIR.parent / "failover-bench"
TABLE = "failover_writes"
THREADS = 16
MAX_SIZE = 4
POOL_TIMEOUT = 5.0
# libpq's own per-host connection timeout (seconds, whole numbers): a host
# that does not answer costs this much before the next one is tried.
CONNECT_TIMEOUT = 2
# Between two requests of one thread: a steady load, not a saturated CPU.
THINK = 0.005

ENGINES = ("pooled", "django-pool", "django-pool-checks", "no-pool")


def settings_for(
    engine: str, pair: pgserver.Pair, *, alias: str, pool: Any = None
) -> dict[str, Any]:
    """A ``DATABASES`` entry for ``engine`` on ``pair`` (both hosts, read-write target).

    ``pool``: this ENGINE's pool options, instead of the benchmark's.
    """
    options: dict[str, Any] = {
        "target_session_attrs": "read-write",
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": f"failover-bench {alias}",
    }
    entry: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": DATABASE,
        "USER": pair.primary.user,
        "PASSWORD": pair.primary.password,
        "HOST": pair.host,
        "PORT": pair.port,
        "OPTIONS": options,
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": engine == "django-pool-checks",
    }
    if engine == "pooled":
        entry["ENGINE"] = "django_pooled_backend"
        options["pool"] = pool or {
            "min_size": MAX_SIZE,
            "max_size": MAX_SIZE,
            "timeout": POOL_TIMEOUT,
        }
    elif engine in ("django-pool", "django-pool-checks"):
        options["pool"] = {"min_size": MAX_SIZE, "max_size": MAX_SIZE, "timeout": POOL_TIMEOUT}
    elif engine != "no-pool":
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    from django.db.utils import ConnectionHandler

    # Django's defaults for the keys not given (it wants a "default" alias).
    configured: dict[str, Any] = ConnectionHandler().configure_settings(
        {"default": {}, alias: entry}
    )[alias]
    return configured


def prepare(pair: pgserver.Pair) -> None:
    """Create the database and table of the load on the primary."""
    import psycopg

    pgserver.ensure_database(pair.primary, DATABASE)
    with psycopg.connect(pair.primary.dsn(DATABASE), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (key text PRIMARY KEY)")


@dataclass
class Result:
    """One request."""

    thread: int
    started: float
    ended: float
    write_key: str | None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Load:
    """``threads`` threads making requests on ``alias`` until stopped."""

    settings_dict: dict[str, Any]
    alias: str
    threads: int = THREADS
    think: float = THINK
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    wrappers: list[Any] = field(default_factory=list)

    def start(self) -> None:
        for index in range(self.threads):
            worker = threading.Thread(
                target=self._run, args=(index,), name=f"failover-load-{index}", daemon=True
            )
            self._workers.append(worker)
            worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout)
        alive = [w.name for w in self._workers if w.is_alive()]
        if alive:
            raise RuntimeError(f"load threads still running after {timeout}s: {alive}")

    def _run(self, index: int) -> None:
        from django.db import connections
        from django.utils.module_loading import import_string

        backend = import_string(f"{self.settings_dict['ENGINE']}.base.DatabaseWrapper")
        wrapper = backend(self.settings_dict, self.alias)
        self.wrappers.append(wrapper)
        # Django's transaction.atomic(using=alias) finds it (this thread only).
        connections[self.alias] = wrapper
        try:
            n = 0
            while not self._stop.is_set():
                self.results.append(self._request(wrapper, index, n))
                n += 1
                time.sleep(self.think)
        finally:
            wrapper.close()
            del connections[self.alias]

    def _request(self, wrapper: Any, index: int, n: int) -> Result:
        from django.db import transaction

        key = f"{index}-{n}" if n % 2 == 0 else None
        started = time.monotonic()
        error: BaseException | None = None
        # What Django's request_started and request_finished signals do.
        wrapper.close_if_unusable_or_obsolete()
        try:
            if key is not None:
                with transaction.atomic(using=self.alias), wrapper.cursor() as cursor:
                    cursor.execute(f"INSERT INTO {TABLE} (key) VALUES (%s)", [key])
                    cursor.execute(f"SELECT count(*) FROM {TABLE} WHERE key = %s", [key])
                    cursor.fetchone()
            else:
                with wrapper.cursor() as cursor:
                    cursor.execute("SELECT pg_is_in_recovery()")
                    cursor.fetchone()
        except Exception as exc:  # noqa: BLE001 - counted and classified by the caller
            error = exc
        finally:
            try:
                wrapper.close_if_unusable_or_obsolete()
            except Exception as exc:  # noqa: BLE001
                error = error or exc
        return Result(index, started, time.monotonic(), key, error)


def watch_writable(server: pgserver.Server, found: list[float], stop: threading.Event) -> None:
    """Note (in ``found``) when ``server`` first accepts writes: the send time of the first
    ``pg_is_in_recovery()`` that says false, polled every 5 ms."""
    import psycopg

    with psycopg.connect(server.dsn(DATABASE), autocommit=True) as conn:
        while not stop.is_set():
            sent = time.monotonic()
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is not None and row[0] is False:
                found.append(sent)
                return
            time.sleep(0.005)


@dataclass
class Failover:
    """What one failover run saw."""

    engine: str
    results: list[Result]
    stopped_at: float
    writable_at: float
    acknowledged: set[str]
    committed: set[str]
    pool_timeout: float
    # The promoted standby's port.
    standby_port: int

    @property
    def lost(self) -> set[str]:
        """Writes a request saw committed that the new primary does not have."""
        return self.acknowledged - self.committed

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def error_kinds(self) -> Counter[str]:
        return Counter(
            f"{type(r.error).__module__}.{type(r.error).__qualname__}" for r in self.failures
        )

    @property
    def first_success(self) -> float | None:
        """Seconds from writable to the end of the first request that succeeded after it."""
        ends = [r.ended for r in self.results if r.ok and r.ended > self.writable_at]
        return min(ends) - self.writable_at if ends else None

    @property
    def all_succeed(self) -> float | None:
        """Seconds from writable until every thread had a success after its last failure."""
        worst = 0.0
        for thread in {r.thread for r in self.results}:
            mine = sorted((r for r in self.results if r.thread == thread), key=lambda r: r.started)
            last_failure = max(
                (r.ended for r in mine if not r.ok),
                default=self.stopped_at,
            )
            after = [
                r.ended
                for r in mine
                if r.ok and r.started >= last_failure and r.ended > self.writable_at
            ]
            if not after:
                return None
            worst = max(worst, min(after) - self.writable_at)
        return worst

    @property
    def longest_failure(self) -> float:
        """The longest a failed request took (seconds)."""
        return max((r.ended - r.started for r in self.failures), default=0.0)

    @property
    def slowest(self) -> float:
        """The longest any request took, failed or not (seconds): a borrow that waits
        through the outage succeeds late instead of failing."""
        return max((r.ended - r.started for r in self.results), default=0.0)

    @property
    def requests_after(self) -> int:
        return sum(1 for r in self.results if r.started > self.writable_at)


def run_failover(
    engine: str,
    base_dir: Path,
    *,
    alias: str = "failover",
    warmup: float = 1.0,
    outage: float = 1.0,
    after: float = 4.0,
    stop_mode: str = "immediate",
    pool: Any = None,
    on_pool: Callable[[Any], None] | None = None,
) -> Failover:
    """One failover under load with ``engine``, on a fresh pair in ``base_dir``.

    ``on_pool(wrapper)`` is called with one of the load's Django connections
    once the load has stopped, before the pool closes.
    """
    import psycopg

    pair = pgserver.start_pair(base_dir)
    try:
        prepare(pair)
        load = Load(settings_for(engine, pair, alias=alias, pool=pool), alias)
        load.start()
        try:
            time.sleep(warmup)
            stopped_at = time.monotonic()
            pgserver.stop_primary(pair, mode=stop_mode)
            time.sleep(outage)
            found: list[float] = []
            done = threading.Event()
            watcher = threading.Thread(
                target=watch_writable, args=(pair.standby, found, done), daemon=True
            )
            watcher.start()
            pgserver.promote(pair.standby)
            watcher.join(30)
            done.set()
            if not found:
                raise RuntimeError("the promoted standby was never seen accepting writes")
            time.sleep(after)
        finally:
            load.stop()
        try:
            if on_pool is not None and load.wrappers:
                on_pool(load.wrappers[0])
        finally:
            if engine != "no-pool" and load.wrappers:
                load.wrappers[0].close_pool()
        with psycopg.connect(pair.standby.dsn(DATABASE), autocommit=True) as conn:
            committed = {key for (key,) in conn.execute(f"SELECT key FROM {TABLE}")}
    finally:
        pgserver.stop_pair(pair)
    acknowledged = {r.write_key for r in load.results if r.ok and r.write_key is not None}
    return Failover(
        engine=engine,
        results=list(load.results),
        stopped_at=stopped_at,
        writable_at=found[0],
        acknowledged=acknowledged,
        committed=committed,
        pool_timeout=POOL_TIMEOUT,
        standby_port=pair.standby.port,
    )


def _setup_django() -> None:
    import logging

    import django
    from django.conf import settings

    # psycopg_pool warns of every failed attempt during the outage: expected here.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger("django_pooled_backend").setLevel(logging.ERROR)

    if not settings.configured:
        settings.configure(
            USE_TZ=True, TIME_ZONE="UTC", INSTALLED_APPS=[], DATABASES={}, LOGGING_CONFIG=None
        )
    django.setup()


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/failover.py", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--outage", type=float, default=1.0, help="seconds before promotion")
    parser.add_argument("--after", type=float, default=8.0, help="seconds of load after it")
    parser.add_argument("--stop-mode", default="immediate", choices=["immediate", "fast"])
    args = parser.parse_args(argv)
    _setup_django()
    engines = [e for e in args.engines.split(",") if e]
    print(
        f"{THREADS} threads, max_size {MAX_SIZE}, pool timeout {POOL_TIMEOUT:g}s, "
        f"outage {args.outage:g}s (pg_ctl stop -m {args.stop_mode}, then promote), "
        f"{args.runs} run(s) each; times from the standby accepting writes"
    )
    summary: dict[str, list[Failover]] = {}
    for run in range(args.runs):
        for engine in engines:
            result = run_failover(
                engine,
                BASE_DIR,
                alias=f"failover_{engine.replace('-', '_')}_{run}",
                outage=args.outage,
                after=args.after,
                stop_mode=args.stop_mode,
            )
            summary.setdefault(engine, []).append(result)
            kinds = ", ".join(f"{n} {k}" for k, n in result.error_kinds().most_common())
            print(
                f"run {run + 1} {engine:19} first {_fmt(result.first_success):>7}  "
                f"all {_fmt(result.all_succeed):>7}  requests {len(result.results):5}  "
                f"failed {len(result.failures):4} (longest {result.longest_failure:.2f}s)  "
                f"slowest {result.slowest:.2f}s  "
                f"acked writes {len(result.acknowledged):4} lost {len(result.lost)}  "
                f"[{kinds}]",
                flush=True,
            )
    print()
    print(
        f"{'engine':19} {'first (median)':>15} {'all (median)':>13} {'all (worst)':>12} "
        f"{'failed (median)':>16} {'slowest (worst)':>16}"
    )
    for engine, runs in summary.items():
        alls = [r.all_succeed for r in runs]
        worst = None if None in alls else max(a for a in alls if a is not None)
        failed = statistics.median(len(r.failures) for r in runs)
        slowest = max(r.slowest for r in runs)
        print(
            f"{engine:19} {_fmt(_median([r.first_success for r in runs])):>15} "
            f"{_fmt(_median(alls)):>13} {_fmt(worst):>12} {failed:>16g} {slowest:>15.2f}s"
        )
    return 0


def _median(values: list[float | None]) -> float | None:
    if any(v is None for v in values):
        return None
    return statistics.median(v for v in values if v is not None)


if __name__ == "__main__":
    sys.exit(main())
