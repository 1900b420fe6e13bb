"""The statistics directory against another local user, played by a real second OS user.

The suite runs as root in CI: the other user is the unprivileged system user
the embedded PostgreSQL server runs as (testproject/pgserver.py), and what
"they" create is created by them, through ``runuser``.  Without root these
tests cannot switch users: they skip, and fail when ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from django_pooled_backend import stats
from testproject import pgserver

from .conftest import Wrappers
from .test_pooling import request_cycle
from .test_stats import SAMPLE_POOL

OTHER = pgserver.SERVER_USER


@pytest.fixture(scope="module")
def other_user() -> str:
    """The name of a real second OS user (created if missing)."""
    if os.geteuid() != 0:
        message = (
            "these tests need root to act as a second OS user (runuser); "
            "run the suite as root, as CI does"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pgserver._ensure_system_user()
    return OTHER


def as_other(user: str, *command: str, stdin: str | None = None) -> None:
    """Run ``command`` as ``user``, failing the test if it fails."""
    result = subprocess.run(
        ["runuser", "-u", user, "--", *command],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def shared_tmp(other_user: str) -> Iterator[Path]:
    """A directory like /tmp (mode 1777), which both users can write."""
    path = Path(tempfile.mkdtemp(prefix="dpb-shared-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def planted_snapshot() -> str:
    """A snapshot that looks like this process' own: live pid, right start time."""
    snapshot = stats.snapshot_process([])
    snapshot["start_time"] = stats.process_start_time(os.getpid())
    pool = dict(SAMPLE_POOL)
    pool["oldest_holder"] = {"thread": "planted", "held_s": 1.0, "where": "PLANTED-BY-OTHER"}
    snapshot["pools"] = [pool]  # type: ignore[list-item]
    return json.dumps(snapshot)


@pytest.fixture
def planted_default_directory(
    other_user: str, shared_tmp: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Our per-user statistics directory, created first by the other user, with a snapshot."""
    if hasattr(settings, "POOLED_BACKEND_STATS_DIR"):
        del settings.POOLED_BACKEND_STATS_DIR
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    directory = stats.default_directory()
    assert directory.parent.parent == shared_tmp
    as_other(other_user, "mkdir", "-m", "0777", "-p", str(directory))
    as_other(other_user, "chmod", "0777", str(directory.parent))
    name = directory / f"{stats.HOSTNAME}.{os.getpid()}.json"
    as_other(other_user, "sh", "-c", f"cat > '{name}'", stdin=planted_snapshot())
    assert pwd.getpwuid(directory.parent.stat().st_uid).pw_name == other_user
    return directory


def test_poolstats_refuses_a_per_user_directory_another_user_created(
    planted_default_directory: Path, other_user: str
) -> None:
    base = planted_default_directory.parent
    for args in ([], ["--json"], ["--prometheus"], ["--check"]):
        out = StringIO()
        with pytest.raises(CommandError) as excinfo:
            call_command("poolstats", *args, stdout=out)
        message = str(excinfo.value)
        assert "PLANTED" not in out.getvalue()
        assert message.startswith(f"The pool statistics directory {base} is a directory owned by")
        assert f"({other_user}), mode 0777" in message
        assert "owned by uid 0 (root) that only its owner can write" in message
        assert f"Remove it (rm -r {base}) and restart the server processes" in message
    # Nothing of it was touched: not even the planted snapshot.
    assert (planted_default_directory / f"{stats.HOSTNAME}.{os.getpid()}.json").exists()


def test_the_admin_page_shows_why_it_shows_nothing_from_a_planted_directory(
    planted_default_directory: Path, other_user: str, admin_client: Client
) -> None:
    page = admin_client.get("/admin/pools/")
    assert page.status_code == 200
    text = page.content.decode()
    assert f"The pool statistics directory {planted_default_directory.parent}" in text
    assert f"({other_user}), mode 0777" in text
    data = admin_client.get("/admin/pools/data.json")
    assert data.status_code == 503
    assert "PLANTED" not in data.content.decode()
    assert f"({other_user}), mode 0777" in data.json()["error"]


def test_a_project_directory_another_user_created_in_ours_is_refused_too(
    other_user: str, shared_tmp: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if hasattr(settings, "POOLED_BACKEND_STATS_DIR"):
        del settings.POOLED_BACKEND_STATS_DIR
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    directory = stats.default_directory()
    directory.parent.mkdir(mode=0o700)
    # Ours, but left open for a moment (a umask, a careless chmod): they got in.
    directory.parent.chmod(0o777)
    as_other(other_user, "mkdir", "-m", "0755", str(directory))
    directory.parent.chmod(0o700)
    with pytest.raises(PermissionError, match=rf"{directory} is a directory owned by uid \d+"):
        stats.ensure_directory(directory)
    with pytest.raises(CommandError, match=re.escape(f"({other_user}), mode 0755")):
        call_command("poolstats", stdout=StringIO())


def test_publishing_into_a_shared_directory_never_follows_a_planted_link(
    other_user: str, shared_tmp: Path, make_wrapper: Wrappers, tmp_path: Path
) -> None:
    # POOLED_BACKEND_STATS_DIR set to a directory the other user can write.
    directory = shared_tmp / "stats"
    directory.mkdir()
    directory.chmod(0o777)
    precious = tmp_path / "precious"
    precious.write_text("ours, not to be overwritten\n")
    # Every name the writer used before: the temporary file and the snapshot.
    name = f"{stats.HOSTNAME}.{os.getpid()}"
    planted = [directory / f".{name}.tmp", directory / f"{name}.json"]
    for link in planted:
        as_other(other_user, "ln", "-s", str(precious), str(link))
    request_cycle(make_wrapper("shared", True))
    publisher = stats.Publisher(directory, 1.0)
    publisher.publish()
    publisher.publish()
    assert precious.read_text() == "ours, not to be overwritten\n"
    snapshot = directory / f"{name}.json"
    assert not snapshot.is_symlink()
    assert json.loads(snapshot.read_text())["pid"] == os.getpid()
    assert oct(snapshot.stat().st_mode & 0o777) == oct(0o600)
    # The planted temporary name is left alone, and no temporary file stays.
    assert planted[0].is_symlink()
    leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [planted[0].name]
    publisher.stop()
    assert precious.read_text() == "ours, not to be overwritten\n"
    assert not snapshot.exists()


def test_a_planted_file_at_the_temporary_name_is_never_reused(
    other_user: str, shared_tmp: Path, make_wrapper: Wrappers
) -> None:
    directory = shared_tmp / "stats"
    directory.mkdir()
    directory.chmod(0o777)
    name = f"{stats.HOSTNAME}.{os.getpid()}"
    # A file they own and can read at the old temporary name.
    as_other(other_user, "sh", "-c", f"umask 0; : > '{directory}/.{name}.tmp'")
    request_cycle(make_wrapper("reused", True))
    stats.Publisher(directory, 1.0).publish()
    planted = directory / f".{name}.tmp"
    assert planted.read_text() == ""
    snapshot = directory / f"{name}.json"
    assert snapshot.stat().st_uid == os.getuid()
    assert oct(snapshot.stat().st_mode & 0o777) == oct(0o600)
