"""Processes and threads: fork, gunicorn --preload, borrowers that never come back, leaks."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import logging
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection, connections
from django.db.backends.postgresql.base import DatabaseWrapper as DjangoWrapper

from django_pooled_backend import registry
from testproject.launch import wait_for

from . import live
from .conftest import Wrappers
from .test_liveness import backend_pid

ROOT = Path(__file__).resolve().parent.parent


def fork_and_report(child: Any) -> dict[str, Any]:
    """Run ``child()`` in a forked process; return what it returned (as JSON)."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a threaded process may deadlock:
        # that is the situation under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        code = 0
        try:
            result = child()
        except BaseException as exc:
            result = {"error": repr(exc)}
            code = 1
        with os.fdopen(write_fd, "w") as out:
            out.write(json.dumps(result))
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as src:
        data = src.read()
    _, status = os.waitpid(pid, 0)
    report: dict[str, Any] = json.loads(data)
    report["exit_status"] = status
    return report


def child_queries_then_exits_like_a_process() -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    connections.close_all()
    # What interpreter exit does: close the pools, free every object,
    # including the inherited connections (they must send nothing).
    registry.close_all()
    registry._abandoned.clear()
    gc.collect()
    return {"backend_pid": pid}


def test_forked_child_never_touches_the_parents_connections(
    transactional_db: None, admin: psycopg.Connection[Any]
) -> None:
    backend_pid(connection)
    # Lent to this thread across the fork (also with transaction-scoped
    # release, which gave it back after the query).
    connection.ensure_connection()
    parent_pid = connection.connection.info.backend_pid
    pool = connection.pool
    assert pool is not None
    idle_pids = {c.info.backend_pid for c in pool.idle_connections()}
    report = fork_and_report(child_queries_then_exits_like_a_process)
    assert report["exit_status"] == 0, report
    assert report["backend_pid"] != parent_pid
    assert report["backend_pid"] not in idle_pids
    # The parent's connections were neither used nor closed by the child.
    assert backend_pid(connection) == parent_pid
    alive = {pid for (pid,) in admin.execute("SELECT pid FROM pg_stat_activity").fetchall()}
    assert {parent_pid, *idle_pids} <= alive
    connection.close()


@pytest.mark.xfail(strict=True, reason="Django's pool: the child reuses the parent's socket")
def test_forked_child_on_djangos_pool_uses_the_parents_connection(
    transactional_db: None,
) -> None:
    settings_dict = copy.deepcopy(connection.settings_dict)
    settings_dict["OPTIONS"]["pool"] = {"min_size": 1, "max_size": 2}
    wrapper = DjangoWrapper(settings_dict, "django_fork")
    try:
        parent_pid = backend_pid(wrapper)

        def child() -> dict[str, Any]:
            return {"backend_pid": backend_pid(wrapper)}

        report = fork_and_report(child)
        assert report["backend_pid"] != parent_pid
    finally:
        wrapper.close()
        wrapper.close_pool()


@pytest.fixture
def preloaded_gunicorn(tmp_path: Path, transactional_db: None) -> Iterator[tuple[int, Path, Any]]:
    pid_file = tmp_path / "master.pid"
    with live.serve(
        "dpb_preload",
        tmp_path,
        max_size=4,
        threads=2,
        gunicorn_args=["--preload"],
        extra_env={"TESTPROJECT_QUERY_AT_IMPORT": "1", "TESTPROJECT_PID_FILE": str(pid_file)},
    ) as server:
        yield server.port, pid_file, server.master


@pytest.mark.slow
def test_gunicorn_preload_workers_never_use_the_masters_connection(
    preloaded_gunicorn: tuple[int, Path, Any], admin: psycopg.Connection[Any]
) -> None:
    port, pid_file, proc = preloaded_gunicorn
    master_pid, master_backend = map(int, pid_file.read_text().split())
    assert master_pid == proc.pid

    def sample(n: int) -> set[tuple[int, int]]:
        return {
            (r["worker_pid"], r["backend_pid"])
            for r in (live.get(port, "/whoami/") for _ in range(n))
        }

    seen = sample(40)
    workers = {w for w, _ in seen}
    assert master_pid not in workers
    assert master_backend not in {b for _, b in seen}
    # A worker that dies (and the one gunicorn forks to replace it) leaves
    # the master's server connection alone.
    os.kill(next(iter(workers)), signal.SIGTERM)
    time.sleep(1.0)
    seen_after = sample(40)
    assert master_backend not in {b for _, b in seen_after}
    alive = {pid for (pid,) in admin.execute("SELECT pid FROM pg_stat_activity").fetchall()}
    assert master_backend in alive


def test_dead_thread_connection_is_reclaimed_reset_and_reused(
    make_wrapper: Wrappers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="django_pooled_backend")
    options = {"min_size": 1, "max_size": 1, "timeout": 5}
    pids: list[int] = []

    def forgetful_worker() -> None:
        wrapper = make_wrapper("forgetful", options)
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), set_config('app.tenant_id', 'acme', false)")
            pids.append(cursor.fetchone()[0])
        wrapper.ensure_connection()  # lent, in both release modes
        # ...and the thread ends without wrapper.close().

    thread = threading.Thread(target=forgetful_worker, name="forgetful-worker")
    thread.start()
    thread.join(10)
    wrapper = make_wrapper("forgetful", options)
    with wrapper.cursor() as cursor:
        cursor.execute(
            "SELECT pg_backend_pid(), coalesce(current_setting('app.tenant_id', true), '')"
        )
        pid, tenant = cursor.fetchone()
    wrapper.close()
    assert pid == pids[0]  # the same server connection, reused...
    assert tenant == ""  # ...after its reset
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    reclaimed = [m for m in messages if "Reclaimed a connection of pool 'forgetful'" in m]
    assert len(reclaimed) == 1
    assert "thread 'forgetful-worker' ended without closing it" in reclaimed[0]
    assert "test_lifecycle.py:" in reclaimed[0]
    assert "in forgetful_worker" in reclaimed[0]


@pytest.mark.xfail(strict=True, reason="Django's pool: the dead thread keeps the slot forever")
def test_dead_thread_keeps_the_slot_on_djangos_pool(transactional_db: None) -> None:
    settings_dict = copy.deepcopy(connection.settings_dict)
    settings_dict["OPTIONS"]["pool"] = {"min_size": 1, "max_size": 1, "timeout": 1}
    holders: list[Any] = []  # kept alive: only the thread dies

    def forgetful_worker() -> None:
        holder = DjangoWrapper(copy.deepcopy(settings_dict), "django_dead")
        holder.ensure_connection()
        holders.append(holder)

    thread = threading.Thread(target=forgetful_worker)
    thread.start()
    thread.join(10)
    wrapper = DjangoWrapper(copy.deepcopy(settings_dict), "django_dead")
    try:
        backend_pid(wrapper)
    finally:
        wrapper.close()
        for holder in holders:  # the leaked server connection, by hand
            holder.connection.close()
        wrapper.close_pool()


def test_housekeeping_reclaims_without_waiting_for_a_borrow(
    make_wrapper: Wrappers,
) -> None:
    options = {"min_size": 1, "max_size": 2}

    def forgetful_worker() -> None:
        make_wrapper("housekept", options).ensure_connection()

    thread = threading.Thread(target=forgetful_worker)
    thread.start()
    thread.join(10)
    (pool,) = registry.pools_for_alias("housekept")
    wait_for(lambda: pool.state()["lent"] == 0, timeout=10)


def test_sync_to_async_worker_thread_connection_is_reclaimed(
    transactional_db: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="django_pooled_backend")
    pool = connection.pool
    assert pool is not None
    lent_before = pool.state()["lent"]

    def query() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = int(cursor.fetchone()[0])
        connection.ensure_connection()  # lent, in both release modes
        return pid

    async def main() -> int:
        return await sync_to_async(query, thread_sensitive=False)()

    asyncio.run(main())
    # The executor's thread held a connection and never closed it.
    gc.collect()
    wait_for(lambda: pool.state()["lent"] == lent_before, timeout=10)
    assert any("Reclaimed a connection of pool" in r.getMessage() for r in caplog.records)


def test_leak_detection_warns_with_the_borrowing_stack_then_notes_the_return(
    make_wrapper: Wrappers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="django_pooled_backend")
    wrapper = make_wrapper("leaky", {"min_size": 1, "max_size": 2, "leak_threshold": 0.2})

    def slow_view_that_holds_a_connection() -> None:
        wrapper.ensure_connection()

    slow_view_that_holds_a_connection()
    wait_for(
        lambda: any("Possible connection leak" in r.getMessage() for r in caplog.records),
        timeout=10,
    )
    wrapper.close()
    warning = next(r for r in caplog.records if "Possible connection leak" in r.getMessage())
    text = warning.getMessage()
    assert warning.levelno == logging.WARNING
    assert "pool 'leaky'" in text
    assert f"thread {threading.current_thread().name}" in text
    assert "leak_threshold is 0.2s" in text
    assert "in slow_view_that_holds_a_connection" in text
    infos = [
        r for r in caplog.records if r.levelno == logging.INFO and "came back" in r.getMessage()
    ]
    assert len(infos) == 1
    assert "reported as a possible leak" in infos[0].getMessage()


@pytest.mark.slow
def test_64_threads_on_4_connections_fail_clearly_and_leave_the_pool_whole(
    make_wrapper: Wrappers,
) -> None:
    options = {"min_size": 1, "max_size": 4, "timeout": 0.3}
    served = 0
    failures: list[BaseException] = []
    lock = threading.Lock()

    def request() -> None:
        nonlocal served
        wrapper = make_wrapper("crowded", options)
        for _ in range(3):
            try:
                with wrapper.cursor() as cursor:
                    cursor.execute("SELECT pg_sleep(0.05)")
                with lock:
                    served += 1
            except BaseException as exc:
                with lock:
                    failures.append(exc)
            finally:
                wrapper.close()

    threads = [threading.Thread(target=request, name=f"client-{i}") for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert served > 0
    assert failures, "64 threads on 4 connections with a 0.3 s timeout should time out"
    for exc in failures:
        assert isinstance(exc, OperationalError), repr(exc)
        text = str(exc)
        assert "database alias 'crowded'" in text
        # The pool may still be growing when the first borrows time out.
        # (Connections still being opened count as lent, with no holder yet.)
        assert re.search(r"Pool state: size [0-4] of max 4, [0-4] lent out", text), text
        if "Held by:" in text:
            assert "Held by: client-" in text
    assert any("Held by: client-" in str(exc) for exc in failures)
    (pool,) = registry.pools_for_alias("crowded")
    state = pool.state()
    assert state["lent"] == 0
    assert state["waiting"] == 0
    assert state["idle"] == state["size"] <= 4
