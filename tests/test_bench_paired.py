"""bench/paired.py, bench/handoff.py and bench/wrk.py run end to end and report every row.

Each runs for a fraction of a second per window on a database of its own.
No timing is asserted: the figures only mean something from a full run
(see docs/benchmarks.rst); the tests prove that every variant ran, without
errors, and that the output has the rows the docs describe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from .conftest import admin_dsn, require_pgbouncer

ROOT = Path(__file__).resolve().parent.parent
DB = "dpb_bench_paired_smoke"

pytestmark = pytest.mark.slow


@pytest.fixture
def database_url() -> Iterator[str]:
    """``DATABASE_URL`` of a database of its own on the test server, dropped afterwards."""

    def drop() -> None:
        with psycopg.connect(admin_dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB))
            )

    drop()
    with psycopg.connect(admin_dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    try:
        yield os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/" + DB
    finally:
        drop()


def run(script: str, url: str, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def rows(output: str) -> set[tuple[str, str]]:
    """(T, variant) of every row of the markdown table."""
    found = set()
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("T", "") and not cells[0].startswith("-"):
            found.add((cells[0].split()[0], cells[1]))
    return found


def test_paired_light_reports_every_thread_count_and_variant(
    database_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "paired.json"
    output = run(
        "bench/paired.py",
        database_url,
        *("--threads", "1,4", "--rounds", "2", "--seconds", "0.05", "--settle", "0.02"),
        *("--items", "50", "--json", str(out)),
    )
    variants = ("persistent", "pooled", "django_pool")
    assert rows(output) == {(t, v) for t in ("1", "4") for v in variants}
    summary = json.loads(out.read_text())["summary"]
    for threads in ("1", "4"):
        for variant in variants:
            assert summary[threads][variant]["errors"] == 0
            assert summary[threads][variant]["rounds"] == 2


def test_paired_io_workload_runs_transaction_release(database_url: str) -> None:
    output = run(
        "bench/paired.py",
        database_url,
        *("--workload", "io", "--threads", "8", "--rounds", "1"),
        *("--seconds", "0.1", "--settle", "0.05", "--items", "50"),
    )
    assert rows(output) == {("8", "persistent"), ("8", "transaction")}
    assert "first error" not in output


def test_handoff_reports_every_hand_off(database_url: str, tmp_path: Path) -> None:
    out = tmp_path / "handoff.json"
    output = run(
        "bench/handoff.py",
        database_url,
        *("--threads", "4,12", "--rounds", "2", "--seconds", "0.05", "--settle", "0.02"),
        *("--items", "50", "--json", str(out)),
    )
    variants = {"dedicated", "psycopg_pool", "simplequeue", "fifo"}
    try:
        import django_pooled_backend.handoff  # noqa: F401
    except ImportError:
        assert "handoff skipped" in output
    else:
        variants.add("handoff")
    assert rows(output) == {(t, v) for t in ("4", "12") for v in variants}
    summary = json.loads(out.read_text())
    assert all(s["errors"] == 0 for by in summary.values() for s in by.values())


def test_wrk_reports_every_variant(database_url: str) -> None:
    if shutil.which("wrk") is None:
        message = "wrk is not installed: apt-get install -y wrk (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    require_pgbouncer()
    output = run(
        "bench/wrk.py",
        database_url,
        *("--threads", "2", "--workers", "1", "--max-size", "2"),
        *("--rounds", "1", "--seconds", "1", "--items", "50"),
    )
    variants = ("persistent", "pooled", "django_pool", "pgbouncer")
    assert rows(output) == {("2", v) for v in variants}
    for line in output.splitlines():
        if line.startswith("| 2 "):
            assert line.rstrip(" |").endswith(" 0"), line  # no errors, no non-2xx
