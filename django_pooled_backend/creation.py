"""Test databases: no pool may keep a connection to one being dropped or cloned.

Django's PostgreSQL creation closes the pool of its own alias
(``close_pool()``) before it drops a test database or clones it for
parallel test processes.  Here every pool to that database is closed, of
any alias: PostgreSQL refuses ``DROP DATABASE`` and ``CREATE DATABASE ...
TEMPLATE`` while a session is connected, and an idle pooled connection is
one.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db.backends.postgresql import creation as postgresql

from . import registry

logger = logging.getLogger("django_pooled_backend")


class DatabaseCreation(postgresql.DatabaseCreation):
    """Django's test database creation, closing every pool to the database first."""

    def close_pools_on(self, database_name: str) -> None:
        """Close this alias' pools and every other pool connected to ``database_name``."""
        self.connection.close_pool()
        sd = self.connection.settings_dict
        closed = registry.close_database(database_name, sd["HOST"], sd["PORT"])
        if closed:
            logger.debug("Closed pools %s of database %r.", closed, database_name)

    def _clone_test_db(self, suffix: Any, verbosity: int, keepdb: bool = False) -> None:
        # The source is CREATE DATABASE's template: nobody may be connected to it.
        self.connection.close()
        self.close_pools_on(self.connection.settings_dict["NAME"])
        super()._clone_test_db(suffix, verbosity, keepdb)  # type: ignore[misc]  # not in django-stubs

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        self.close_pools_on(test_database_name)
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]  # not in django-stubs
