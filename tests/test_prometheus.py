"""One metrics pipeline: every output is rendered from the same pool snapshots.

``poolstats`` (text, ``--json``, ``--prometheus``), the admin page's JSON and
the Prometheus view show each figure under one name with one meaning
(``stats.METRICS``); the publishing thread outlives a failure.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client, RequestFactory
from prometheus_client.parser import text_string_to_metric_families

from django_pooled_backend import prometheus, stats
from testproject.launch import wait_for

from .conftest import Wrappers
from .live import fetch, serve, warm_both_workers
from .test_pooling import request_cycle
from .test_stats import SAMPLE_POOL, write_published

P = prometheus.PREFIX
# The text view's column for each figure (all but "requests", which it does not show).
TEXT_COLUMNS = {
    "SIZE": "size",
    "MIN": "min_size",
    "MAX": "max_size",
    "LENT": "lent",
    "PINNED": "pinned",
    "IDLE": "idle",
    "WAITING": "waiting",
    "SERVED": "requests_served",
    "WAITED": "requests_waited",
    "TIMEOUTS": "timeouts",
    "REJECTED": "rejected",
    "OPENED": "connections_opened",
    "CLOSED": "connections_closed",
    "LOST": "connections_lost",
    "ERRORS": "connection_errors",
    "RESETS": "resets",
    "RESET FAILED": "resets_failed",
    "LEAKS": "leaks",
    "RECLAIMS": "reclaims",
}


def metric_values(text: str, pid: int) -> dict[str, float]:
    """{sample name: value} of the pool of ``pid``, parsed with prometheus_client's parser."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("pid") == str(pid) and "stat" not in sample.labels
    }


def text_values(text: str, pid: int) -> dict[str, int]:
    """{snapshot key: figure} from the rows of ``pid`` in the text view's three tables."""
    found: dict[str, int] = {}
    headers: list[str] = []
    for line in text.splitlines():
        cells = re.split(r" {2,}", line.strip())
        if cells[0] == "PID":
            headers = cells
        elif cells[0] == str(pid):
            row = dict(zip(headers, cells, strict=False))
            found.update({key: int(row[h]) for h, key in TEXT_COLUMNS.items() if h in row})
    return found


def test_every_output_shows_each_figure_under_one_name(
    tmp_path: Path, settings: Any, admin_client: Client
) -> None:
    # Every figure different, so that two names swapped would show.
    pool = {**SAMPLE_POOL, **{m.key: 11 + n for n, m in enumerate(stats.METRICS)}}
    assert len({pool[m.key] for m in stats.METRICS}) == len(stats.METRICS)
    pid = os.getppid()  # a live process that is not this one (which publishes too)
    write_published(tmp_path, pid, pool=pool)
    settings.POOLED_BACKEND_STATS_DIR = str(tmp_path)

    document, text, exposition = StringIO(), StringIO(), StringIO()
    call_command("poolstats", "--json", stdout=document)
    call_command("poolstats", stdout=text)
    call_command("poolstats", "--prometheus", stdout=exposition)
    (process,) = json.loads(document.getvalue())["processes"]
    admin_page = admin_client.get("/admin/pools/data.json").json()
    (admin_process,) = admin_page["processes"]
    view = Client().get("/metrics/")
    assert view.status_code == 200
    shown_as_text = text_values(text.getvalue(), pid)
    from_command = metric_values(exposition.getvalue(), pid)
    from_view = metric_values(view.content.decode(), pid)

    assert set(shown_as_text) == {m.key for m in stats.METRICS} - {"requests"}
    for metric in stats.METRICS:
        name = P + metric.name + ("_total" if metric.kind == "counter" else "")
        figure = pool[metric.key]
        assert process["pools"][0][metric.key] == figure, metric
        assert admin_process["pools"][0][metric.key] == figure, metric
        assert shown_as_text.get(metric.key, figure) == figure, metric
        assert from_command[name] == figure, metric
        assert from_view[name] == figure, metric
    # Nothing else carries a pool figure under a name of its own.
    extra = {"oldest_holder_seconds", "oldest_waiter_seconds", "snapshot_age_seconds"}
    assert {n.removeprefix(P).removesuffix("_total") for n in from_command} == {
        m.name for m in stats.METRICS
    } | extra


def test_without_publication_the_view_reports_this_process_from_its_snapshot(
    make_wrapper: Wrappers, settings: Any
) -> None:
    settings.POOLED_BACKEND_STATS_DIR = None
    # One connection at most: no connection is still being opened when read.
    wrapper = make_wrapper("metrics", {"min_size": 1, "max_size": 1})
    request_cycle(wrapper)
    wrapper.ensure_connection()  # lent while the view runs
    try:
        response = prometheus.metrics_view(RequestFactory().get("/metrics/"))
        (published,) = prometheus.local_report().live
        (pool,) = [p for p in published.snapshot["pools"] if p["alias"] == "metrics"]
    finally:
        wrapper.close()
    assert response["Content-Type"].startswith("text/plain")
    values = {
        (sample.name, sample.labels["alias"]): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
        if sample.labels.get("pid") == str(os.getpid()) and "alias" in sample.labels
    }
    assert values[(P + "connections_lent", "metrics")] == pool["lent"] == 1
    assert values[(P + "connections_idle", "metrics")] == pool["idle"] == 0
    assert values[(P + "pool_size", "metrics")] == 1
    assert values[(P + "requests_total", "metrics")] == pool["requests"] == 2
    assert values[(P + "connections_opened_total", "metrics")] == 1


def test_the_publisher_survives_an_exception(
    make_wrapper: Wrappers,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    request_cycle(make_wrapper("survivor", {"min_size": 1, "max_size": 1}))
    real = stats.snapshot_process
    calls: list[int] = []

    def fails_once(*args: Any) -> stats.ProcessSnapshot:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(stats, "snapshot_process", fails_once)
    publisher = stats.Publisher(tmp_path, 0.05)
    with caplog.at_level(logging.WARNING, logger="django_pooled_backend"):
        publisher.start()
        try:
            wait_for(lambda: (tmp_path / f"{stats.HOSTNAME}.{os.getpid()}.json").exists())
        finally:
            publisher.stop()
    assert len(calls) >= 2
    assert "Could not publish pool statistics" in caplog.text
    assert "boom" in caplog.text


@pytest.mark.slow
def test_the_view_reports_every_gunicorn_worker_whichever_serves_it(
    tmp_path: Path, transactional_db: None
) -> None:
    with serve("dpb_prometheus", tmp_path / "stats", max_size=3, workers=2, threads=2) as server:
        workers = warm_both_workers(server)
        assert len(workers) == 2

        def both() -> dict[str, float] | None:
            families = text_string_to_metric_families(fetch(server.port, "/metrics/").decode())
            maxima = {
                s.labels["pid"]: s.value
                for f in families
                if f.name == P + "pool_max_size"
                for s in f.samples
            }
            return maxima if set(maxima) == {str(pid) for pid in workers} else None

        maxima = wait_for(both, what="both workers in /metrics/")
        assert set(maxima.values()) == {3}


def test_prometheus_output_without_prometheus_client_says_what_to_install(
    tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_published(tmp_path, os.getppid())
    settings.POOLED_BACKEND_STATS_DIR = str(tmp_path)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "django_pooled_backend.prometheus")
    with pytest.raises(CommandError, match=r"pip install \"django-pooled-backend\[prometheus\]\""):
        call_command("poolstats", "--prometheus", stdout=StringIO())
