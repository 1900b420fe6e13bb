"""bench/run.py works end to end: a quick run writes every cell, without errors.

No timing is asserted here: the numbers are only meaningful from a full run
on a quiet machine (see docs/benchmarks.rst).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from bench.strategies import POOL_MAX

from .conftest import admin_dsn

ROOT = Path(__file__).resolve().parent.parent
DB = "dpb_bench_smoke"

pytestmark = pytest.mark.slow


def test_quick_run_writes_every_cell_without_errors(tmp_path: Path) -> None:
    url = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + "/" + DB
    try:
        result = subprocess.run(
            [
                sys.executable,
                "bench/run.py",
                "--quick",
                "--strategies",
                "persistent,pooled",
                "--workloads",
                "a,b",
                "--threads",
                "1,4",
                "--seconds",
                "0.5",
                "--warmup",
                "0.3",
                "--micro-iterations",
                "100",
                "--paired-rounds",
                "3",
                "--items",
                "200",
                "--output-dir",
                str(tmp_path),
            ],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": url},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        with psycopg.connect(admin_dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DB))
            )
    assert result.returncode == 0, result.stdout + result.stderr

    data = json.loads((tmp_path / "latest.json").read_text())
    summary = data["summary"]
    cells = {(s["workload"], s["threads"], s["strategy"]) for s in summary}
    assert cells == {(w, t, s) for w in "ab" for t in (1, 4) for s in ("persistent", "pooled")}
    for s in summary:
        assert s["errors"] == 0, s
        assert s["rps_median"] > 0, s
        assert s["threads_progressed_min"] == s["threads"], s
        if s["strategy"] == "persistent":
            assert s["peak_server_connections"] <= s["threads"] + 1, s
        else:
            # A pool that opens while its first borrowers wait may grow past
            # the thread count (psycopg_pool grows while clients wait), never
            # past max_size.
            assert s["peak_server_connections"] <= POOL_MAX, s
    assert {m["strategy"] for m in data["microbenchmark"]} == {"persistent", "pooled"}
    assert {p["strategy"] for p in data["t1_alternating"]} == {"persistent", "pooled"}
    for key in ("cpu", "python", "django", "psycopg", "postgresql"):
        assert data["machine"][key], key

    markdown = (tmp_path / "latest.md").read_text()
    assert "| pooled | 1 |" in markdown
    assert "(b) request: get, then an update in atomic(): details" in markdown


def test_quick_run_report_is_valid_restructuredtext(tmp_path: Path) -> None:
    docutils_core = pytest.importorskip("docutils.core")
    from bench import report

    cells = [
        {
            "rep": 0,
            "strategy": strategy,
            "workload": "a",
            "threads": 1,
            "requests": 10,
            "rps": rps,
            "mean_ms": 1.0,
            "p50_ms": 1.0,
            "p99_ms": 2.0,
            "peak_server_connections": 1,
            "errors": errors,
            "first_error": "OperationalError: *bad* `thing` | _x_" if errors else None,
            "threads_progressed": 1,
            "hung_threads": 0,
        }
        for strategy, rps, errors in (("persistent", 100.0, 0), ("pooled", 99.0, 1))
    ]
    paths = report.write(
        tmp_path,
        {"cpu": "test *cpu*"},
        {"command": "bench/run.py --quick"},
        cells,
        [{"strategy": "pooled", "rep": 0, "connect_close_us": 10.0, "lifecycle_us": 20.0}],
        [],
        ["persistent", "pooled"],
        {"a": "request: get by primary key"},
    )
    text = "Results\n-------\n\n" + paths["rst"].read_text()
    # Raises on any warning: the docs include this file and build with -W.
    docutils_core.publish_doctree(text, settings_overrides={"halt_level": 2, "report_level": 2})
