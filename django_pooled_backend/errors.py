"""The errors a borrow raises, in Django's voice (see pool.py for when)."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from .pool import DjangoConnectionPool


class ConnectionFailed(psycopg.OperationalError):
    """The pool has no working connection and could not open one: the server's reason first.

    Raised at once, after one connection attempt, rather than after the
    pool's timeout (waiting for a connection that cannot be opened helps
    nobody).  Django's error wrapping makes it ``django.db.OperationalError``.
    """


# Advice by what libpq or the server said, first match wins.
_ADVICE = tuple(
    (re.compile(pattern, re.IGNORECASE), advice)
    for pattern, advice in (
        (
            r"password authentication failed|no password supplied|authentication failed",
            "Check USER and PASSWORD in DATABASES[{alias!r}]: the server refused them.",
        ),
        (
            r"pg_hba\.conf",
            "The server's pg_hba.conf does not let this user connect to this database "
            "from this host: ask its administrator, or check USER, NAME and HOST.",
        ),
        (
            r'role ".*" does not exist',
            "Check USER in DATABASES[{alias!r}]: the server has no such role.",
        ),
        (
            r'database ".*" does not exist',
            "Check NAME in DATABASES[{alias!r}], or create the database.",
        ),
        (
            r"too many (connections|clients)|remaining connection slots",
            "The server accepts no more connections: lower OPTIONS['pool']['max_size'] or "
            "the number of processes, raise the server's max_connections, or put PgBouncer "
            "in between (see the 'Deployment' page of the django-pooled-backend docs).",
        ),
        (
            r"connection refused|could not connect|could not translate host name|"
            r"timeout expired|no route to host|timed out|server closed the connection|"
            r"starting up|shutting down",
            "Check that the server is running and reachable at HOST and PORT of "
            "DATABASES[{alias!r}].",
        ),
    )
)


def advice_for(reason: str, alias: str) -> str:
    """What to do about a failed connection attempt, from what the server or libpq said."""
    for pattern, advice in _ADVICE:
        if pattern.search(reason):
            return advice.format(alias=alias)
    return f"Check the connection settings of DATABASES[{alias!r}]."


def server_reason(exc: BaseException) -> str:
    """The server's (or libpq's) own reason for a failed connection attempt, on one line.

    psycopg words it ``connection failed: connection to server at "h", port
    p failed: FATAL:  password authentication failed for user "app"``: the
    host and port are said elsewhere, the reason is what follows the last
    ``failed:``.
    """
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    reason = first.rsplit(" failed: ", 1)[-1].strip()
    for severity in ("FATAL:", "ERROR:"):
        if reason.startswith(severity):
            reason = reason[len(severity) :].strip()
    return reason or first


def borrow_failure_message(pool: DjangoConnectionPool, what: str) -> str:
    """A message for a failed borrow: what happened, the state, the holders, the fix."""
    s = pool.state()
    now = time.monotonic()
    holders = sorted(list(pool.holders.values()), key=lambda h: h.since)
    pinned = f" ({s['pinned']} pinned)" if s["pinned"] else ""
    lines = [
        f"Could not get a connection from the pool of database alias "
        f"{pool.alias!r} ({pool.label}): {what}. Pool state: size {s['size']} "
        f"of max {s['max']}, {s['lent']} lent out{pinned}, {s['idle']} idle, "
        f"{s['waiting']} waiting."
    ]
    if pool.last_connect_error:
        lines.append(f"Last connection error: {pool.last_connect_error}")
    if holders:
        shown = "; ".join(h.describe(now) for h in holders[:10])
        more = f" and {len(holders) - 10} more" if len(holders) > 10 else ""
        lines.append(f"Held by: {shown}{more}.")
    lines.append(
        "Raise OPTIONS['pool']['max_size'] or 'timeout', run fewer threads per "
        "process, or find what holds connections for long (see 'leak_threshold')."
    )
    return "\n".join(lines)


def connection_failed_message(
    pool: DjangoConnectionPool, reason: str, retry_in: float | None
) -> str:
    """A message for a borrow that found no working connection and none could be opened."""
    s = pool.state()
    when = (
        f"; this process waits for a new attempt {retry_in:.1f}s from now at the earliest"
        if retry_in is not None
        else ""
    )
    return (
        f"{reason} (database alias {pool.alias!r}, {pool.label})\n"
        f"The pool of database alias {pool.alias!r} has no working connection and "
        f"could not open one: {pool.failed_attempts} attempt(s) in a row failed. "
        f"Pool state: size {s['size']} of max {s['max']}, {s['lent']} lent out, "
        f"{s['idle']} idle, {s['waiting']} waiting. It keeps trying in the "
        f"background{when}.\n{advice_for(reason, pool.alias)}"
    )
