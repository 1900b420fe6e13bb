"""The requests, the threads that send them, and what is measured while they run.

A request is what Django's WSGI handler does around a view: send
``request_started`` (which closes obsolete connections), run the view, send
``request_finished`` (which closes or gives back the connection).  Each cell
(one strategy, one workload, T threads) starts T fresh threads, lets them
warm up (connections opened, pools filled), then counts the requests they
complete during the measured window.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from django.core.signals import request_finished, request_started
from django.db import connections, transaction
from django.db.models import F

from .strategies import Strategy


class BenchHandler:
    """Stands for Django's WSGIHandler as the sender of the request signals."""


ENVIRON = {"REQUEST_METHOD": "GET", "PATH_INFO": "/bench/"}
IO_WAIT = 0.020


def _item_model() -> Any:
    from testproject.shop.models import Item

    return Item


def view_read(alias: str, pk: int) -> None:
    """(a) An ORM get by primary key."""
    _item_model().objects.using(alias).get(pk=pk)


def view_write(alias: str, pk: int) -> None:
    """(b) The same get, then an update in ``atomic()``."""
    item_model = _item_model()
    item_model.objects.using(alias).get(pk=pk)
    with transaction.atomic(using=alias):
        item_model.objects.using(alias).filter(pk=pk).update(quantity=F("quantity") + 1)


def view_io(alias: str, pk: int) -> None:
    """(c) A query, 20 ms of waiting on something that is not the database, a query."""
    item_model = _item_model()
    item_model.objects.using(alias).get(pk=pk)
    time.sleep(IO_WAIT)
    item_model.objects.using(alias).get(pk=pk)


@dataclass(frozen=True)
class Workload:
    key: str
    description: str
    view: Callable[[str, int], None]


WORKLOADS = {
    w.key: w
    for w in (
        Workload("a", "request: get by primary key", view_read),
        Workload("b", "request: get, then an update in atomic()", view_write),
        Workload("c", "I/O-heavy request: get, 20 ms sleep, get", view_io),
    )
}


def request(view: Callable[[str, int], None], alias: str, pk: int) -> None:
    """One request through Django's request signals, as the WSGI handler sends them."""
    request_started.send(sender=BenchHandler, environ=ENVIRON)
    try:
        view(alias, pk)
    finally:
        request_finished.send(sender=BenchHandler)


class ServerSampler(threading.Thread):
    """Samples a strategy's server connections from pg_stat_activity, keeps the peak."""

    def __init__(self, dsn: str, pattern: str, interval: float = 0.05) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.dsn, self.pattern, self.interval = dsn, pattern, interval
        self.peak = 0
        self.stop_event = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="bench sampler") as conn:
            self.ready.set()
            while not self.stop_event.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
                    [self.pattern],
                ).fetchone()
                self.peak = max(self.peak, row[0] if row else 0)
                self.stop_event.wait(self.interval)

    def stop(self) -> int:
        self.stop_event.set()
        self.join(timeout=10)
        return self.peak


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of an ordered list, nearest rank."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def run_cell(
    strategy: Strategy,
    workload: Workload,
    threads: int,
    *,
    warmup: float,
    seconds: float,
    items: int,
    sample_dsn: str,
    seed: int,
) -> dict[str, Any]:
    """Run one cell and return its measurements."""
    alias = strategy.name
    barrier = threading.Barrier(threads + 1)
    window: list[float] = []
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[int] = [0] * threads
    first_error: list[str] = []

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        done = latencies[n]
        try:
            barrier.wait()
            start, end = window
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    break
                try:
                    request(workload.view, alias, rng.randint(1, items))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors[n] += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                    time.sleep(0.01)
                    continue
                t1 = time.perf_counter()
                if start <= t1 <= end:
                    done.append(t1 - t0)
        finally:
            try:
                connections[alias].close()
            except Exception as exc:  # noqa: BLE001 - reported, never hides the run
                if not first_error:
                    first_error.append(f"on close: {type(exc).__name__}: {exc}"[:300])

    sampler = ServerSampler(sample_dsn, strategy.server_name_pattern)
    sampler.start()
    sampler.ready.wait(10)
    workers = [
        threading.Thread(target=worker, args=(n,), name=f"bench-{n}", daemon=True)
        for n in range(threads)
    ]
    for t in workers:
        t.start()
    now = time.perf_counter()
    window.extend([now + warmup, now + warmup + seconds])
    barrier.wait()
    for t in workers:
        t.join(timeout=warmup + seconds + 120)
    peak = sampler.stop()

    merged = sorted(x for per_thread in latencies for x in per_thread)
    count = len(merged)
    return {
        "strategy": strategy.name,
        "workload": workload.key,
        "threads": threads,
        "requests": count,
        "rps": count / seconds,
        "mean_ms": 1000 * sum(merged) / count if count else float("nan"),
        "p50_ms": 1000 * percentile(merged, 0.50),
        "p99_ms": 1000 * percentile(merged, 0.99),
        "peak_server_connections": peak,
        "errors": sum(errors),
        "first_error": first_error[0] if first_error else None,
        "threads_progressed": sum(1 for per_thread in latencies if per_thread),
        "hung_threads": sum(1 for t in workers if t.is_alive()),
    }
