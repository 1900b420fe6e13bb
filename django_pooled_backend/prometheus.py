"""Pool metrics for Prometheus: ``pip install "django-pooled-backend[prometheus]"``.

Mount :func:`metrics_view` in the URLconf::

    from django_pooled_backend.prometheus import metrics_view

    urlpatterns = [..., path("metrics/pool/", metrics_view)]

In one process (``runserver``, one gunicorn worker) the view reports the
pools of the process that serves it.  Under gunicorn's (or uWSGI's) several
worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode): each process then writes its pools' numbers to that
directory every ``POOLED_BACKEND_PROMETHEUS_INTERVAL`` seconds (default 5)
from a daemon thread, and right before it serves the view; the view reports
them summed over the live processes.  See ``docs/metrics.rst``.

The numbers come from :func:`local_snapshots`, one
:class:`PoolSnapshot` per pool of the current process; the collector and
the publisher take any function with that signature.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypedDict

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from . import registry, signals

PREFIX = "django_pooled_backend_"


class PoolSnapshot(TypedDict):
    """One pool of the current process, at one moment."""

    alias: str
    name: str
    pid: int
    min: int
    max: int
    size: int
    idle: int
    lent: int
    waiting: int
    stats: dict[str, int]
    """psycopg_pool's ``get_stats()``: counters since the pool opened."""


Snapshots = Callable[[], Iterable[PoolSnapshot]]


def local_snapshots() -> list[PoolSnapshot]:
    """A :class:`PoolSnapshot` of every pool of this process."""
    snapshots: list[PoolSnapshot] = []
    pid = os.getpid()
    for pool in registry.all_pools():
        state = pool.state()
        snapshots.append(
            PoolSnapshot(
                alias=pool.alias,
                name=pool.name,
                pid=pid,
                min=state["min"],
                max=state["max"],
                size=state["size"],
                idle=state["idle"],
                lent=state["lent"],
                waiting=state["waiting"],
                stats=dict(pool.get_stats()),
            )
        )
    return snapshots


# (metric name, snapshot key, help)
GAUGES = (
    ("pool_size", "size", "Server connections the pool has open."),
    ("pool_idle", "idle", "Open connections waiting in the pool."),
    ("pool_lent", "lent", "Open connections lent to a thread (a request)."),
    ("pool_waiting", "waiting", "Threads waiting for a connection."),
    ("pool_min_size", "min", "The pool's min_size."),
    ("pool_max_size", "max", "The pool's max_size."),
)
# (metric name without _total, psycopg_pool get_stats() key, scale, help)
COUNTERS = (
    ("requests", "requests_num", 1, "Connections asked for."),
    ("requests_queued", "requests_queued", 1, "Requests that had to wait for a connection."),
    (
        "requests_wait_seconds",
        "requests_wait_ms",
        1000,
        "Time requests spent waiting for a connection.",
    ),
    ("requests_errors", "requests_errors", 1, "Requests that timed out or were refused."),
    ("returns_bad", "returns_bad", 1, "Connections returned broken."),
    ("connections_opened", "connections_num", 1, "Server connections opened (attempts)."),
    ("connections_open_seconds", "connections_ms", 1000, "Time spent opening connections."),
    ("connections_errors", "connections_errors", 1, "Server connections that failed to open."),
    ("connections_lost", "connections_lost", 1, "Connections found broken when checked."),
)


def _by_alias(snapshots: Iterable[PoolSnapshot]) -> dict[str, dict[str, float]]:
    """Gauges and scaled counters per alias (summed if an alias has several pools)."""
    totals: dict[str, dict[str, float]] = {}
    for snap in snapshots:
        values = totals.setdefault(snap["alias"], {})
        for _metric, key, _help in GAUGES:
            values[key] = values.get(key, 0) + snap[key]  # type: ignore[literal-required]
        for metric, key, scale, _help in COUNTERS:
            values[metric] = values.get(metric, 0) + snap["stats"].get(key, 0) / scale
    return totals


class PoolCollector(Collector):
    """Reports the pools of the current process when scraped (single-process mode).

    Register it in a registry of your own, or in prometheus_client's
    default one to add the pools to an existing ``/metrics``::

        prometheus_client.REGISTRY.register(PoolCollector())
    """

    def __init__(self, snapshots: Snapshots = local_snapshots) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        totals = _by_alias(self.snapshots())
        for metric, key, doc in GAUGES:
            gauge = GaugeMetricFamily(PREFIX + metric, doc, labels=["alias"])
            for alias, values in sorted(totals.items()):
                gauge.add_metric([alias], values[key])
            yield gauge
        for metric, _key, _scale, doc in COUNTERS:
            counter = CounterMetricFamily(PREFIX + metric, doc, labels=["alias"])
            for alias, values in sorted(totals.items()):
                counter.add_metric([alias], values[metric])
            yield counter


# -- multiprocess mode -------------------------------------------------------


def multiprocess_dir() -> str | None:
    """prometheus_client's multiprocess directory, if that mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Publisher:
    """Writes this process' pool numbers to prometheus_client's multiprocess files.

    Gauges use the ``livesum`` mode: the view shows their sum over the live
    processes (gunicorn must call ``prometheus_client.multiprocess.
    mark_process_dead(worker.pid)`` in its ``child_exit`` hook).  Counters
    are summed over every process that ever ran, as Prometheus expects.
    """

    def __init__(self, snapshots: Snapshots = local_snapshots) -> None:
        self.snapshots = snapshots
        self.lock = threading.Lock()
        self.gauges = {
            metric: Gauge(
                PREFIX + metric, doc, ["alias"], multiprocess_mode="livesum", registry=None
            )
            for metric, _key, doc in GAUGES
        }
        self.counters = {
            metric: Counter(PREFIX + metric, doc, ["alias"], registry=None)
            for metric, _key, _scale, doc in COUNTERS
        }
        self.last: dict[tuple[str, str], float] = {}
        self.aliases: set[str] = set()

    def publish(self) -> None:
        """Write the current numbers."""
        with self.lock:
            totals = _by_alias(self.snapshots())
            # A pool that went away (closed, replaced) counts as empty.
            for alias in self.aliases - totals.keys():
                for metric, _key, _doc in GAUGES:
                    self.gauges[metric].labels(alias).set(0)
            self.aliases |= totals.keys()
            for alias, values in totals.items():
                for metric, key, _doc in GAUGES:
                    self.gauges[metric].labels(alias).set(values[key])
                for metric, _key, _scale, _doc in COUNTERS:
                    value = values[metric]
                    before = self.last.get((alias, metric), 0.0)
                    # A new pool for the alias starts its counters from zero.
                    increase = value - before if value >= before else value
                    if increase > 0:
                        self.counters[metric].labels(alias).inc(increase)
                    self.last[(alias, metric)] = value


_publisher: Publisher | None = None
_publisher_pid = 0
_publisher_lock = threading.Lock()


def publisher() -> Publisher:
    """This process' :class:`Publisher`, with its thread running (multiprocess mode)."""
    global _publisher, _publisher_pid
    with _publisher_lock:
        if _publisher is None or _publisher_pid != os.getpid():
            # First use in this process (or in a forked child, whose copy of
            # the parent's thread does not run).
            _publisher = Publisher()
            _publisher_pid = os.getpid()
            thread = threading.Thread(
                target=_publish_forever,
                args=(_publisher, _publisher_pid),
                name="django_pooled_backend prometheus",
                daemon=True,
            )
            thread.start()
        return _publisher


def _publish_forever(publisher: Publisher, pid: int) -> None:
    interval = float(getattr(settings, "POOLED_BACKEND_PROMETHEUS_INTERVAL", 5.0))
    while pid == os.getpid():
        publisher.publish()
        time.sleep(interval)


def _on_connection_opened(sender: Any, **kwargs: Any) -> None:
    # A pool opening connections in a process: make sure it is published.
    if multiprocess_dir() and (_publisher is None or _publisher_pid != os.getpid()):
        publisher()


signals.connection_opened.connect(_on_connection_opened, dispatch_uid=__name__)


class WrittenFilesCollector(Collector):
    """prometheus_client's ``MultiProcessCollector``, but for files still being created.

    A process creates its metrics file empty and sizes it a moment later;
    ``MultiProcessCollector`` fails on an empty file (``struct.error``,
    prometheus/client_python#1199), and so the whole scrape did when a
    worker published its first figures at that moment.  Such a file holds
    nothing yet: it is skipped.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterable[Metric]:
        files = []
        for name in glob.glob(os.path.join(self.path, "*.db")):
            try:
                if os.path.getsize(name) > 0:
                    files.append(name)
            except OSError:  # removed meanwhile (mark_process_dead)
                continue
        return MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-any-return,no-untyped-call]


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The pool metrics in Prometheus' text format."""
    registry_ = CollectorRegistry()
    directory = multiprocess_dir()
    if directory:
        publisher().publish()
        registry_.register(WrittenFilesCollector(directory))
    else:
        registry_.register(PoolCollector())
    return HttpResponse(generate_latest(registry_), content_type=CONTENT_TYPE_LATEST)
