"""Pool metrics for Prometheus: ``pip install "django-pooled-backend[prometheus]"``.

Mount :func:`metrics_view` in the URLconf::

    from django_pooled_backend.prometheus import metrics_view

    urlpatterns = [..., path("metrics/pool/", metrics_view)]

Nothing here keeps figures of its own: every metric is a field of the pool
snapshots of :mod:`django_pooled_backend.stats`, the ones ``manage.py
poolstats`` (text, ``--json``) and the admin page show, under one name
(``stats.METRICS``), rendered with prometheus_client's own exposition.  The
view reports every process of the project on this host that publishes its
pools (every gunicorn worker, whichever one serves the scrape), the serving
process' own figures published afresh first; with publication off
(``POOLED_BACKEND_STATS_DIR = None``), the pools of the serving process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import cast

from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import poolstats, registry, stats

PREFIX = "django_pooled_backend_"


Figures = dict[str, float]
WAIT_STATS = ("mean", "p95", "p99", "max")
POOL_LABELS = ("host", "pid", "alias")


def local_report() -> poolstats.Report:
    """The pools of this process alone, as a report of one live process."""
    pools = [pool for pool in registry.all_pools() if not pool.closed]
    snapshot = stats.snapshot_process(pools)
    report = poolstats.Report(directory=None, alias=None, time=time.time())
    if pools:
        report.live.append(stats.Published(snapshot, 0.0, False))
    return report


def published_report() -> poolstats.Report:
    """Every publishing process of this project on this host (this one up to date first).

    With publication off, :func:`local_report`.
    """
    try:
        directory = poolstats.stats_directory()
    except poolstats.NotPublished:
        return local_report()
    current = stats.publisher()
    if current is not None:
        # The serving process' figures as of now; a failure is the
        # publisher's to report, and the previous snapshot still counts.
        with contextlib.suppress(OSError):
            current.publish()
    return poolstats.load(directory)


class PoolCollector(Collector):
    """The pool snapshots of a :class:`~django_pooled_backend.poolstats.Report` as metrics.

    By default, the pools of the current process: register it in
    prometheus_client's default registry to add them to an existing
    ``/metrics``::

        prometheus_client.REGISTRY.register(PoolCollector())
    """

    def __init__(self, report: Callable[[], poolstats.Report] = local_report) -> None:
        self.report = report

    def collect(self) -> Iterator[Metric]:
        report = self.report()
        rows = list(report.rows())
        processes = GaugeMetricFamily(
            PREFIX + "processes",
            "Processes publishing pool statistics, live or stale.",
            labels=["state"],
        )
        processes.add_metric(["live"], len(report.live))
        processes.add_metric(["stale"], len(report.stale))
        yield processes
        age = GaugeMetricFamily(
            PREFIX + "snapshot_age_seconds",
            "Seconds since each process last published its pools.",
            labels=["host", "pid", "stale"],
        )
        for p in [*report.live, *report.stale]:
            snap = p.snapshot
            labels = [snap["host"], str(snap["pid"]), str(p.stale).lower()]
            age.add_metric(labels, round(p.age, 3))
        yield age

        def family(metric: stats.PoolMetric) -> GaugeMetricFamily | CounterMetricFamily:
            kind = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
            return kind(PREFIX + metric.name, metric.help, labels=list(POOL_LABELS))

        for metric in stats.METRICS:
            figures = family(metric)
            for p, pool in rows:
                # .get(): a snapshot of an older release may lack a newer figure.
                figures.add_metric(_labels(p, pool), cast(Figures, pool).get(metric.key, 0))
            yield figures
        wait = GaugeMetricFamily(
            PREFIX + "wait_recent_seconds",
            f"Time to get a connection over the last {stats.WAIT_WINDOW} borrows "
            "(mean, p95, p99, max).",
            labels=[*POOL_LABELS, "stat"],
        )
        holder = GaugeMetricFamily(
            PREFIX + "oldest_holder_seconds",
            "How long the longest current borrower has held its connection (0: none).",
            labels=list(POOL_LABELS),
        )
        servers = GaugeMetricFamily(
            PREFIX + "server_connections",
            "Connections of the pool on each server (host:port, primary or standby).",
            labels=[*POOL_LABELS, "server", "role"],
        )
        waiter = GaugeMetricFamily(
            PREFIX + "oldest_waiter_seconds",
            "How long the longest current waiter has waited (0: none).",
            labels=list(POOL_LABELS),
        )
        for p, pool in rows:
            if pool["wait"]["window"]:
                for stat in WAIT_STATS:
                    ms = pool["wait"][f"{stat}_ms"]  # type: ignore[literal-required]
                    wait.add_metric([*_labels(p, pool), stat], round(ms / 1000, 6))
            oldest = pool["oldest_holder"]
            holder.add_metric(_labels(p, pool), oldest["held_s"] if oldest else 0)
            waiter.add_metric(_labels(p, pool), pool["oldest_waiter_s"] or 0)
            for server in pool.get("servers", []):
                port = server["port"]
                address = server["host"] if port is None else f"{server['host']}:{port}"
                servers.add_metric(
                    [*_labels(p, pool), address, server["role"]], server["connections"]
                )
        yield from (wait, holder, waiter, servers)


def _labels(published: stats.Published, pool: stats.PoolSnapshot) -> list[str]:
    snap = published.snapshot
    return [snap["host"], str(snap["pid"]), pool["alias"]]


def render(report: poolstats.Report) -> str:
    """The Prometheus text exposition format of ``report`` (``poolstats --prometheus``)."""
    registry_ = CollectorRegistry()
    registry_.register(PoolCollector(lambda: report))
    return generate_latest(registry_).decode()


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The pools of every publishing process of this project (:func:`published_report`)."""
    registry_ = CollectorRegistry()
    registry_.register(PoolCollector(published_report))
    return HttpResponse(generate_latest(registry_), content_type=CONTENT_TYPE_LATEST)
