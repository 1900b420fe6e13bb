"""A database router for a primary and a read replica (see docs/high-availability.rst).

With ``DATABASES["replica"]`` on a standby (``OPTIONS["target_session_attrs"]
= "standby"``) and ``DATABASE_ROUTERS = ["testproject.routers.PrimaryReplicaRouter"]``,
reads go to the replica and writes to the primary.  Django asks the router
without regard to transactions: a read inside ``atomic()`` on the primary
goes to the replica too, which may not have the transaction's writes yet (it
never sees uncommitted ones).  Code that must read its own writes reads with
``.using("default")``.
"""

from __future__ import annotations

from typing import Any


class PrimaryReplicaRouter:
    """Reads to ``replica``, writes and migrations to ``default``."""

    primary = "default"
    replica = "replica"

    def db_for_read(self, model: type[Any], **hints: Any) -> str:
        return self.replica

    def db_for_write(self, model: type[Any], **hints: Any) -> str:
        return self.primary

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        # The same rows on both: an object read from the replica may be
        # related to one written on the primary.
        return True

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        # A standby takes its schema from the primary's WAL.
        return db == self.primary
