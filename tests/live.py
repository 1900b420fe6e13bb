"""A real gunicorn serving the testproject, for the tests that look from other processes.

:func:`serve` creates a database of its own on the test server, starts
gunicorn (workers x threads, pools of ``max_size``) on 127.0.0.1 publishing
its pool statistics in a directory of its own, and stops both afterwards.
The helpers send requests to it and read what it publishes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
from django.core.management import call_command
from django.test import override_settings
from psycopg import sql

from django_pooled_backend import stats
from testproject import launch
from testproject.launch import wait_for

from .conftest import admin_dsn

Completed = subprocess.CompletedProcess[str]


def database_url(name: str) -> str:
    return os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/" + name


def fetch(port: int, path: str, timeout: float = 60) -> bytes:
    """The body of ``GET path``, which must answer 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body[:500]
        return body
    finally:
        conn.close()


def get(port: int, path: str, timeout: float = 60) -> Any:
    """GET ``path``, which must answer 200 with JSON."""
    return json.loads(fetch(port, path, timeout))


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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def manage(self, *args: str) -> Completed:
        """``manage.py`` in a process of its own, with this server's settings."""
        return launch.manage(*args, env=self.env, timeout=120)

    def poolstats(self, *args: str) -> Completed:
        """``manage.py poolstats`` in a process of its own."""
        return self.manage("poolstats", *args)

    def poolstats_at_once(self, *argsets: tuple[str, ...]) -> list[Completed]:
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


def _recreate(db: str) -> None:
    with psycopg.connect(admin_dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))


def _drop(db: str) -> None:
    with psycopg.connect(admin_dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))


@contextlib.contextmanager
def serve(
    db: str,
    directory: Path,
    *,
    max_size: int,
    workers: int = 2,
    threads: int = 4,
    interval: float = 0.2,
    migrate: bool = False,
    gunicorn_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    asgi: bool = False,
) -> Iterator[Server]:
    """gunicorn serving the testproject on database ``db`` (created anew, dropped after).

    With ``asgi``, uvicorn serves its ASGI application instead, in one
    process (``workers`` and ``threads`` do not apply).
    """
    _recreate(db)
    url = database_url(db)
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "POOLSTATS_DIR": str(directory),
        "POOLSTATS_INTERVAL": str(interval),
        "POOL_MIN_SIZE": "1",
        "POOL_MAX_SIZE": str(max_size),
        "POOL_TIMEOUT": "30",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    password = psycopg.conninfo.conninfo_to_dict(
        psycopg.conninfo.make_conninfo(url.replace("postgres://", "postgresql://", 1))
    )["password"]
    try:
        if migrate:
            done = launch.manage("migrate", "--noinput", "-v", "0", env=env)
            assert done.returncode == 0, done.stderr
        with launch.site(
            env, workers=workers, threads=threads, args=gunicorn_args, asgi=asgi
        ) as site:
            yield Server(site.port, site.process, directory, env, str(password))
    finally:
        _drop(db)


def answers(port: int) -> bool:
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


class Load:
    """Client threads sending quick and slow requests until stopped."""

    def __init__(self, port: int, clients: int, paths: list[str]) -> None:
        self.port, self.paths = port, paths
        self.stop = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.client, args=(n,)) for n in range(clients)]

    def client(self, n: int) -> None:
        i = n
        while not self.stop.is_set():
            path = self.paths[i % len(self.paths)]
            i += 1
            try:
                get(self.port, path)
                self.sent += 1
            except Exception as exc:  # reported by __exit__
                self.errors.append(f"{path}: {exc!r}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        join(self.threads)
        assert not self.errors, self.errors[:5]
