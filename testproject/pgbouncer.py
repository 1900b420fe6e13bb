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

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from testproject import pgserver

WORK_DIR = pgserver.ROOT / ".pgdata"
CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")


def find() -> str | None:
    """The pgbouncer executable, or None if it is not installed."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((path for path in CANDIDATES if os.access(path, os.X_OK)), None)


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(
    server_url: str,
    *,
    pool_mode: str = "transaction",
    default_pool_size: int = 2,
    executable: str | None = None,
) -> PgBouncer:
    """Start PgBouncer in front of the server of ``server_url`` (a ``postgres://`` URL)."""
    executable = executable or find()
    if executable is None:
        raise FileNotFoundError("pgbouncer is not installed (apt-get install pgbouncer)")
    server = urlparse(server_url)
    user, password = unquote(server.username or ""), unquote(server.password or "")
    port = _free_port()
    directory = WORK_DIR / f"pgbouncer-{port}"
    directory.mkdir(parents=True)
    (directory / "userlist.txt").write_text(f'"{user}" "{password}"\n')
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.hostname} port={server.port}\n"
        "\n[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {directory / 'userlist.txt'}\n"
        f"admin_users = {user}\n"
        f"pool_mode = {pool_mode}\n"
        f"default_pool_size = {default_pool_size}\n"
        "max_client_conn = 200\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        f"pidfile = {directory / 'pgbouncer.pid'}\n"
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
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return bouncer
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = bouncer.log()
                bouncer.stop()
                raise RuntimeError(f"PgBouncer did not start:\n{log[-4000:]}") from None
            time.sleep(0.05)
