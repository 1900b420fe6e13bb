"""``manage.py poolstats`` against real gunicorn workers under load.

One gunicorn (2 workers x 4 threads, pools of at most 2 connections) serves
the testproject on 127.0.0.1 for the whole module, publishing its pool
statistics in a directory of its own; ``poolstats`` runs in other
processes (``manage.py`` subprocesses, and this test process) and must
report what the workers are doing.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.management import call_command
from django.test import override_settings
from psycopg import sql

from django_pooled_backend import stats

from .conftest import admin_dsn

ROOT = Path(__file__).resolve().parent.parent
DB = "dpb_poolstats"
MAX_SIZE = 2

pytestmark = pytest.mark.slow
Completed = subprocess.CompletedProcess[str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database_url(name: str) -> str:
    return os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/" + name


def get(port: int, path: str, timeout: float = 60) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body[:500]
        return json.loads(body)
    finally:
        conn.close()


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    """Poll ``condition`` until it returns something true (not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what or condition}")
        time.sleep(0.05)


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stats._proc_stat(int(entry))
            if fields is not None and len(fields) > 1 and fields[1] == str(pid):
                found.add(int(entry))
    return found


@dataclass
class Server:
    port: int
    master: subprocess.Popen[bytes]
    directory: Path
    env: dict[str, str]
    password: str

    def published(self) -> list[stats.Published]:
        return stats.read_snapshots(self.directory)

    def live(self) -> dict[int, dict[str, Any]]:
        """Live worker pid -> its 'default' pool, as published now."""
        return {
            p.snapshot["pid"]: next(x for x in p.snapshot["pools"] if x["alias"] == "default")
            for p in self.published()
            if not p.stale
        }

    def total(self, key: str) -> int:
        return sum(int(pool[key]) for pool in self.live().values())

    def poolstats(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``manage.py poolstats`` in a process of its own."""
        return subprocess.run(
            [sys.executable, "manage.py", "poolstats", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def poolstats_at_once(
        self, *argsets: tuple[str, ...]
    ) -> list[subprocess.CompletedProcess[str]]:
        """Several ``manage.py poolstats`` processes started together."""
        results: dict[int, Completed] = {}

        def run(i: int, args: tuple[str, ...]) -> None:
            results[i] = self.poolstats(*args)

        threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(argsets)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        return [results[i] for i in range(len(argsets))]

    def call(self, *args: str) -> str:
        """``poolstats`` through call_command, in this test process."""
        out = StringIO()
        with override_settings(POOLED_BACKEND_STATS_DIR=str(self.directory)):
            call_command("poolstats", *args, stdout=out)
        return out.getvalue()

    def idle(self) -> None:
        """Wait for snapshots, all written from now on, where no request holds or waits."""
        since = time.time()

        def settled() -> bool:
            fresh = [p for p in self.published() if not p.stale]
            return bool(fresh) and all(
                p.snapshot["time"] > since
                and all(pool["lent"] == pool["waiting"] == 0 for pool in p.snapshot["pools"])
                for p in fresh
            )

        wait_for(settled, what="idle pools")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with psycopg.connect(admin_dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    directory = tmp_path_factory.mktemp("poolstats")
    url = database_url(DB)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "POOLSTATS_DIR": str(directory),
        "POOLSTATS_INTERVAL": "0.2",
        "POOL_MIN_SIZE": "1",
        "POOL_MAX_SIZE": str(MAX_SIZE),
        "POOL_TIMEOUT": "30",
        "PYTHONUNBUFFERED": "1",
    }
    port = free_port()
    master = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "testproject.wsgi",
            "--workers",
            "2",
            "--threads",
            "4",
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        wait_for(lambda: _answers(port), timeout=60, what="gunicorn")
        password = psycopg.conninfo.conninfo_to_dict(
            psycopg.conninfo.make_conninfo(url.replace("postgres://", "postgresql://", 1))
        )["password"]
        yield Server(port, master, directory, env, str(password))
    finally:
        master.terminate()
        try:
            master.wait(30)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait(10)
        with psycopg.connect(admin_dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB))
            )


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError, http.client.HTTPException, AssertionError):
        get(port, "/whoami/", timeout=5)
        return True
    return False


def in_parallel(port: int, paths: list[str]) -> tuple[list[threading.Thread], list[Any]]:
    """Send ``paths`` at once, one client thread each; returns threads and results."""
    results: list[Any] = []

    def fetch(path: str) -> None:
        results.append(get(port, path))

    threads = [threading.Thread(target=fetch, args=(path,)) for path in paths]
    for t in threads:
        t.start()
    return threads, results


def join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(120)
        assert not t.is_alive()


def warm_both_workers(server: Server) -> set[int]:
    """Send bursts of requests until both workers have served one (and have a pool)."""
    seen: set[int] = set()
    for _ in range(20):
        threads, results = in_parallel(server.port, ["/whoami/"] * 8)
        join(threads)
        seen |= {r["worker_pid"] for r in results}
        if len(seen) == 2:
            break
    return seen


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
    sent = 24
    for _ in range(sent // 6):
        threads, _ = in_parallel(server.port, ["/whoami/"] * 6)
        join(threads)
    server.idle()
    data = json.loads(server.call("--json"))
    (total,) = data["totals"]
    assert total["requests_served"] == before + sent
    # /whoami/ runs only statements that leave the session clean: the
    # "auto" reset had nothing to reset.
    assert total["resets"] == 0
    assert total["timeouts"] == total["rejected"] == total["resets_failed"] == 0
    assert total["wait"]["window"] == min(total["requests_served"], 1000 * total["processes"])


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
    wait_for(lambda: _answers(server.port), what="gunicorn")
