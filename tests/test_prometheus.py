"""Prometheus metrics: in one process, and summed over gunicorn's worker processes."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import RequestFactory
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from django_pooled_backend import prometheus
from testproject import launch
from testproject.launch import wait_for

from .conftest import Wrappers
from .test_pooling import request_cycle

ROOT = Path(__file__).resolve().parent.parent
P = prometheus.PREFIX


def samples(text: str) -> dict[tuple[str, str], float]:
    """{(sample name, alias): value} parsed with prometheus_client's own parser."""
    return {
        (sample.name, sample.labels.get("alias", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def snapshot(alias: str, **values: Any) -> prometheus.PoolSnapshot:
    base: dict[str, Any] = {"alias": alias, "name": alias, "pid": 1, "min": 1, "max": 4}
    base.update(size=2, idle=1, lent=1, waiting=0, stats={})
    base.update(values)
    return prometheus.PoolSnapshot(**base)  # type: ignore[typeddict-item]


def test_the_view_reports_this_process_pools_from_the_server(
    make_wrapper: Wrappers, transactional_db: None
) -> None:
    # One connection at most: no connection is still being opened when read.
    wrapper = make_wrapper("metrics", {"min_size": 1, "max_size": 1})
    request_cycle(wrapper)
    wrapper.ensure_connection()  # lent while the view runs
    try:
        response = prometheus.metrics_view(RequestFactory().get("/metrics/"))
    finally:
        wrapper.close()
    assert response["Content-Type"].startswith("text/plain")
    values = samples(response.content.decode())
    assert values[(P + "pool_lent", "metrics")] == 1
    assert values[(P + "pool_size", "metrics")] == 1
    assert values[(P + "pool_idle", "metrics")] == 0
    assert values[(P + "pool_max_size", "metrics")] == 1
    assert values[(P + "pool_min_size", "metrics")] == 1
    assert values[(P + "requests_total", "metrics")] == 2
    assert values[(P + "connections_opened_total", "metrics")] == 1


def test_local_snapshots_describe_every_pool_of_the_process(
    make_wrapper: Wrappers, transactional_db: None
) -> None:
    wrapper = make_wrapper("metrics", {"min_size": 1, "max_size": 1})
    request_cycle(wrapper)
    (snap,) = [s for s in prometheus.local_snapshots() if s["alias"] == "metrics"]
    assert snap["pid"] == os.getpid()
    assert (snap["min"], snap["max"], snap["size"], snap["idle"]) == (1, 1, 1, 1)
    assert (snap["lent"], snap["waiting"]) == (0, 0)
    assert snap["stats"]["requests_num"] == 1


def test_the_collector_sums_pools_of_an_alias_and_scales_milliseconds() -> None:
    snaps = [
        snapshot("default", stats={"requests_num": 5, "requests_wait_ms": 1500}),
        snapshot("default", size=1, idle=1, lent=0, stats={"requests_num": 2}),
        snapshot("replica", waiting=3),
    ]
    registry = CollectorRegistry()
    registry.register(prometheus.PoolCollector(lambda: snaps))
    values = samples(generate_latest(registry).decode())
    assert values[(P + "pool_size", "default")] == 3
    assert values[(P + "pool_max_size", "default")] == 8
    assert values[(P + "requests_total", "default")] == 7
    assert values[(P + "requests_wait_seconds_total", "default")] == 1.5
    assert values[(P + "pool_waiting", "replica")] == 3


def test_the_publisher_turns_counters_into_increments(tmp_path: Path) -> None:
    # Without the multiprocess directory the metrics live in memory; the
    # arithmetic is the same.
    current = [snapshot("default", stats={"requests_num": 5})]
    publisher = prometheus.Publisher(lambda: current)
    publisher.publish()
    current = [snapshot("default", lent=0, stats={"requests_num": 8})]
    publisher.publish()
    # A new pool for the alias (settings changed): its counters restart.
    current = [snapshot("default", stats={"requests_num": 2})]
    publisher.publish()
    current = []
    publisher.publish()
    counter = publisher.counters["requests"].labels("default")
    assert counter._value.get() == 10  # 5 + 3 + 2
    assert publisher.gauges["pool_size"].labels("default")._value.get() == 0


@pytest.mark.slow
def test_metrics_are_summed_over_gunicorn_worker_processes(
    tmp_path: Path, transactional_db: None
) -> None:
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    config = tmp_path / "gunicorn_conf.py"
    config.write_text(
        "from prometheus_client import multiprocess\n\n"
        "def child_exit(server, worker):\n"
        "    multiprocess.mark_process_dead(worker.pid)\n"
    )
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "POOLED_BACKEND_PROMETHEUS_INTERVAL": "0.1",
        # The test database of this run.
        "DATABASE_URL": os.environ["DATABASE_URL"].rsplit("/", 1)[0]
        + "/"
        + connection.settings_dict["NAME"],
        "POOL_MIN_SIZE": "1",
        "POOL_MAX_SIZE": "3",
    }
    with launch.site(env, workers=2, threads=2, args=["--config", str(config)]) as site:

        def get(path: str) -> str:
            client = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
            try:
                client.request("GET", path)
                response = client.getresponse()
                body = response.read().decode()
                assert response.status == 200, f"GET {path}: {response.status}\n{body[:2000]}"
                return body
            finally:
                client.close()

        # Until both workers have served a request (each then has a pool).
        workers: set[int] = set()
        requests = 0
        while len(workers) < 2 and requests < 500:
            workers.add(json.loads(get("/whoami/"))["worker_pid"])
            requests += 1
        assert len(workers) == 2

        # Until both workers have published what they did (every 0.1 s):
        # then the numbers are the sums over both processes.
        def published() -> dict[tuple[str, str], float] | None:
            values = samples(get("/metrics/"))
            done = (
                values.get((P + "pool_min_size", "default")) == 2
                and values.get((P + "requests_total", "default"), 0) >= requests
            )
            return values if done else None

        values = wait_for(published, what="metrics of both workers")
        assert values[(P + "pool_max_size", "default")] == 6
        assert values[(P + "pool_size", "default")] >= 2


def test_a_metrics_file_still_being_created_does_not_fail_the_scrape(tmp_path: Path) -> None:
    # A worker that just started writes its file empty, then sizes it:
    # prometheus_client's own MultiProcessCollector raises on such a file.
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    name = P + "requests"
    written = MmapedDict(str(tmp_path / "counter_1.db"))
    written.write_value(mmap_key(name, name + "_total", ["alias"], ["default"], "help"), 5.0, 0.0)
    written.close()
    (tmp_path / "counter_2.db").touch()
    registry_ = CollectorRegistry()
    registry_.register(prometheus.WrittenFilesCollector(str(tmp_path)))
    values = samples(generate_latest(registry_).decode())
    assert values[(name + "_total", "default")] == 5
