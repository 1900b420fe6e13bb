"""``manage.py poolstats`` against real gunicorn workers under load.

One gunicorn (2 workers x 4 threads, pools of at most 2 connections) serves
the testproject on 127.0.0.1 for the whole module, publishing its pool
statistics in a directory of its own; ``poolstats`` runs in other
processes (``manage.py`` subprocesses, and this test process) and must
report what the workers are doing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from django_pooled_backend import stats
from testproject.launch import ROOT, wait_for

from .conftest import only_request_mode
from .live import Server, answers, children, in_parallel, join, serve, warm_both_workers

DB = "dpb_poolstats"
MAX_SIZE = 2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(DB, tmp_path_factory.mktemp("poolstats"), max_size=MAX_SIZE) as server:
        yield server


def test_poolstats_lists_each_worker_with_a_pool(server: Server) -> None:
    seen = warm_both_workers(server)
    workers = children(server.master.pid)
    assert seen <= workers
    wait_for(lambda: set(server.live()) == seen, what="every worker's snapshot")
    result = server.poolstats("--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {p["pid"] for p in data["processes"]} == seen
    for process in data["processes"]:
        assert process["host"] == stats.HOSTNAME
        assert process["program"] == "gunicorn"
        assert process["stale"] is False
        (pool,) = process["pools"]
        assert (pool["alias"], pool["min_size"], pool["max_size"]) == ("default", 1, MAX_SIZE)
        assert pool["target"].endswith(f"/{DB}")
    text = server.poolstats()
    assert text.returncode == 0, text.stderr
    assert f"Pools of {len(seen)} process" in text.stdout
    for pid in seen:
        assert re.search(rf"^{pid} +gunicorn +default ", text.stdout, re.MULTILINE)


@only_request_mode
def test_lent_out_equals_the_requests_blocked_in_the_slow_view(server: Server) -> None:
    warm_both_workers(server)
    server.idle()
    blocked = MAX_SIZE  # at most MAX_SIZE per worker: always all lent at once
    threads, _ = in_parallel(server.port, ["/slow/?ms=10000"] * blocked)
    try:
        wait_for(lambda: server.total("lent") == blocked, what="lent connections")
        text = server.call()
        result = server.poolstats("--json")
    finally:
        join(threads)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (total,) = data["totals"]
    assert total["lent"] == blocked
    assert total["waiting"] == 0
    assert sum(pool["lent"] for p in data["processes"] for pool in p["pools"]) == blocked
    holders = [pool["oldest_holder"] for p in data["processes"] for pool in p["pools"]]
    busy = [h for h in holders if h is not None]
    assert busy
    for holder in busy:
        assert holder["where"].startswith("testproject/shop/views.py:")
        assert holder["where"].endswith(" in slow")
        assert holder["held_s"] > 0
    assert " in slow" in text
    assert data["problems"] == []


def test_served_requests_add_up_across_workers(server: Server) -> None:
    warm_both_workers(server)
    server.idle()
    before = server.total("requests_served")
    resets_before = server.total("resets")
    sent = 24
    for _ in range(sent // 6):
        threads, _ = in_parallel(server.port, ["/whoami/"] * 6)
        join(threads)
    server.idle()
    data = json.loads(server.call("--json"))
    (total,) = data["totals"]
    assert total["requests_served"] == before + sent
    # The default reset ("always") resets every connection that comes back.
    assert total["resets"] == resets_before + sent
    assert total["timeouts"] == total["rejected"] == total["resets_failed"] == 0
    assert total["wait"]["window"] == min(total["requests_served"], 1000 * total["processes"])


@only_request_mode
def test_check_exits_non_zero_while_a_pool_is_exhausted(server: Server) -> None:
    warm_both_workers(server)
    server.idle()
    healthy = server.poolstats("--check")
    assert healthy.returncode == 0, healthy.stderr
    # 8 requests over 2 workers of 4 threads: one worker runs 4, with 2
    # connections: 2 requests wait.
    threads, _ = in_parallel(server.port, ["/slow/?ms=5000"] * 8)
    try:
        wait_for(lambda: server.total("waiting") > 0, what="waiting requests")
        exhausted, document = server.poolstats_at_once(
            ("--check", "--max-wait", "0"), ("--check", "--json")
        )
    finally:
        join(threads)
    assert exhausted.returncode == 1
    assert "the pool is exhausted: all 2 connections are lent out" in exhausted.stderr
    assert "CommandError: poolstats --check found" in exhausted.stderr
    assert document.returncode == 1
    assert json.loads(document.stdout)["problems"]
    server.idle()
    assert server.poolstats("--check").returncode == 0


def test_server_view_attributes_connections_to_each_worker(server: Server) -> None:
    seen = warm_both_workers(server)
    server.idle()
    sizes = {pid: pool["size"] for pid, pool in server.live().items()}
    result = server.poolstats("--server", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["version"] == 1
    (view,) = data["servers"]
    assert view["alias"] == "default"
    mine = {p["pid"]: p for p in view["pools"] if p["pid"] in seen}
    assert set(mine) == seen
    for pid, owner in mine.items():
        assert (owner["host"], owner["alias"], owner["process"]) == (
            stats.HOSTNAME,
            "default",
            "running",
        )
        assert 1 <= owner["connections"] <= MAX_SIZE
        assert owner["connections"] == sizes[pid]
        assert sum(owner["states"].values()) == owner["connections"]
    reserved = view["superuser_reserved_connections"] + view["reserved_connections"]
    assert view["headroom"] == view["max_connections"] - reserved - view["connections"]
    text = server.poolstats("--server")
    assert text.returncode == 0, text.stderr
    assert f"max_connections {view['max_connections']}" in text.stdout
    for pid in seen:
        assert re.search(rf" {pid} +default +running ", text.stdout)


def test_no_password_in_any_output_or_published_file(server: Server) -> None:
    warm_both_workers(server)
    outputs = [
        server.poolstats(*args)
        for args in (
            (),
            ("--json",),
            ("--prometheus",),
            ("--server",),
            ("--server", "--json"),
            ("--check", "--max-wait", "0"),
        )
    ]
    assert server.password
    for result in outputs:
        assert server.password not in result.stdout
        assert server.password not in result.stderr
    for path in server.directory.iterdir():
        assert server.password not in path.read_text()


def test_watch_refreshes_until_interrupted(server: Server) -> None:
    warm_both_workers(server)
    with subprocess.Popen(
        [sys.executable, "manage.py", "poolstats", "--watch", "0.3"],
        cwd=ROOT,
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as watcher:
        try:
            assert watcher.stdout is not None
            refreshes = 0
            while refreshes < 2:
                line = watcher.stdout.readline()
                assert line, "poolstats --watch stopped on its own"
                refreshes += line.startswith("(every 0.3s; Ctrl-C to stop)")
            watcher.send_signal(signal.SIGINT)
            watcher.wait(30)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait(10)
    assert watcher.returncode == 0


def test_a_killed_worker_disappears_from_poolstats(server: Server) -> None:
    seen = warm_both_workers(server)
    victim = min(seen)
    path = server.directory / f"{stats.HOSTNAME}.{victim}.json"
    assert path.exists()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not stats.pid_alive(victim), what="the worker to be gone")
    data = json.loads(server.call("--json"))
    assert victim not in {p["pid"] for p in data["processes"]}
    assert not path.exists()
    # gunicorn replaced the worker; the service goes on.
    wait_for(lambda: answers(server.port), what="gunicorn")
