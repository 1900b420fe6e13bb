"""A pytest plugin (``-p tests.database_server`` in pyproject.toml): the test server.

Without ``DATABASE_URL``, the embedded PostgreSQL server of
:mod:`testproject.pgserver` is started (and its ``testproject`` database
created) before pytest-django reads the settings, and ``DATABASE_URL`` is
set for them and for every process the tests start; a server started here
is stopped when pytest exits.  ``testproject.settings`` itself starts
nothing: it only reads ``DATABASE_URL``.
"""

from __future__ import annotations

import pytest

from testproject import pgserver


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> None:
    """Before pytest-django's hook of the same name, which loads the settings."""
    if not early_config.known_args_namespace.help:
        pgserver.database_url("testproject")
