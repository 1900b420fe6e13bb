"""``poolstats --server``: the database server's own view, from ``pg_stat_activity``.

Every server connection a pool opens carries the ``application_name``
``django_pooled_backend <alias> <pid>@<host>`` (see ``base.py``), so the
server can tell which host, process and alias owns it, whichever host the
command runs on.  The command connects without a pool (it must not publish
pool statistics of its own) and with its own ``application_name``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.db import connections
from django.db.backends.postgresql import base as postgresql

from .poolstats import table
from .stats import HOSTNAME, SCHEMA, pid_alive

APPLICATION_NAME = "poolstats (django_pooled_backend)"
_OURS = re.compile(r"^django_pooled_backend (?P<alias>\S+) (?P<pid>\d+)@(?P<host>.+)$")
STATES = ("active", "idle", "idle in transaction", "idle in transaction (aborted)")

_ACTIVITY = """
SELECT application_name, state, usename, datname,
       EXTRACT(EPOCH FROM now() - backend_start)::float8,
       EXTRACT(EPOCH FROM now() - state_change)::float8,
       EXTRACT(EPOCH FROM now() - xact_start)::float8
  FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
"""
_LIMITS = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       current_setting('server_version'),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int
"""


@dataclass
class Owner:
    """The server connections of one (host, pid, alias)."""

    host: str
    pid: int
    alias: str
    states: dict[str, int] = field(default_factory=dict)
    oldest_connection_s: float = 0.0
    longest_state_s: float | None = None
    longest_state: str = ""
    oldest_transaction_s: float | None = None

    @property
    def connections(self) -> int:
        return sum(self.states.values())

    @property
    def process(self) -> str:
        """``running`` or ``exited`` for a process of this host, else ``other host``."""
        if self.host != HOSTNAME:
            return "other host"
        return "running" if pid_alive(self.pid) else "exited"

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "alias": self.alias,
            "process": self.process,
            "connections": self.connections,
            "states": dict(sorted(self.states.items())),
            "oldest_connection_s": round(self.oldest_connection_s, 3),
            "longest_in_state_s": None
            if self.longest_state_s is None
            else round(self.longest_state_s, 3),
            "longest_in_state": self.longest_state or None,
            "oldest_transaction_s": None
            if self.oldest_transaction_s is None
            else round(self.oldest_transaction_s, 3),
        }


@dataclass
class ServerView:
    """One server (host and port), seen through the settings of ``alias``."""

    alias: str
    server: str
    version: str
    max_connections: int
    superuser_reserved: int
    reserved: int
    in_use: int
    owners: list[Owner]
    others: dict[str, int]

    @property
    def headroom(self) -> int:
        """Connections ordinary (non-superuser) clients can still open."""
        return self.max_connections - self.superuser_reserved - self.reserved - self.in_use

    def as_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "server": self.server,
            "version": self.version,
            "max_connections": self.max_connections,
            "superuser_reserved_connections": self.superuser_reserved,
            "reserved_connections": self.reserved,
            "connections": self.in_use,
            "headroom": self.headroom,
            "pools": [owner.as_dict() for owner in self.owners],
            "other_clients": dict(sorted(self.others.items())),
        }


def connection_params(wrapper: Any) -> dict[str, Any]:
    """libpq parameters of ``wrapper``'s database, for one unpooled connection."""
    # The stock backend's method: ours would open (and publish) a pool.
    params: dict[str, Any] = postgresql.DatabaseWrapper.get_connection_params(wrapper)
    for key in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(key, None)
    params["application_name"] = APPLICATION_NAME
    params.setdefault("connect_timeout", 10)
    return params


def server_label(params: dict[str, Any]) -> str:
    """``host:port`` of the server (no user, no password)."""
    return f"{params.get('host') or '(default host)'}:{params.get('port') or 5432}"


def query(alias: str, params: dict[str, Any]) -> ServerView:
    """Read ``pg_stat_activity`` and the connection limits of one server."""
    with psycopg.connect(**params, autocommit=True) as conn:
        rows = conn.execute(_ACTIVITY).fetchall()
        limits = conn.execute(_LIMITS).fetchone()
    assert limits is not None
    max_connections, superuser_reserved, reserved, version, in_use = limits
    owners: dict[tuple[str, int, str], Owner] = {}
    others: dict[str, int] = {}
    for app, state, user, db, conn_age, state_age, xact_age in rows:
        match = _OURS.match(app or "")
        if match is None:
            label = f"{app or '(no application_name)'} ({user or '?'}@{db or '?'})"
            others[label] = others.get(label, 0) + 1
            continue
        key = (match["host"], int(match["pid"]), match["alias"])
        owner = owners.get(key)
        if owner is None:
            owner = owners[key] = Owner(host=key[0], pid=key[1], alias=key[2])
        # Another user's sessions have no state unless one may read all stats.
        state = state or "unknown"
        owner.states[state] = owner.states.get(state, 0) + 1
        owner.oldest_connection_s = max(owner.oldest_connection_s, conn_age or 0.0)
        if state_age is not None and (
            owner.longest_state_s is None or state_age > owner.longest_state_s
        ):
            owner.longest_state_s, owner.longest_state = state_age, state
        if xact_age is not None:
            owner.oldest_transaction_s = max(owner.oldest_transaction_s or 0.0, xact_age)
    return ServerView(
        alias=alias,
        server=server_label(params),
        version=version,
        max_connections=max_connections,
        superuser_reserved=superuser_reserved,
        reserved=reserved,
        in_use=in_use,
        owners=sorted(owners.values(), key=lambda o: (o.host, o.pid, o.alias)),
        others=others,
    )


class Unreachable(Exception):
    """The server of an alias could not be asked (the message names it, no password)."""


def collect(aliases: list[str]) -> list[ServerView]:
    """One view per distinct server (host and port) of ``aliases``."""
    views = []
    seen: set[str] = set()
    for alias in aliases:
        params = connection_params(connections[alias])
        label = server_label(params)
        if label in seen:
            continue
        seen.add(label)
        try:
            views.append(query(alias, params))
        except psycopg.Error as exc:
            # libpq's messages name the host and port, never the password.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise Unreachable(
                f"Could not read pg_stat_activity on {label} (database alias {alias!r}): {first}"
            ) from exc
    return views


def render_json(views: list[ServerView]) -> str:
    """The ``--server --json`` document."""
    document = {
        "version": SCHEMA,
        "time": round(time.time(), 3),
        "host": HOSTNAME,
        "servers": [view.as_dict() for view in views],
    }
    return json.dumps(document, indent=2) + "\n"


def render_text(views: list[ServerView]) -> str:
    """One section per server: limits and headroom, then connections per process."""
    lines: list[str] = []
    for view in views:
        if lines:
            lines.append("")
        lines += [
            f"Server {view.server} (PostgreSQL {view.version}), through alias {view.alias!r}",
            f"max_connections {view.max_connections}, reserved "
            f"{view.superuser_reserved + view.reserved} (superuser_reserved_connections "
            f"{view.superuser_reserved}, reserved_connections {view.reserved}), in use "
            f"{view.in_use} (this command's included), headroom {view.headroom}",
            "",
        ]
        if view.owners:
            rows = [
                [
                    o.host,
                    o.pid,
                    o.alias,
                    o.process,
                    o.connections,
                    o.states.get("active", 0),
                    o.states.get("idle", 0),
                    o.states.get("idle in transaction", 0)
                    + o.states.get("idle in transaction (aborted)", 0),
                    f"{o.oldest_connection_s:.1f}s",
                    "-"
                    if o.longest_state_s is None
                    else f"{o.longest_state_s:.1f}s ({o.longest_state})",
                ]
                for o in view.owners
            ]
            headers = ["HOST", "PID", "ALIAS", "PROCESS", "CONNS", "ACTIVE", "IDLE"]
            lines += table(
                [*headers, "IDLE IN TX", "OLDEST", "LONGEST IN STATE"], rows, "llllrrrrrl"
            )
        else:
            lines.append("No server connection belongs to a django_pooled_backend pool.")
        if view.others:
            shown = ", ".join(f"{name}: {count}" for name, count in sorted(view.others.items()))
            lines.append(f"Other clients ({sum(view.others.values())}): {shown}")
    return "\n".join(lines) + "\n"
