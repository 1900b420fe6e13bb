"""Pool counters, snapshots and their publication, in this process, on the real server.

The gunicorn tests (test_poolstats_live.py) show the same figures coming
from other processes; here each counter is driven on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection
from django.test import override_settings

from django_pooled_backend import poolstats, registry, stats, tracking
from testproject.launch import wait_for

from .conftest import Wrappers, admin_dsn, only_request_mode, wait_gone
from .test_pooling import request_cycle

ROOT = Path(__file__).resolve().parent.parent


def pool_of(alias: str) -> Any:
    (pool,) = registry.pools_for_alias(alias)
    return pool


# -- counters ------------------------------------------------------------------


def test_served_requests_resets_and_wait_window_are_counted(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("counted", {"min_size": 1, "max_size": 2, "reset": "auto"})
    for _ in range(4):
        request_cycle(wrapper)  # leaves the session clean: no reset
    for _ in range(3):
        request_cycle(wrapper, "SELECT set_config('app.tenant_id', 'x', false)")
    snap = stats.snapshot_pool(pool_of("counted"))
    assert snap["alias"] == "counted"
    assert snap["requests"] == snap["requests_served"] == 7
    assert snap["resets"] == 3
    assert snap["resets_failed"] == 0
    assert snap["wait"]["window"] == 7
    wait = snap["wait"]
    assert wait["mean_ms"] is not None
    assert wait["max_ms"] is not None
    assert 0 <= wait["mean_ms"] <= wait["max_ms"]
    assert wait["p95_ms"] is not None
    assert wait["p99_ms"] is not None
    assert wait["p95_ms"] <= wait["p99_ms"] <= wait["max_ms"]
    assert (snap["lent"], snap["waiting"], snap["oldest_holder"]) == (0, 0, None)
    assert snap["connections_opened"] >= 1
    assert snap["connection_errors"] == 0


def test_wait_window_keeps_only_the_most_recent_borrows() -> None:
    counters = stats.PoolCounters(window=3)
    for wait in (5.0, 0.001, 0.002, 0.003):
        counters.waits.append(wait)
    assert stats.summarize_waits(list(counters.waits)) == {
        "window": 3,
        "mean_ms": 2.0,
        "p95_ms": 3.0,
        "p99_ms": 3.0,
        "max_ms": 3.0,
    }


def test_percentiles_use_the_nearest_rank() -> None:
    ordered = [float(i) for i in range(1, 101)]
    assert stats.percentile(ordered, 95) == 95.0
    assert stats.percentile(ordered, 99) == 99.0
    assert stats.percentile([7.0], 99) == 7.0
    assert stats.summarize_waits([])["mean_ms"] is None


def test_oldest_holder_names_the_thread_and_where_it_borrowed(make_wrapper: Wrappers) -> None:
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        wrapper = make_wrapper("held", {"min_size": 1, "max_size": 2})
        wrapper.ensure_connection()
        holding.set()
        release.wait(10)
        wrapper.close()

    thread = threading.Thread(target=hold, name="report-writer")
    thread.start()
    try:
        assert holding.wait(10)
        snap = stats.snapshot_pool(pool_of("held"))
    finally:
        release.set()
        thread.join(10)
    holder = snap["oldest_holder"]
    assert holder is not None
    assert holder["thread"] == "report-writer"
    assert "test_stats.py:" in holder["where"]
    assert "in hold" in holder["where"]
    assert holder["held_s"] >= 0
    assert snap["lent"] == 1


def test_oldest_holder_blocked_in_a_library_names_the_application_frame_beside_it(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    # The thread's innermost frames are psycopg's (site-packages), waiting
    # for an advisory lock the test holds; the application frame is ours.
    app = make_wrapper.application_name("blocked")
    # Advisory locks are per database: take it in the test database.
    locker = psycopg.connect(admin_dsn(connection.settings_dict["NAME"]), autocommit=True)
    locker.execute("SELECT pg_advisory_lock(8151)")
    errors: list[BaseException] = []

    def wait_for_the_lock() -> None:
        wrapper = make_wrapper("blocked", {"min_size": 1, "max_size": 2})
        try:
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_lock(8151)")
                cursor.execute("SELECT pg_advisory_unlock(8151)")
        except BaseException as exc:
            errors.append(exc)
        finally:
            wrapper.close()

    thread = threading.Thread(target=wait_for_the_lock, name="lock-waiter")
    thread.start()
    try:
        wait_for(
            lambda: admin.execute(
                "SELECT 1 FROM pg_stat_activity"
                " WHERE application_name = %s AND wait_event_type = 'Lock'",
                [app],
            ).fetchone(),
            what="the thread to wait for the lock",
        )
        pool = pool_of("blocked")
        (located,) = pool.holders.values()
        borrowed = located.where_text()
        pool.holders[id(located.conn)] = dataclasses.replace(located, located=False)
        snap = stats.snapshot_pool(pool)
    finally:
        locker.close()
        thread.join(30)
    assert errors == []
    # Borrowed right here: where the borrow was made is shown.
    assert re.fullmatch(r"tests/test_stats\.py:\d+ in wait_for_the_lock", borrowed), borrowed
    # Where the thread is now (shown for a holder that did not record its
    # borrow): in psycopg, called from here.
    holder = snap["oldest_holder"]
    assert holder is not None
    assert holder["thread"] == "lock-waiter"
    where = holder["where"]
    assert re.fullmatch(
        r"tests/test_stats\.py:\d+ in wait_for_the_lock \(in psycopg/[\w/]+\.py:\d+ \w+\)", where
    ), where
    process = stats.snapshot_process([])
    process["pools"] = [snap]
    live = [stats.Published(process, 0.0, False)]
    text = poolstats.render_text(poolstats.Report(tmp_path, None, time.time(), live=live))
    assert f"lock-waiter at {where}" in text


def test_a_borrow_made_through_asgiref_names_the_application_frame_that_called_it(
    make_wrapper: Wrappers,
) -> None:
    # As Django runs an async view's ORM call: sync_to_async, in the thread
    # that called async_to_sync; asgiref's frames are between ours and the
    # borrow.
    found: list[str] = []

    def borrow_through_asgiref() -> None:
        wrapper = make_wrapper("via_asgiref", {"min_size": 1, "max_size": 2})
        async_to_sync(sync_to_async(wrapper.ensure_connection, thread_sensitive=True))()
        found.append(stats.snapshot_pool(pool_of("via_asgiref"))["oldest_holder"]["where"])  # type: ignore[index]
        wrapper.close()

    thread = threading.Thread(target=borrow_through_asgiref)
    thread.start()
    thread.join(30)
    (where,) = found
    assert re.fullmatch(
        r"tests/test_stats\.py:\d+ in borrow_through_asgiref \(in asgiref/sync\.py:\d+ \w+\)",
        where,
    ), where


def test_a_thread_with_no_application_frame_is_shown_in_its_library_frame(
    admin: psycopg.Connection[Any],
) -> None:
    admin.execute("SELECT pg_advisory_lock(8152)")
    other = psycopg.connect(admin_dsn(), autocommit=True)
    # Started straight into psycopg: no frame of the application at all.
    thread = threading.Thread(target=other.execute, args=("SELECT pg_advisory_lock(8152)",))
    thread.start()
    try:
        pid = other.info.backend_pid
        wait_for(
            lambda: admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", [pid]
            ).fetchone(),
            what="the thread to wait for the lock",
        )
        holder = tracking.Holder(other, thread, time.monotonic(), None, None, located=False)
        where = holder.where_text()
    finally:
        admin.execute("SELECT pg_advisory_unlock(8152)")
        thread.join(30)
        other.close()
    assert re.fullmatch(
        r"psycopg/[\w/]+\.py:\d+ \w+ \(no application code on the stack\)", where
    ), where


def test_timeouts_and_waiters_are_counted_and_timed_out_waiters_are_not_waiting(
    make_wrapper: Wrappers,
) -> None:
    holding, release = threading.Event(), threading.Event()
    options = {"min_size": 1, "max_size": 1, "timeout": 0.3}

    def hold() -> None:
        wrapper = make_wrapper("timed", options)
        wrapper.ensure_connection()
        holding.set()
        release.wait(10)
        wrapper.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10)
        before = stats.snapshot_pool(pool_of("timed"))
        for _ in range(2):
            with pytest.raises(OperationalError):
                make_wrapper("timed", options).ensure_connection()
        snap = stats.snapshot_pool(pool_of("timed"))
    finally:
        release.set()
        thread.join(10)
    assert snap["timeouts"] == 2
    assert snap["requests_waited"] - before["requests_waited"] == 2
    assert snap["requests"] == 3
    assert snap["requests_served"] == 1
    # psycopg_pool keeps timed-out clients in its queue until a connection
    # comes back; they are not shown as waiting.
    assert snap["waiting"] == 0
    assert snap["oldest_waiter_s"] is None
    assert snap["wait"]["window"] == 3
    assert snap["wait"]["max_ms"] is not None
    assert snap["wait"]["max_ms"] >= 300


def test_waiters_are_counted_with_how_long_they_have_waited(make_wrapper: Wrappers) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 10}
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        wrapper = make_wrapper("queue", options)
        wrapper.ensure_connection()
        holding.set()
        release.wait(10)
        wrapper.close()

    def wait() -> None:
        request_cycle(make_wrapper("queue", options))

    threads = [threading.Thread(target=hold), threading.Thread(target=wait)]
    threads[0].start()
    assert holding.wait(10)
    threads[1].start()
    try:
        pool = pool_of("queue")
        wait_for(lambda: pool.state()["waiting"] >= 1, what="a waiting borrower")
        first = stats.snapshot_pool(pool)
        time.sleep(0.2)
        second = stats.snapshot_pool(pool)
    finally:
        release.set()
        for t in threads:
            t.join(10)
    assert first["waiting"] == second["waiting"] == 1
    # How long the waiter has waited, as the hand-off recorded when it queued.
    assert first["oldest_waiter_s"] is not None
    assert second["oldest_waiter_s"] is not None
    assert second["oldest_waiter_s"] >= first["oldest_waiter_s"] + 0.2
    assert second["lent"] == second["max_size"] == 1
    assert stats.snapshot_pool(pool)["waiting"] == 0


def test_rejected_borrows_are_counted(make_wrapper: Wrappers) -> None:
    options = {"min_size": 1, "max_size": 1, "timeout": 5, "max_waiting": 1}
    holding, release, waiting = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        wrapper = make_wrapper("rejecting", options)
        wrapper.ensure_connection()
        holding.set()
        release.wait(10)
        wrapper.close()

    def wait() -> None:
        waiting.set()
        request_cycle(make_wrapper("rejecting", options))

    threads = [threading.Thread(target=hold), threading.Thread(target=wait)]
    threads[0].start()
    assert holding.wait(10)
    threads[1].start()
    try:
        assert waiting.wait(10)
        pool = pool_of("rejecting")
        wait_for(lambda: pool.state()["waiting"] >= 1, what="a waiting borrower")
        with pytest.raises(OperationalError):
            make_wrapper("rejecting", options).ensure_connection()
    finally:
        release.set()
        for t in threads:
            t.join(10)
    assert stats.snapshot_pool(pool)["rejected"] == 1


@only_request_mode
def test_terminated_connections_count_as_lost_and_their_reset_as_failed(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("killed", {"min_size": 1, "max_size": 1})
    with wrapper.cursor() as cursor:
        # set_config(): a session that needs its reset.
        cursor.execute("SELECT pg_backend_pid(), set_config('app.tenant_id', 'x', false)")
        (pid, _) = cursor.fetchone()
    # Killed while lent: the reset sent on return cannot succeed.
    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_gone(admin, pid)
    wrapper.close()
    request_cycle(wrapper)  # gets a new connection
    snap = stats.snapshot_pool(pool_of("killed"))
    assert snap["connections_lost"] == 1
    assert snap["resets_failed"] == 1
    assert snap["requests_served"] == 2


def test_connections_closed_by_the_pool_are_counted(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("closing", {"min_size": 2, "max_size": 2})
    request_cycle(wrapper)
    pool = pool_of("closing")
    pool.wait(10)
    registry.close_alias("closing")
    assert pool.counters.closed == 2


def test_connection_errors_are_counted(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper(
        "refused", {"min_size": 0, "max_size": 1, "timeout": 1}, PASSWORD="not-the-password"
    )
    with pytest.raises(OperationalError):
        wrapper.ensure_connection()
    snap = stats.snapshot_pool(pool_of("refused"))
    assert snap["connection_errors"] >= 1
    assert snap["connections_opened"] == 0
    assert snap["timeouts"] == 0  # it failed at once: not a timeout


# -- publication -----------------------------------------------------------------


def test_publisher_writes_this_process_pools_and_removes_them_when_stopped(
    make_wrapper: Wrappers, tmp_path: Path
) -> None:
    request_cycle(make_wrapper("published", {"min_size": 1, "max_size": 3}))
    publisher = stats.Publisher(tmp_path / "stats", 0.05)
    publisher.start()
    path = tmp_path / "stats" / f"{stats.HOSTNAME}.{os.getpid()}.json"
    wait_for(path.exists, what=str(path))
    (published,) = stats.read_snapshots(tmp_path / "stats")
    snap = published.snapshot
    assert (snap["pid"], snap["host"], snap["schema"]) == (os.getpid(), stats.HOSTNAME, 1)
    assert not published.stale
    pools = {p["alias"]: p for p in snap["pools"]}
    assert pools["published"]["max_size"] == 3
    assert pools["published"]["requests_served"] == 1
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    publisher.stop()
    assert not path.exists()
    assert list((tmp_path / "stats").iterdir()) == []


def test_publisher_removes_the_file_when_the_process_has_no_open_pool(
    make_wrapper: Wrappers, tmp_path: Path
) -> None:
    publisher = stats.Publisher(tmp_path, 1.0)
    path = tmp_path / f"{stats.HOSTNAME}.{os.getpid()}.json"
    request_cycle(make_wrapper("leaving", True))
    publisher.publish()
    assert path.exists()
    registry.close_all()
    publisher.publish()
    assert not path.exists()


def test_publishing_thread_starts_with_the_first_pool(transactional_db: None) -> None:
    # The test database's pool of this process started it.
    current = stats.publisher()
    assert current is not None
    assert current.pid == os.getpid()
    assert current.directory == stats.default_directory()


def test_default_directory_is_per_user_and_per_project(settings: Any) -> None:
    directory = stats.default_directory()
    assert directory.parent.name == f"django_pooled_backend-{os.getuid()}"
    assert directory.name.startswith("testproject.settings-")
    settings.POOLED_BACKEND_STATS_DIR = "/srv/app/poolstats"
    assert stats.configured_directory() == Path("/srv/app/poolstats")
    settings.POOLED_BACKEND_STATS_DIR = None
    assert stats.configured_directory() is None


def test_another_checkout_of_the_project_gets_another_directory(tmp_path: Path) -> None:
    # The same settings module name, from another path.
    code = "from django_pooled_backend import stats; print(stats.default_directory())"
    copy = tmp_path / "testproject"
    copy.mkdir()
    (copy / "__init__.py").write_text("")
    (copy / "settings.py").write_text(
        "SECRET_KEY = 'x'\nINSTALLED_APPS = ['django_pooled_backend']\nDATABASES = {}\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "testproject.settings"}
    env["PYTHONPATH"] = str(tmp_path)
    script = f"import django; django.setup(); {code}"
    other = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() != str(stats.default_directory())
    assert Path(other.stdout.strip()).name.startswith("testproject.settings-")


def test_a_per_user_directory_another_user_controls_is_refused(tmp_path: Path) -> None:
    base = tmp_path / f"django_pooled_backend-{os.getuid()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base.symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="is a symbolic link owned by uid"):
        stats.ensure_directory(base / "project")
    base.unlink()
    stats.ensure_directory(base / "project")
    assert oct(base.stat().st_mode & 0o777) == oct(0o700)
    if os.getuid() == 0:
        os.chown(base, 12345, -1)
        with pytest.raises(PermissionError, match="is a directory owned by uid 12345, mode 0700"):
            stats.ensure_directory(base / "project")


def write_published(
    directory: Path,
    pid: int,
    *,
    age: float = 0.0,
    host: str = "",
    pool: dict[str, Any] | None = None,
) -> Path:
    """A snapshot file as a process would have written it ``age`` seconds ago."""
    snapshot = stats.snapshot_process([])
    snapshot.update(pid=pid, host=host or stats.HOSTNAME, time=time.time() - age)
    snapshot["start_time"] = stats.process_start_time(pid)
    snapshot["pools"] = [dict(pool or SAMPLE_POOL)]  # type: ignore[list-item]
    directory.mkdir(parents=True, exist_ok=True)
    return stats.write_snapshot(directory, snapshot)


SAMPLE_POOL: dict[str, Any] = {
    "alias": "default",
    "name": "default",
    "target": "app@db:5432/app",
    "min_size": 1,
    "max_size": 4,
    "size": 4,
    "idle": 0,
    "lent": 4,
    "waiting": 2,
    "oldest_waiter_s": 7.5,
    "requests": 10,
    "requests_served": 8,
    "requests_waited": 3,
    "wait": {"window": 8, "mean_ms": 1.5, "p95_ms": 4.0, "p99_ms": 6.0, "max_ms": 6.0},
    "timeouts": 0,
    "rejected": 0,
    "connection_errors": 0,
    "connections_opened": 4,
    "connections_closed": 0,
    "connections_lost": 0,
    "resets": 8,
    "resets_failed": 0,
    "leaks": 0,
    "reclaims": 0,
    "oldest_holder": {"thread": "worker-1", "held_s": 9.0, "where": "app/views.py:3 in v"},
}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_snapshot_of_an_exited_process_is_removed_and_not_shown(tmp_path: Path) -> None:
    pid = dead_pid()
    path = write_published(tmp_path, pid)
    leftover = tmp_path / f".{stats.HOSTNAME}.{pid}.x1y2z3_a.tmp"
    leftover.write_text("{")
    out = StringIO()
    with override_settings(POOLED_BACKEND_STATS_DIR=str(tmp_path)):
        call_command("poolstats", stdout=out)
    assert not path.exists()
    assert not leftover.exists()
    assert "No running process on" in out.getvalue()
    assert str(pid) not in out.getvalue()


def test_a_snapshot_not_refreshed_is_stale_never_live(tmp_path: Path) -> None:
    write_published(tmp_path, os.getpid(), age=10)
    with override_settings(POOLED_BACKEND_STATS_DIR=str(tmp_path)):
        text, document = StringIO(), StringIO()
        call_command("poolstats", stdout=text)
        call_command("poolstats", "--json", stdout=document)
        metrics = StringIO()
        call_command("poolstats", "--prometheus", stdout=metrics)
        with pytest.raises(CommandError, match="no fresh pool statistics for 10s"):
            call_command("poolstats", "--check", stdout=StringIO())
    assert f"Stale: pid {os.getpid()} on {stats.HOSTNAME}" in text.getvalue()
    assert "its figures are not shown" in text.getvalue()
    assert "Pools of 0 processes" in text.getvalue()
    data = json.loads(document.getvalue())
    (process,) = data["processes"]
    assert process["stale"] is True
    assert process["age_s"] >= 10
    assert data["totals"] == []
    assert "django_pooled_backend_connections_lent{" not in metrics.getvalue()
    assert 'django_pooled_backend_processes{state="stale"} 1' in metrics.getvalue()


def test_a_snapshot_stamped_in_the_future_is_stale_and_suspicious(tmp_path: Path) -> None:
    path = write_published(tmp_path, os.getpid(), age=-3600)
    with override_settings(POOLED_BACKEND_STATS_DIR=str(tmp_path)):
        text, document = StringIO(), StringIO()
        call_command("poolstats", stdout=text)
        call_command("poolstats", "--json", stdout=document)
        with pytest.raises(CommandError, match="suspicious pool statistics: it is stamped"):
            call_command("poolstats", "--check", stdout=StringIO())
    assert "Pools of 0 processes" in text.getvalue()
    assert (
        f"Suspicious: pid {os.getpid()} on {stats.HOSTNAME} (pytest): it is stamped 3600."
        in text.getvalue()
    )
    assert f"check who can write {tmp_path}." in text.getvalue()
    (process,) = json.loads(document.getvalue())["processes"]
    assert process["stale"] is True
    assert process["suspicious"].startswith("it is stamped 3600.")
    assert process["age_s"] < -3599
    # Kept, to be seen, while its pid runs; removed like any other once it does not.
    assert path.exists()


def test_a_snapshot_with_an_interval_no_process_uses_is_suspicious(tmp_path: Path) -> None:
    path = write_published(tmp_path, os.getpid(), age=600)
    data = json.loads(path.read_text())
    data["interval"] = 1e9  # would never go stale nor be removed
    path.write_text(json.dumps(data))
    (published,) = stats.read_snapshots(tmp_path)
    assert published.stale
    assert published.suspicious == "its interval 1000000000.0 is not one a process publishes at"


def test_a_snapshot_far_too_old_is_removed_whoever_wrote_it(tmp_path: Path) -> None:
    mine = write_published(tmp_path, os.getpid(), age=600)
    elsewhere = write_published(tmp_path, 4242, age=600, host="other-host")
    fresh_elsewhere = write_published(tmp_path, 4243, host="other-host")
    found = stats.read_snapshots(tmp_path)
    assert not mine.exists()
    assert not elsewhere.exists()
    assert [p.snapshot["pid"] for p in found] == [4243]
    assert fresh_elsewhere.exists()


def test_a_reused_pid_does_not_revive_a_dead_process_snapshot(tmp_path: Path) -> None:
    path = write_published(tmp_path, os.getpid())
    data = json.loads(path.read_text())
    data["start_time"] = "1"  # another process that had this pid
    path.write_text(json.dumps(data))
    assert stats.read_snapshots(tmp_path) == []
    assert not path.exists()


def test_unreadable_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / f"{stats.HOSTNAME}.{os.getpid()}.json").write_text("{not json")
    (tmp_path / "README").write_text("hello")
    other_schema = write_published(tmp_path, 4244, host="other-host")
    data = json.loads(other_schema.read_text())
    data["schema"] = 99
    other_schema.write_text(json.dumps(data))
    assert stats.read_snapshots(tmp_path) == []
    assert stats.read_snapshots(tmp_path / "missing") == []


def test_after_fork_the_child_publishes_under_its_own_pid(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json, os, sys, time, warnings
        import django
        django.setup()
        from django.db import connection
        from django_pooled_backend import stats

        def use():
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            connection.close()

        use()
        assert stats.publisher().pid == os.getpid()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            child = os.fork()
        if child == 0:
            try:
                assert stats.publisher() is None  # no thread came along
                use()
                stats.publisher().publish()
                print(json.dumps({"child": os.getpid()}), flush=True)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        stats.publisher().publish()
        print(json.dumps({"parent": os.getpid()}), flush=True)
        """
    )
    env = {
        **os.environ,
        "POOLSTATS_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    pids = {k: v for line in result.stdout.splitlines() for k, v in json.loads(line).items()}
    # The child's file was left behind (os._exit skips clean-up) and is
    # removed as soon as somebody reads; the parent removed its own at exit.
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {f"{stats.HOSTNAME}.{pids['child']}.json"}
    assert stats.read_snapshots(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_settings_that_are_not_a_directory_or_interval_are_refused(settings: Any) -> None:
    settings.POOLED_BACKEND_STATS_DIR = 42
    with pytest.raises(CommandError, match=r"POOLED_BACKEND_STATS_DIR is 42: it must be"):
        call_command("poolstats", stdout=StringIO())
    settings.POOLED_BACKEND_STATS_DIR = None
    with pytest.raises(CommandError, match=r"not published: .*POOLED_BACKEND_STATS_DIR is None"):
        call_command("poolstats", stdout=StringIO())
    settings.POOLED_BACKEND_STATS_INTERVAL = 0
    with pytest.raises(Exception, match=r"POOLED_BACKEND_STATS_INTERVAL is 0"):
        stats.configured_interval()


# -- rendering, from files written as processes write them -----------------------


@pytest.fixture
def two_processes(tmp_path: Path, settings: Any) -> Path:
    """Two live processes (this one and the parent of pytest) with one busy pool each."""
    write_published(tmp_path, os.getpid())
    write_published(tmp_path, os.getppid())
    settings.POOLED_BACKEND_STATS_DIR = str(tmp_path)
    return tmp_path


def test_text_view_shows_each_process_and_totals(two_processes: Path) -> None:
    out = StringIO()
    call_command("poolstats", stdout=out)
    text = out.getvalue()
    assert "Pools of 2 processes on" in text
    lines = text.splitlines()
    rows = [line.split() for line in lines if line.startswith((str(os.getpid()), "total"))]
    assert rows[0][0] == str(os.getpid())
    totals = [row for row in rows if row[0] == "total"]
    # SIZE MIN MAX LENT PINNED IDLE WAITING in the first table, summed.
    assert totals[0][2:9] == ["8", "2", "8", "8", "0", "0", "4"]
    assert "9.0s worker-1 at app/views.py:3 in v" in text
    assert "Problems:" in text
    assert "the pool is exhausted: all 4 connections are lent out and 2 requests" in text


def test_json_follows_the_documented_schema(two_processes: Path) -> None:
    out = StringIO()
    call_command("poolstats", "--json", "--database", "default", stdout=out)
    data = json.loads(out.getvalue())
    assert data["version"] == 1
    assert set(data) == {
        "version",
        "time",
        "host",
        "directory",
        "database",
        "wait_window",
        "processes",
        "totals",
        "problems",
    }
    assert data["database"] == "default"
    assert data["directory"] == str(two_processes)
    assert [p["pid"] for p in data["processes"]] == sorted([os.getpid(), os.getppid()])
    process = data["processes"][0]
    assert set(process) == {
        "pid",
        "host",
        "program",
        "updated",
        "age_s",
        "stale",
        "suspicious",
        "interval_s",
        "pools",
    }
    assert set(process["pools"][0]) == set(SAMPLE_POOL)
    (total,) = data["totals"]
    assert total["processes"] == 2
    assert total["requests_served"] == 16
    assert total["lent"] == 8
    assert total["wait"] == {
        "window": 16,
        "mean_ms": 1.5,
        "p95_ms": 4.0,
        "p99_ms": 6.0,
        "max_ms": 6.0,
    }
    assert total["oldest_holder_s"] == 9.0
    assert total["oldest_waiter_s"] == 7.5
    assert len(data["problems"]) == 4  # exhausted and waited too long, twice


def set_databases(settings: Any, databases: dict[str, Any]) -> None:
    """Replace DATABASES for one test (Django warns that connections will not follow)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        settings.DATABASES = databases


def test_database_option_keeps_only_that_alias(two_processes: Path, settings: Any) -> None:
    set_databases(settings, {**settings.DATABASES, "replica": dict(settings.DATABASES["default"])})
    out = StringIO()
    call_command("poolstats", "--database", "replica", stdout=out)
    assert "No running process on" in out.getvalue()
    assert "for database alias 'replica'" in out.getvalue()


def test_prometheus_output_parses_and_carries_every_pool_figure(two_processes: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    out = StringIO()
    call_command("poolstats", "--prometheus", stdout=out)
    families = {f.name: f for f in text_string_to_metric_families(out.getvalue())}
    assert all(name.startswith("django_pooled_backend_") for name in families)
    lent = families["django_pooled_backend_connections_lent"]
    assert lent.type == "gauge"
    assert {(s.labels["pid"], s.value) for s in lent.samples} == {
        (str(os.getpid()), 4.0),
        (str(os.getppid()), 4.0),
    }
    served = families["django_pooled_backend_requests_served"]
    assert served.type == "counter"
    assert [s.name for s in served.samples] == ["django_pooled_backend_requests_served_total"] * 2
    assert {s.labels["alias"] for s in served.samples} == {"default"}
    wait = families["django_pooled_backend_wait_recent_seconds"]
    assert {
        s.labels["stat"]: s.value for s in wait.samples if s.labels["pid"] == str(os.getpid())
    } == {
        "mean": 0.0015,
        "p95": 0.004,
        "p99": 0.006,
        "max": 0.006,
    }
    processes = families["django_pooled_backend_processes"]
    assert {s.labels["state"]: s.value for s in processes.samples} == {"live": 2, "stale": 0}
    for metric in stats.METRICS:
        assert f"django_pooled_backend_{metric.name}" in families


def test_check_fails_on_an_exhausted_pool_and_a_long_wait(two_processes: Path) -> None:
    with pytest.raises(CommandError) as excinfo:
        call_command("poolstats", "--check", stdout=StringIO())
    assert excinfo.value.returncode == 1
    assert "poolstats --check found 4 problems; the first: pid" in str(excinfo.value)
    assert "the pool is exhausted" in str(excinfo.value)


def test_check_passes_on_healthy_pools(tmp_path: Path, settings: Any) -> None:
    path = write_published(tmp_path, os.getpid())
    data = json.loads(path.read_text())
    data["pools"][0].update(lent=1, idle=3, waiting=0, oldest_waiter_s=None)
    path.write_text(json.dumps(data))
    settings.POOLED_BACKEND_STATS_DIR = str(tmp_path)
    out = StringIO()
    call_command("poolstats", "--check", stdout=out)
    assert "Problems:" not in out.getvalue()
    # Waiters alone are fine until they wait longer than --max-wait.
    data["pools"][0].update(waiting=1, oldest_waiter_s=2.0)
    path.write_text(json.dumps(data))
    call_command("poolstats", "--check", "--max-wait", "3", stdout=StringIO())
    with pytest.raises(CommandError, match=r"a request has waited 2.0s .*more than 1s"):
        call_command("poolstats", "--check", "--max-wait", "1", stdout=StringIO())


def test_no_process_is_said_plainly_and_fails_only_under_check(
    tmp_path: Path, settings: Any
) -> None:
    settings.POOLED_BACKEND_STATS_DIR = str(tmp_path / "nobody")
    out = StringIO()
    call_command("poolstats", stdout=out)
    assert out.getvalue() == (
        f"No running process on {stats.HOSTNAME} publishes pool statistics "
        f"(looked in {tmp_path / 'nobody'}). Start the server processes, or make sure they "
        "use the same settings (POOLED_BACKEND_STATS_DIR).\n"
    )
    document = StringIO()
    call_command("poolstats", "--json", stdout=document)
    assert json.loads(document.getvalue())["processes"] == []
    with pytest.raises(CommandError, match="No running process on"):
        call_command("poolstats", "--check", stdout=StringIO())


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--database", "nope"],
            "The database alias 'nope' is not in settings.DATABASES (its aliases: 'default').",
        ),
        (["--json", "--prometheus"], "--json and --prometheus cannot be used together"),
        (["--watch", "1", "--json"], "it cannot be combined with --json."),
        (["--watch", "1", "--check"], "it cannot be combined with --check."),
        (["--watch", "1", "--prometheus"], "it cannot be combined with --prometheus."),
        (["--max-wait", "3"], "--max-wait only applies with --check."),
        (["--server", "--prometheus"], "it cannot be combined with --prometheus."),
        (["--server", "--check"], "it cannot be combined with --check."),
    ],
)
def test_bad_input_is_a_one_line_command_error(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as excinfo:
        call_command("poolstats", *args, stdout=StringIO())
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


WATCH_RANGE = "is not a number of seconds more than 0 and at most 3600; use for example --watch 2."


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--watch", "inf"], "'inf' is not a finite number of seconds; use for example --watch 2."),
        (["--watch", "nan"], "'nan' is not a finite number of seconds"),
        (["--watch=-inf"], "'-inf' is not a finite number of seconds"),
        (["--watch", "soon"], "'soon' is not a finite number of seconds"),
        (["--watch", "0"], f"'0' {WATCH_RANGE}"),
        (["--watch", "-1"], f"'-1' {WATCH_RANGE}"),
        (["--watch", "1e300"], f"'1e300' {WATCH_RANGE}"),
        (["--check", "--max-wait", "nan"], "'nan' is not a finite number of seconds"),
        (["--check", "--max-wait", "inf"], "'inf' is not a finite number of seconds"),
        (["--check", "--max-wait", "-1"], "'-1' is not a number of seconds of 0 or more"),
    ],
)
def test_bad_seconds_are_a_usage_error(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as excinfo:
        call_command("poolstats", *args, stdout=StringIO())
    flag = next(arg for arg in args if arg.startswith(("--watch", "--max-wait"))).split("=")[0]
    assert str(excinfo.value).startswith(f"Error: argument {flag}: {message}")


@pytest.mark.parametrize("seconds", ["inf", "nan", "-1", "0"])
def test_bad_watch_seconds_from_the_command_line_print_usage_not_a_traceback(
    seconds: str,
) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "poolstats", "--watch", seconds],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: manage.py poolstats")
    assert result.stderr.splitlines()[-1].startswith(
        f"manage.py poolstats: error: argument --watch: '{seconds}' is not a"
    )


def test_an_alias_of_another_engine_or_without_pool_is_refused(settings: Any) -> None:
    set_databases(
        settings,
        {
            **settings.DATABASES,
            "legacy": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
            "plain": {**settings.DATABASES["default"], "OPTIONS": {"pool": False}},
        },
    )
    with pytest.raises(CommandError) as excinfo:
        call_command("poolstats", "--database", "legacy", stdout=StringIO())
    assert str(excinfo.value) == (
        "The database alias 'legacy' uses ENGINE 'django.db.backends.sqlite3', not "
        "'django_pooled_backend': it has no pool to show."
    )
    with pytest.raises(CommandError, match=r"'plain' sets OPTIONS\['pool'\] to False"):
        call_command("poolstats", "--database", "plain", "--server", stdout=StringIO())


def test_server_view_without_any_pooled_alias_is_refused(settings: Any) -> None:
    set_databases(
        settings, {"legacy": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
    )
    with pytest.raises(CommandError) as excinfo:
        call_command("poolstats", "--server", stdout=StringIO())
    assert str(excinfo.value) == (
        "No alias in settings.DATABASES uses ENGINE 'django_pooled_backend': there is no "
        "pooled database server to look at."
    )


@pytest.mark.slow
def test_server_that_cannot_be_reached_is_a_command_error_without_password() -> None:
    url = os.environ["DATABASE_URL"]
    user, rest = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[0], url.split("@", 1)[1]
    env = {**os.environ, "DATABASE_URL": f"postgres://{user}:wrong-pw-123@{rest}"}
    result = subprocess.run(
        [sys.executable, "manage.py", "poolstats", "--server"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.startswith("CommandError: Could not read pg_stat_activity on 127.0.0.1:")
    assert "(database alias 'default')" in message
    assert "wrong-pw-123" not in message
    assert "\n" not in message


def test_server_view_attributes_this_process_connections(transactional_db: None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    document = StringIO()
    call_command("poolstats", "--server", "--json", stdout=document)
    connection.close()
    (view,) = json.loads(document.getvalue())["servers"]
    (mine,) = [p for p in view["pools"] if p["pid"] == os.getpid()]
    assert (mine["host"], mine["alias"], mine["process"]) == (stats.HOSTNAME, "default", "running")
    assert mine["states"].get("idle", 0) + mine["states"].get("active", 0) >= 1
    assert mine["oldest_connection_s"] >= 0
    text = StringIO()
    call_command("poolstats", "--server", "--database", "default", stdout=text)
    assert re.search(rf" {os.getpid()} +default +running ", text.getvalue())
    assert "headroom" in text.getvalue()


def test_system_check_reports_bad_statistics_settings(settings: Any) -> None:
    from django_pooled_backend.checks import check_stats_settings

    assert check_stats_settings() == []
    settings.POOLED_BACKEND_STATS_DIR = 42
    settings.POOLED_BACKEND_STATS_INTERVAL = "1s"
    errors = check_stats_settings()
    assert [e.id for e in errors] == ["django_pooled_backend.E005"] * 2
    assert "POOLED_BACKEND_STATS_DIR is 42" in errors[0].msg
    assert "POOLED_BACKEND_STATS_INTERVAL is '1s'" in errors[1].msg
