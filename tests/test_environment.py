"""The package in its environment: missing or wrong drivers, and process exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .conftest import wait_gone

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "testproject.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_psycopg_pool_is_improperly_configured_with_the_install_command() -> None:
    result = run_python(
        """
        import sys
        sys.modules["psycopg_pool"] = None  # as if it were not installed
        import django
        from django.core.exceptions import ImproperlyConfigured
        try:
            django.setup()  # loads the ENGINE
            import django_pooled_backend.base
        except ImproperlyConfigured as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "requires the psycopg_pool package, which is not installed" in result.stdout
    assert "pip install 'psycopg[pool]>=3.2'" in result.stdout


def test_psycopg2_instead_of_psycopg_3_is_improperly_configured() -> None:
    pytest.importorskip("psycopg2", reason="psycopg2-binary is in the test extra")
    result = run_python(
        """
        import sys
        sys.modules["psycopg"] = None  # only psycopg2 is installed
        import django
        from django.core.exceptions import ImproperlyConfigured
        try:
            django.setup()  # loads the ENGINE
            import django_pooled_backend.base
        except ImproperlyConfigured as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "requires psycopg 3 (found psycopg2, which has no pool)" in result.stdout


def test_process_exit_closes_the_pool_cleanly(admin: psycopg.Connection[Any]) -> None:
    # A query at exit with a connection still lent and idle ones in the pool:
    # the process exits without warnings and the server sees every
    # connection go.
    result = run_python(
        """
        import os, django
        django.setup()
        from django.db import connection
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        connection.ensure_connection()  # lent, in both release modes
        print(connection.connection.info.backend_pid, os.getpid())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    backend, _pid = map(int, result.stdout.split())
    wait_gone(admin, backend)
