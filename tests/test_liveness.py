"""Only live connections are lent: killed, timed-out, restarted, expired and idle ones."""

from __future__ import annotations

import copy
import select
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connection
from django.db.backends.postgresql.base import DatabaseWrapper as DjangoWrapper

from django_pooled_backend import registry, signals
from django_pooled_backend.base import DatabaseWrapper
from django_pooled_backend.errors import ConnectionFailed
from django_pooled_backend.pool import RETRY_BACKOFF
from testproject import pgserver
from testproject.launch import wait_for

from .conftest import Wrappers, pooled, server_pids, wait_gone


def backend_pid(wrapper: Any) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    return int(pid)


def terminate(admin: psycopg.Connection[Any], pid: int) -> None:
    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_gone(admin, pid)


def saw_goodbye(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server's end of ``conn`` is closed, as its socket says (POLLRDHUP, Linux).

    A terminated backend leaves pg_stat_activity a moment before its process
    exits and closes the socket: until then no client can see it is gone.
    Elsewhere this says whether the socket is readable.
    """
    poller = select.poll()
    poller.register(conn.pgconn.socket, getattr(select, "POLLRDHUP", select.POLLIN))
    return bool(poller.poll(0))


@pytest.fixture(params=["pooled", pytest.param("django", marks=pytest.mark.xfail(strict=True))])
def killable(request: pytest.FixtureRequest, transactional_db: None) -> Iterator[Any]:
    """A pool of one connection, checked only by what costs no round trip."""
    alias = f"killable_{request.param}"
    settings_dict = copy.deepcopy(connection.settings_dict)
    options = {k: v for k, v in settings_dict["OPTIONS"].items() if k != "pool"}
    if request.param == "pooled":
        # A long check_after: only the free socket check can save us.
        options["pool"] = pooled({"min_size": 1, "max_size": 1, "check_after": 3600})
        wrapper: Any = DatabaseWrapper({**settings_dict, "OPTIONS": options}, alias)
    else:
        options["pool"] = {"min_size": 1, "max_size": 1}
        wrapper = DjangoWrapper({**settings_dict, "OPTIONS": options}, alias)
    yield wrapper
    wrapper.close()
    if request.param == "pooled":
        registry.close_alias(alias)
    else:
        wrapper.close_pool()


def test_connection_killed_while_idle_is_never_lent(
    killable: Any, admin: psycopg.Connection[Any]
) -> None:
    pid = backend_pid(killable)
    killable.close()
    terminate(admin, pid)
    idle = killable.pool.idle_connections()
    wait_for(lambda: all(saw_goodbye(conn) for conn in idle))
    # The next request succeeds, on a new server connection.
    new_pid = backend_pid(killable)
    killable.close()
    assert new_pid != pid


def test_killed_idle_connection_is_discarded_with_the_servers_goodbye(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    # What the server said before closing (its FATAL message, read without a
    # round trip) is the reason the connection is discarded.
    wrapper = make_wrapper("goodbye", {"min_size": 1, "max_size": 1, "check_after": 3600})
    pid = backend_pid(wrapper)
    wrapper.close()
    terminate(admin, pid)
    (pool,) = registry.pools_for_alias("goodbye")
    wait_for(lambda: all(saw_goodbye(conn) for conn in pool.idle_connections()))
    reasons: list[str] = []

    def discarded(sender: Any, reason: str, **kwargs: Any) -> None:
        reasons.append(reason)

    signals.connection_discarded.connect(discarded)
    try:
        new_pid = backend_pid(wrapper)
        wrapper.close()
    finally:
        signals.connection_discarded.disconnect(discarded)
    assert new_pid != pid
    assert len(reasons) == 1
    assert "terminating connection due to administrator command" in reasons[0]


def test_borrow_check_lets_no_other_thread_run(make_wrapper: Wrappers) -> None:
    # Borrowing and returning keep the GIL: where they released it (poll(),
    # pgconn.notifies()), another thread took it each time and the borrower
    # waited to get it back, which cut the throughput of every threaded
    # server (see docs/benchmarks.rst).  With a long switch interval, a
    # thread that wants the GIL only gets it when it is released.
    if psycopg.pq.__impl__ == "python":
        pytest.fail("psycopg's C implementation is needed: pip install 'psycopg[binary]'")
    # check_after: starting the spinner takes a switch interval, after which
    # a borrow would make its round trip (which rightly lets others run).
    # reset "auto": a clean session has no reset whose answer to wait for
    # (waiting for the server rightly lets others run too).
    wrapper = make_wrapper(
        "gil", {"min_size": 1, "max_size": 2, "check_after": 3600, "reset": "auto"}
    )
    for _ in range(3):  # the pool filled, the connection parked
        backend_pid(wrapper)
        wrapper.close()
    ran = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            ran[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    spinner = threading.Thread(target=spin, name="spinner", daemon=True)
    try:
        spinner.start()  # back here when the spinner is forced to let go: it waits now
        # Another thread that wakes (the pool's own) may claim the GIL at the
        # end of its switch interval, rarely but at any time: of three
        # rounds, one without the spinner running is proof enough, where a
        # borrow that releases the GIL lets it run in every round.
        advanced = []
        for _ in range(3):
            before = ran[0]
            for _ in range(100):
                wrapper.ensure_connection()
                wrapper.close()
            advanced.append(ran[0] - before)
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        spinner.join(10)
    assert 0 in advanced, advanced


def test_idle_session_timeout_does_not_reach_the_application(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper(
        "idle_timeout",
        {"min_size": 1, "max_size": 1, "check_after": 3600},
        OPTIONS={"options": "-c idle_session_timeout=200"},
    )
    pid = backend_pid(wrapper)
    wrapper.close()
    time.sleep(0.6)  # the server closes the idle session after 200 ms
    new_pid = backend_pid(wrapper)
    wrapper.close()
    assert new_pid != pid


def test_connection_killed_while_lent_fails_that_request_only(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("killed_in_use", {"min_size": 1, "max_size": 1})
    pid = backend_pid(wrapper)
    wrapper.ensure_connection()  # lent now, in both release modes
    terminate(admin, pid)
    with pytest.raises(OperationalError), wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
    wrapper.close()
    new_pid = backend_pid(wrapper)
    wrapper.close()
    assert new_pid != pid
    (pool,) = registry.pools_for_alias("killed_in_use")
    assert pool.state()["lent"] == 0


@pytest.fixture(scope="module")
def private_server() -> Iterator[pgserver.Server]:
    """A server of its own, that the restart test may restart."""
    data = Path(pgserver.DEFAULT_DATA_DIR).parent / "restart-test"
    server = pgserver.start(data)
    pgserver.ensure_database(server, "restart")
    with psycopg.connect(server.dsn("restart"), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS acked (id uuid PRIMARY KEY)")
        conn.execute("TRUNCATE acked")
    yield server
    pgserver.stop(data)


@pytest.mark.slow
def test_server_restart_under_load_loses_no_acknowledged_write(
    private_server: pgserver.Server, transactional_db: None
) -> None:
    settings_dict = copy.deepcopy(connection.settings_dict)
    settings_dict.update(
        NAME="restart",
        USER=private_server.user,
        PASSWORD=private_server.password,
        HOST=private_server.host,
        PORT=private_server.port,
    )
    settings_dict["OPTIONS"] = {"pool": pooled({"min_size": 2, "max_size": 4, "timeout": 10})}
    acked: list[str] = []
    failures: list[tuple[float, BaseException]] = []
    started_ok_after: list[float] = []
    stop = threading.Event()
    up_at: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        wrapper = DatabaseWrapper(copy.deepcopy(settings_dict), "restarting")
        while not stop.is_set():
            started = time.monotonic()
            key = str(uuid.uuid4())
            try:
                with wrapper.cursor() as cursor:
                    cursor.execute("INSERT INTO acked (id) VALUES (%s)", [key])
                with lock:
                    acked.append(key)
                    started_ok_after.append(started)
            except Exception as exc:
                with lock:
                    failures.append((started, exc))
            finally:
                wrapper.close()
            time.sleep(0.002)

    threads = [threading.Thread(target=work, name=f"writer-{i}") for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        pgserver.restart(private_server.data_dir)
        up_at.append(time.monotonic())
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    try:
        assert not any(t.is_alive() for t in threads)
        # Requests in flight during the restart may fail, with Django's error...
        assert all(isinstance(exc, OperationalError) for _, exc in failures), failures[:3]
        # ...and so may those of the first back-off period after the server
        # accepts connections again, with the last failed attempt's reason
        # (they fail at once rather than wait)...
        longest = RETRY_BACKOFF[1]
        stale = [exc for t, exc in failures if up_at[0] <= t < up_at[0] + longest]
        assert all(isinstance(exc.__cause__, ConnectionFailed) for exc in stale), stale[:3]
        # ...but none that started after it.
        late = [(t, exc) for t, exc in failures if t >= up_at[0] + longest]
        assert late == []
        assert any(t >= up_at[0] for t in started_ok_after)
        with psycopg.connect(private_server.dsn("restart")) as conn:
            stored = {str(r[0]) for r in conn.execute("SELECT id FROM acked").fetchall()}
        assert set(acked) <= stored
        (pool,) = registry.pools_for_alias("restarting")
        wait_for(lambda: pool.state()["size"] >= 2)
        assert pool.state()["lent"] == 0
    finally:
        registry.close_alias("restarting")


def test_max_lifetime_retires_connections_with_jitter(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper(
        "lifetime", {"min_size": 4, "max_size": 4, "max_lifetime": 600, "timeout": 10}
    )
    backend_pid(wrapper)
    wrapper.close()
    (pool,) = registry.pools_for_alias("lifetime")
    pool.wait(10)
    now = time.monotonic()
    expiries = [c._expire_at - now for c in pool.idle_connections()]
    assert len(expiries) == 4
    # Opened together (within a second), they do not all expire together:
    # each loses a random part of up to 5% (30 s) of its lifetime.
    assert max(expiries) - min(expiries) > 1.0
    assert all(560 <= expiry <= 600 for expiry in expiries)


def test_expired_connection_is_replaced_when_it_comes_back(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    wrapper = make_wrapper("expiring", {"min_size": 1, "max_size": 1, "max_lifetime": 0.5})
    first = backend_pid(wrapper)
    wrapper.ensure_connection()  # lent across its lifetime, in both release modes
    time.sleep(0.7)
    wrapper.close()  # past its lifetime: closed on return
    second = backend_pid(wrapper)
    wrapper.close()
    assert second != first
    app = make_wrapper.application_name("expiring")
    wait_for(lambda: first not in server_pids(admin, app))


def test_idle_connections_above_min_size_are_closed_after_max_idle(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    options = {"min_size": 1, "max_size": 4, "max_idle": 0.3, "timeout": 10}
    app = make_wrapper.application_name("idle")
    barrier = threading.Barrier(4)

    def hold() -> None:
        wrapper = make_wrapper("idle", options)
        wrapper.ensure_connection()
        barrier.wait(10)
        wrapper.close()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(server_pids(admin, app)) == 4
    wait_for(lambda: len(server_pids(admin, app)) == 1, timeout=20)
