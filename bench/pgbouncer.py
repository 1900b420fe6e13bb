"""PgBouncer in transaction mode on loopback, started and stopped by the benchmark.

The binary comes from Debian's ``pgbouncer`` package (``apt-get install
pgbouncer``); when it is missing and this runs as root, it is installed.
PgBouncer refuses to run as root, so it then runs as the unprivileged user
that ``testproject.pgserver`` runs PostgreSQL as.  Clients authenticate to
PgBouncer with SCRAM, and PgBouncer to PostgreSQL with the same password.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testproject import pgserver

INSTALL_HINT = "Install it with: apt-get install pgbouncer (Debian, Ubuntu)."


def find(install: bool = True) -> str | None:
    """The path of the pgbouncer binary, installing it as root if allowed."""
    path = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)),
        None,
    )
    if path or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return path
    print("pgbouncer is not installed: running apt-get install -y pgbouncer", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "pgbouncer"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True)
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )


def version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgBouncer:
    """A running PgBouncer; :meth:`stop` ends it and removes its files."""

    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    version: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def start(
    binary: str, server_host: str, server_port: int, user: str, password: str, pool_size: int
) -> PgBouncer:
    """Start PgBouncer in transaction mode in front of ``server_host:server_port``."""
    directory = Path(tempfile.mkdtemp(prefix="bench-pgbouncer-"))
    port = _free_port()
    config = directory / "pgbouncer.ini"
    users = directory / "userlist.txt"
    config.write_text(
        "[databases]\n"
        f"* = host={server_host} port={server_port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {users}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        f"max_db_connections = {pool_size}\n"
        "min_pool_size = 0\n"
        "reserve_pool_size = 0\n"
        "max_client_conn = 900\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        f"pidfile = {directory / 'pgbouncer.pid'}\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    quoted = password.replace('"', '""')
    users.write_text(f'"{user}" "{quoted}"\n')
    users.chmod(0o600)
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        run_as = pgserver._run_as()
        import pwd

        entry = pwd.getpwnam(pgserver.SERVER_USER)
        for path in (directory, config, users):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    process = subprocess.Popen(
        [binary, str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **run_as,
    )
    bouncer = PgBouncer(process, port, directory, version(binary))
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return bouncer
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = directory / "pgbouncer.log"
                detail = log.read_text()[-2000:] if log.exists() else ""
                bouncer.stop()
                raise RuntimeError(f"PgBouncer did not start:\n{detail}") from None
            time.sleep(0.05)
