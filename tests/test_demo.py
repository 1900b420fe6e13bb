"""The README's demo (``bash .ci/demo``): the page it prints answers, and stays up to be seen."""

from __future__ import annotations

import http.client
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = re.compile(r"== the live pools in the Django admin: http://127\.0\.0\.1:(\d+)(/\S+)")

pytestmark = pytest.mark.slow


def demo(*args: str, stdin: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """``python -m testproject.demo``, stdin not a terminal (as in CI), output read as it comes."""
    return subprocess.Popen(
        [sys.executable, "-m", "testproject.demo", "--seconds", "1", *args],
        cwd=ROOT,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )


def stop(run: subprocess.Popen[str]) -> None:
    """End a demo still running through its cleanup (SIGTERM), so that its gunicorn stops too."""
    if run.poll() is None:
        run.send_signal(signal.SIGTERM)
        try:
            run.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            run.kill()  # its gunicorn may be left: say so in the failure
            raise
    run.communicate(timeout=30)  # and close the pipe


def lines(stream: IO[str], seen: list[str]) -> Iterator[str]:
    for line in stream:
        seen.append(line)
        yield line


def status(port: int, path: str) -> int:
    """The status of ``GET path`` (an OSError if nothing answers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_address_is_printed_when_the_page_answers_and_the_site_stays_up() -> None:
    run = demo("--stay", "600")
    seen: list[str] = []
    try:
        assert run.stdout is not None
        output = lines(run.stdout, seen)
        for line in output:
            if match := ADDRESS.match(line):
                port, path = int(match[1]), match[2]
                # The page answers as soon as its address is printed (a login first).
                assert status(port, path) == 302, "".join(seen)
                break
        else:
            pytest.fail("no address printed:\n" + "".join(seen))
        for line in output:
            if line.startswith("== the site stays up under the same load for 600s"):
                break
        else:
            pytest.fail("the site did not stay up:\n" + "".join(seen))
        # The summary is printed; the page is still there to be looked at.
        assert "== python manage.py poolstats --server" in "".join(seen)
        assert status(port, path) == 302
        assert status(port, f"/admin/login/?next={path}") == 200
        run.send_signal(signal.SIGTERM)  # as a CI timeout would: the cleanup runs
        seen.append(run.communicate(timeout=60)[0])
        assert run.returncode == 128 + signal.SIGTERM, "".join(seen)
        with pytest.raises(ConnectionRefusedError):
            status(port, path)
    finally:
        stop(run)


def test_without_a_terminal_the_demo_ends_after_its_summary() -> None:
    run = demo()
    try:
        out = run.communicate(timeout=300)[0]
    finally:
        stop(run)
    assert run.returncode == 0, out
    assert "== python manage.py poolstats --server" in out
    assert "then the demo ends" in out
    assert "== the site stays up" not in out


def test_in_a_terminal_the_site_stays_up_until_ctrl_c() -> None:
    terminal, tty = pty.openpty()
    run = demo(stdin=tty)
    os.close(tty)
    seen: list[str] = []
    try:
        assert run.stdout is not None
        for line in lines(run.stdout, seen):
            if line.startswith("== the site stays up under the same load until Ctrl-C"):
                break
        else:
            pytest.fail("the site did not stay up:\n" + "".join(seen))
        run.send_signal(signal.SIGINT)
        out = run.communicate(timeout=60)[0]
        assert run.returncode == 0, "".join(seen) + out
        assert out.startswith("== stopped"), out
    finally:
        os.close(terminal)
        stop(run)
