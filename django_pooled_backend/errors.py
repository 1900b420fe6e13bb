"""The errors a borrow raises, in Django's voice (see pool.py for when)."""

from __future__ import annotations

import re

import psycopg


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
