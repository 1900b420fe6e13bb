"""How long ``manage.py migrate`` and ``check --database`` take to fail, and what they say first.

Three ways a server refuses (a wrong password, a missing database, a port
where nothing listens), this backend against Django's stock one, each
command in a process of its own::

    .venv/bin/python bench/connect_failures.py            # DATABASE_URL, or the embedded server

Prints one line per case: engine, command, seconds, and the first line of
the error the command ended with.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name: (ENGINE, whether Django's own pool is on)
ENGINES = {
    "pooled": ("django_pooled_backend", False),
    "stock": ("django.db.backends.postgresql", False),
    "django-pool": ("django.db.backends.postgresql", True),
}
from testproject import launch, pgserver  # noqa: E402

COMMANDS = {"migrate": ["migrate", "--noinput"], "check": ["check", "--database", "default"]}


def broken_urls(url: str) -> dict[str, str]:
    """The database URL, made to fail in three ways."""
    parts = urlsplit(url)
    user, _, rest = parts.netloc.partition(":")
    _password, _, hostport = rest.rpartition("@")
    host = hostport.rsplit(":", 1)[0]
    return {
        "wrong password": urlunsplit(parts._replace(netloc=f"{user}:wrong@{hostport}")),
        "missing database": urlunsplit(parts._replace(path="/no_such_database")),
        "stopped server": urlunsplit(
            parts._replace(netloc=f"{user}:{_password}@{host}:{launch.free_port()}")
        ),
    }


def error_line(output: str) -> str:
    """The last line that names an error class: where the traceback ends."""
    for line in reversed(output.strip().splitlines()):
        if "Error:" in line or "Error " in line or line.startswith(("?:", "WARNINGS", "ERRORS")):
            return line.strip()[:200]
    return (output.strip().splitlines() or [""])[-1][:200]


def main() -> None:
    url = pgserver.database_url("testproject")
    for case, broken in broken_urls(url).items():
        for engine_name, (engine, django_pool) in ENGINES.items():
            for command_name, command in COMMANDS.items():
                env = {
                    **os.environ,
                    "DATABASE_URL": broken,
                    "TESTPROJECT_ENGINE": engine,
                    "TESTPROJECT_DJANGO_POOL": str(int(django_pool)),
                }
                started = time.monotonic()
                done = launch.manage(*command, env=env)
                seconds = time.monotonic() - started
                first = error_line(done.stderr + done.stdout)
                print(
                    f"{case:16}  {engine_name:11}  {command_name:7}  {seconds:5.1f}s  "
                    f"rc={done.returncode}  {first}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
