"""The distribution: build wheel and sdist, install the wheel in a fresh venv, use the ENGINE."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.packaging]

SCRIPT = """
import os, sys
from urllib.parse import urlparse, unquote

import django
from django.conf import settings

url = urlparse(os.environ["DATABASE_URL"])
settings.configure(
    INSTALLED_APPS=["django_pooled_backend"],
    DATABASES={
        "default": {
            "ENGINE": "django_pooled_backend",
            "NAME": url.path.lstrip("/"),
            "USER": unquote(url.username),
            "PASSWORD": unquote(url.password),
            "HOST": url.hostname,
            "PORT": url.port,
            "OPTIONS": {"pool": {"min_size": 1, "max_size": 1}},
        }
    },
)
django.setup()
from django.core.management import call_command
from django.db import connection, connections

import django_pooled_backend

call_command("check")
pids = set()
for _ in range(3):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pids.add(cursor.fetchone()[0])
    connection.close()
print("module", django_pooled_backend.__file__)
wrapper = connections["default"]
print("pooled", type(wrapper).__module__, wrapper.pool is not None, len(pids))
"""


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_wheel_installs_in_a_fresh_venv_and_its_engine_works(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(dist), cwd=ROOT)
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert "django_pooled_backend/py.typed" in names
    assert "django_pooled_backend/base.py" in names
    assert not [name for name in names if name.startswith(("tests/", "testproject/"))]
    with tarfile.open(sdist) as archive:
        assert any(n.endswith("django_pooled_backend/py.typed") for n in archive.getnames())

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    python = str(venv / "bin" / "python")
    run(python, "-m", "pip", "install", "--quiet", f"{wheel}[binary]", cwd=tmp_path)
    (tmp_path / "use_engine.py").write_text(textwrap.dedent(SCRIPT))
    # Outside the repository, so that only the installed package can be imported.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    assert env["DATABASE_URL"]
    out = run(python, "use_engine.py", cwd=tmp_path, env=env)
    assert f"module {venv}" in out
    assert "pooled django_pooled_backend.base True 1" in out
