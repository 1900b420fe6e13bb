"""Start the testproject's site and wait for what was started: one launcher for all.

The demo (``testproject/demo.py``), the tests (``tests/live.py``,
``tests/test_prometheus.py``) and ``bench/`` start gunicorn (or uvicorn)
through :func:`start_site`; the PostgreSQL server comes from
:func:`testproject.pgserver.database_url` and PgBouncer from
:mod:`testproject.pgbouncer`.  Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], T], timeout: float = 30, what: str = "", interval: float = 0.05
) -> T:
    """Poll ``condition`` until it returns something true, and return that.

    After ``timeout`` seconds, an ``AssertionError`` naming ``what``.  A
    poll, not a timed assertion: ``timeout`` is how long to give up after.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what or condition} after {timeout:g}s")
        time.sleep(interval)


def http_status(port: int, path: str, timeout: float = 5) -> int | None:
    """The status of ``GET path`` on 127.0.0.1:``port``, or None if nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def manage(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``manage.py *args`` in a process of its own, output captured."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=dict(os.environ if env is None else env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Site:
    """The testproject served by gunicorn (or uvicorn) on 127.0.0.1."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, path: str = "/whoami/", ok: Sequence[int] = (200,), timeout: float = 60) -> None:
        """Until ``GET path`` answers one of ``ok``; fails at once if the server exited."""

        def answered() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with status {self.process.returncode}")
            return http_status(self.port, path) in ok

        wait_for(answered, timeout=timeout, what=f"{path} on {self.url}", interval=0.1)

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; True if it had to be killed."""
        if self.process.poll() is not None:
            return False
        self.process.terminate()
        try:
            self.process.wait(timeout)
            return False
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)
            return True


def start_site(
    env: Mapping[str, str],
    *,
    workers: int = 2,
    threads: int = 4,
    args: Sequence[str] = (),
    asgi: bool = False,
    port: int | None = None,
) -> Site:
    """Start gunicorn on the testproject's WSGI application, ``env`` its environment.

    ``workers`` processes of ``threads`` threads; ``args`` adds to gunicorn's
    arguments.  With ``asgi``, uvicorn serves the ASGI application instead,
    in one process.  Returns at once: :meth:`Site.wait` waits until it answers.
    """
    port = port or free_port()
    if asgi:
        command = [
            *("-m", "uvicorn", "testproject.asgi:application"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        ]
    else:
        command = [
            *("-m", "gunicorn", "testproject.wsgi"),
            *("--workers", str(workers), "--threads", str(threads)),
            # Stopped, it ends within seconds: no request of a test or of
            # the demo is worth waiting for longer.
            *("--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5"),
            *("--log-level", "warning", *args),
        ]
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=dict(env))
    return Site(port, process)


@contextlib.contextmanager
def site(
    env: Mapping[str, str],
    *,
    workers: int = 2,
    threads: int = 4,
    args: Sequence[str] = (),
    asgi: bool = False,
    ready: str = "/whoami/",
) -> Iterator[Site]:
    """:func:`start_site`, once ``GET ready`` answers 200; stopped at the end."""
    running = start_site(env, workers=workers, threads=threads, args=args, asgi=asgi)
    try:
        running.wait(ready)
        yield running
    finally:
        running.stop()
