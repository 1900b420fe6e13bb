"""A throwaway PgBouncer in front of the test server, for the tests and the docs' examples.

PgBouncer comes from the system (Debian: ``apt-get install pgbouncer``).
It listens on 127.0.0.1 only, on a free port, with a generated
configuration and auth file next to the server's data directory, and
forwards every database name to the PostgreSQL server given by its URL.
As root it runs as the unprivileged user of :mod:`testproject.pgserver`.

Usage from Python::

    bouncer = pgbouncer.start(os.environ["DATABASE_URL"], pool_mode="transaction")
    ...
    bouncer.stop()
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from testproject import launch, pgserver

WORK_DIR = pgserver.ROOT / ".pgdata"
CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")


INSTALL_HINT = "Install it with: apt-get install pgbouncer (Debian, Ubuntu)."


def find() -> str | None:
    """The pgbouncer executable, or None if it is not installed (``.ci/run`` installs it)."""
    return shutil.which("pgbouncer") or next(
        (path for path in CANDIDATES if os.access(path, os.X_OK)), None
    )


def version(executable: str) -> tuple[int, ...]:
    """PgBouncer's version, for example (1, 18, 0)."""
    out = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout
    # "PgBouncer 1.18.0" on the first line.
    number = out.split()[1] if len(out.split()) > 1 else "0"
    return tuple(int(part) for part in number.split(".") if part.isdigit())


@dataclass
class PgBouncer:
    """A running PgBouncer."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    user: str
    password: str
    directory: Path
    version: tuple[int, ...]

    def url(self, database: str) -> str:
        """A ``postgres://`` URL of ``database`` through PgBouncer (contains the password)."""
        return f"postgres://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def admin_dsn(self) -> str:
        """A libpq connection string to PgBouncer's admin console (database ``pgbouncer``)."""
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname=pgbouncer"
        )

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Stop PgBouncer (at once: its clients are disconnected) and remove its files."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def start(
    server_url: str,
    *,
    pool_mode: str = "transaction",
    default_pool_size: int = 2,
    executable: str | None = None,
    settings: dict[str, str] | None = None,
) -> PgBouncer:
    """Start PgBouncer in front of the server of ``server_url`` (a ``postgres://`` URL).

    ``settings`` adds to (or overrides) the ``[pgbouncer]`` section.
    """
    executable = executable or find()
    if executable is None:
        raise FileNotFoundError("pgbouncer is not installed (apt-get install pgbouncer)")
    server = urlparse(server_url)
    user, password = unquote(server.username or ""), unquote(server.password or "")
    port = launch.free_port()
    directory = WORK_DIR / f"pgbouncer-{port}"
    directory.mkdir(parents=True)
    quoted = password.replace('"', '""')
    (directory / "userlist.txt").write_text(f'"{user}" "{quoted}"\n')
    section = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "scram-sha-256",
        "auth_file": str(directory / "userlist.txt"),
        "admin_users": user,
        "pool_mode": pool_mode,
        "default_pool_size": str(default_pool_size),
        "max_client_conn": "200",
        "logfile": str(directory / "pgbouncer.log"),
        "pidfile": str(directory / "pgbouncer.pid"),
        **(settings or {}),
    }
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.hostname} port={server.port}\n"
        "\n[pgbouncer]\n" + "".join(f"{key} = {value}\n" for key, value in section.items())
    )
    command = [executable]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root: run it as the server's user.
        pgserver._ensure_system_user()
        pgserver._open_up(directory)
        pgserver._chown_tree(directory)
        command += ["-u", pgserver.SERVER_USER]
    for name in ("userlist.txt", "pgbouncer.ini"):
        (directory / name).chmod(0o600)
    process = subprocess.Popen(
        [*command, str(directory / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bouncer = PgBouncer(process, "127.0.0.1", port, user, password, directory, version(executable))

    def listening() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"PgBouncer did not start:\n{bouncer.log()[-4000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        return False

    try:
        launch.wait_for(listening, timeout=30, what=f"PgBouncer on 127.0.0.1:{port}")
        return bouncer
    except BaseException:
        # Did not start, or the caller was interrupted (Ctrl-C, SIGTERM) first:
        # nobody else can stop it.
        bouncer.stop()
        raise
