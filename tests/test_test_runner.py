"""The test runner with a warm pool: create, clone, keep and destroy test databases.

Each test runs ``manage.py test`` in a subprocess against its own database
(``dpb_runner``), so that it cannot disturb the test database of this run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from .conftest import admin_dsn

ROOT = Path(__file__).resolve().parent.parent
DB = "dpb_runner"

pytestmark = pytest.mark.slow


def database_url(name: str) -> str:
    url = os.environ["DATABASE_URL"]
    return url.rsplit("/", 1)[0] + "/" + name


def manage(
    *args: str, marker: str = "unused", release: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url(DB),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "DPB_RUNNER_MARKER": marker,
        "PYTHONWARNINGS": "error::ResourceWarning",
    }
    if release is not None:
        env["POOL_RELEASE"] = release
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def databases(admin: psycopg.Connection[Any]) -> set[str]:
    return {name for (name,) in admin.execute("SELECT datname FROM pg_database").fetchall()}


@pytest.fixture(scope="module")
def runner_db() -> Iterator[None]:
    with psycopg.connect(admin_dsn(), autocommit=True) as admin:
        for name in (DB, f"test_{DB}"):
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    result = manage("migrate", "--noinput")
    assert result.returncode == 0, result.stderr
    yield
    with psycopg.connect(admin_dsn(), autocommit=True) as admin:
        for name in (DB, f"test_{DB}", f"test_{DB}_1", f"test_{DB}_2"):
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def real_rows(marker: str) -> int:
    with psycopg.connect(admin_dsn(DB)) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM shop_item WHERE name = %s", [marker]
        ).fetchone()  # type: ignore[misc]
    return int(count)


def test_import_time_query_sends_nothing_to_the_real_database(
    runner_db: None, admin: psycopg.Connection[Any]
) -> None:
    marker = f"runner-{uuid.uuid4()}"
    result = manage("test", "tests.django_runner_cases", "--noinput", "-v", "2", marker=marker)
    assert result.returncode == 0, result.stderr
    assert "Ran 6 tests" in result.stderr
    assert real_rows(marker) == 0
    # Destroyed despite the pool's warm connections to it.
    assert f"test_{DB}" not in databases(admin)


def test_parallel_clones_are_created_and_destroyed_with_a_warm_pool(
    runner_db: None, admin: psycopg.Connection[Any]
) -> None:
    marker = f"parallel-{uuid.uuid4()}"
    result = manage(
        "test", "tests.django_runner_cases", "--noinput", "--parallel", "2", marker=marker
    )
    assert result.returncode == 0, result.stderr
    assert "Cloning test database" in result.stderr or "Ran 6 tests" in result.stderr
    assert real_rows(marker) == 0
    assert not {f"test_{DB}", f"test_{DB}_1", f"test_{DB}_2"} & databases(admin)


@pytest.mark.parametrize("release", ["request", "transaction"])
def test_the_test_runner_runs_in_both_release_modes(runner_db: None, release: str) -> None:
    marker = f"{release}-{uuid.uuid4()}"
    result = manage(
        "test", "tests.django_runner_cases", "--noinput", marker=marker, release=release
    )
    assert result.returncode == 0, result.stderr
    assert "Ran 6 tests" in result.stderr
    assert "OK" in result.stderr
    assert real_rows(marker) == 0


def test_keepdb_reuses_the_test_database(runner_db: None, admin: psycopg.Connection[Any]) -> None:
    marker = f"keepdb-{uuid.uuid4()}"
    for _ in range(2):
        result = manage("test", "tests.django_runner_cases", "--noinput", "--keepdb", marker=marker)
        assert result.returncode == 0, result.stderr
    assert f"test_{DB}" in databases(admin)
    assert real_rows(marker) == 0
