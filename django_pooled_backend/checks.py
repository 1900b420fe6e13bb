"""System checks (``manage.py check``), ids ``django_pooled_backend.E0xx/W0xx``.

They are registered when the ENGINE is imported (Django imports the default
database's backend while it loads the models), not only by the app's
``ready()``, so that ``W001`` can say that the app is missing.  The
database-tagged check (``W004``, ``W005``) runs on ``manage.py check
--database ALIAS``, ``migrate`` and the test runner.  Every id is listed,
with its fix, in ``docs/checks.rst``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from .options import PoolOptions, parse_pool_options, validate_hosts
from .stats import configured_directory, configured_interval

ENGINE = "django_pooled_backend"
DOCS = "See the {} page of the django-pooled-backend docs."


def pooled_aliases() -> list[str]:
    """The aliases in DATABASES that use this ENGINE."""
    return [alias for alias, config in settings.DATABASES.items() if config.get("ENGINE") == ENGINE]


def _pool_options(alias: str, config: Mapping[str, Any]) -> PoolOptions | None:
    """The alias' valid pool options; None if pooling is off or they are invalid (E001)."""
    raw = (config.get("OPTIONS") or {}).get("pool", True)
    if raw is False or raw is None:
        return None
    try:
        return parse_pool_options(alias, raw)
    except ImproperlyConfigured:
        return None


@checks.register()
def check_pool_options(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Every pooled alias has valid pool options and no persistent connections."""
    errors: list[checks.CheckMessage] = []
    for alias in pooled_aliases():
        config = settings.DATABASES[alias]
        raw = (config.get("OPTIONS") or {}).get("pool", True)
        if raw is False or raw is None:
            continue
        try:
            parse_pool_options(alias, raw)
        except ImproperlyConfigured as exc:
            hint = DOCS.format("'Configuration'")
            if isinstance(raw, Mapping) and _refused_django_pool_keys(raw):
                hint = (
                    "See the 'Migrating' page of the django-pooled-backend docs: "
                    '"From Django\'s built-in pool" says what replaces this key.'
                )
            errors.append(
                checks.Error(
                    str(exc),
                    hint=hint,
                    id="django_pooled_backend.E001",
                )
            )
        max_age = config.get("CONN_MAX_AGE", 0)
        if max_age != 0:
            errors.append(
                checks.Error(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is {max_age!r}; the pool keeps "
                    "server connections open itself.",
                    hint="Set CONN_MAX_AGE to 0 (the default), or set OPTIONS['pool'] to "
                    "False to use persistent connections instead of the pool.",
                    id="django_pooled_backend.E002",
                )
            )
    return errors


@checks.register()
def check_hosts(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """HOST/PORT lists pair, target_session_attrs is libpq's, and a host list has a target."""
    messages: list[checks.CheckMessage] = []
    for alias in pooled_aliases():
        config = settings.DATABASES[alias]
        try:
            validate_hosts(alias, config)
        except ImproperlyConfigured as exc:
            messages.append(
                checks.Error(
                    str(exc),
                    hint=DOCS.format("'High availability'"),
                    id="django_pooled_backend.E007",
                )
            )
            continue
        host = str(config.get("HOST") or "")
        if "," in host and "target_session_attrs" not in (config.get("OPTIONS") or {}):
            messages.append(
                checks.Warning(
                    f"DATABASES[{alias!r}]['HOST'] lists several hosts ({host!r}) but "
                    "OPTIONS has no 'target_session_attrs': libpq keeps the first host "
                    "that answers, a standby as well as the primary, and after a failover "
                    "writes would go on failing there.",
                    hint="Set OPTIONS['target_session_attrs'] to 'read-write' for the alias "
                    "that writes, or to 'any' to say that any host will do. "
                    + DOCS.format("'High availability'"),
                    id="django_pooled_backend.W007",
                )
            )
    return messages


# Keys of Django's OPTIONS["pool"] (psycopg_pool.ConnectionPool arguments)
# that this ENGINE refuses: E001 then points at the migration notes.
_DJANGO_POOL_ONLY = frozenset(
    {"reconnect_failed", "close_returns", "connection_class", "conninfo", "kwargs", "open"}
)

# django-db-connection-pool's POOL_OPTIONS (SQLAlchemy QueuePool arguments,
# upper case) and their names in OPTIONS["pool"].
_DB_CONNECTION_POOL_KEYS = {
    "POOL_SIZE": "pool_size",
    "MAX_OVERFLOW": "max_overflow",
    "RECYCLE": "pool_recycle",
    "TIMEOUT": "pool_timeout",
    "PRE_PING": "pool_pre_ping",
}


def _refused_django_pool_keys(raw: Mapping[str, Any]) -> list[str]:
    """Keys of Django's own pool options that ``parse_pool_options`` refuses."""
    found = [key for key in raw if key in _DJANGO_POOL_ONLY]
    if "reset" in raw and callable(raw["reset"]):
        found.append("reset")
    return found


@checks.register()
def check_foreign_pool_settings(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Settings of other pooling packages, which this ENGINE would silently ignore."""
    messages: list[checks.CheckMessage] = []
    hint = DOCS.format("'Migrating'")
    for alias in pooled_aliases():
        config = settings.DATABASES[alias]
        where = f"DATABASES[{alias!r}]"
        carried = config.get("POOL_OPTIONS")
        if carried is not None:
            messages.append(
                checks.Warning(
                    f"{where}['POOL_OPTIONS'] is a setting of django-db-connection-pool, "
                    "which django_pooled_backend ignores: this pool runs with its own "
                    f"defaults. {_translate_pool_options(carried)}",
                    hint=hint,
                    id="django_pooled_backend.W006",
                )
            )
        if "TELEMETRY" in config:
            messages.append(
                checks.Warning(
                    f"{where}['TELEMETRY'] is a setting of django-pg-real-pool, which "
                    "django_pooled_backend ignores. Its pools publish their figures for "
                    "manage.py poolstats, the admin page and Prometheus (the [prometheus] "
                    "extra) by themselves.",
                    hint=hint,
                    id="django_pooled_backend.W006",
                )
            )
    return messages


@checks.register()
def check_pool_parameters_without_the_engine(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """``pool_*`` options on Django's own PostgreSQL backend: a URL without ``+pool``."""
    errors: list[checks.CheckMessage] = []
    for alias, config in settings.DATABASES.items():
        if config.get("ENGINE") != "django.db.backends.postgresql":
            continue
        params = [key for key in config.get("OPTIONS") or {} if str(key).startswith("pool_")]
        if not params:
            continue
        names = ", ".join(repr(param) for param in params)
        errors.append(
            checks.Error(
                f"DATABASES[{alias!r}]['OPTIONS'] has {names}, options of "
                "django_pooled_backend, but the ENGINE is Django's own PostgreSQL backend, "
                "which has no such option: there is no pool, and libpq refuses them at the "
                "first connection. A postgres:// database URL (without +pool) gives this.",
                hint="Use a postgres+pool:// URL, or set ENGINE to 'django_pooled_backend' "
                "and move them into OPTIONS['pool'] without the 'pool_' prefix (pool_size, "
                "pool_recycle and pool_pre_ping keep it). " + DOCS.format("'Configuration'"),
                id="django_pooled_backend.E006",
            )
        )
    return errors


def _translate_pool_options(carried: object) -> str:
    """django-db-connection-pool's POOL_OPTIONS in this ENGINE's words."""
    if not isinstance(carried, Mapping):
        return "Set OPTIONS['pool'] instead."
    pool = {
        _DB_CONNECTION_POOL_KEYS[key]: value
        for key, value in carried.items()
        if key in _DB_CONNECTION_POOL_KEYS
    }
    left = [key for key in carried if key not in _DB_CONNECTION_POOL_KEYS]
    text = f"The same settings in this ENGINE's words: OPTIONS['pool'] = {pool!r}."
    if left:
        # ECHO has no equivalent; django-db-connection-pool ignores any other key.
        text += f" Not carried over: {', '.join(repr(key) for key in left)}."
    return text


@checks.register()
def check_app_installed(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The ENGINE is used: the app should be installed too."""
    aliases = pooled_aliases()
    if not aliases or apps.is_installed(ENGINE):
        return []
    used = ", ".join(repr(alias) for alias in aliases)
    return [
        checks.Warning(
            f"{ENGINE!r} is the ENGINE of DATABASES {used}, but it is not in "
            "INSTALLED_APPS: its management commands (poolstats) are missing.",
            hint=f"Add {ENGINE!r} to INSTALLED_APPS.",
            id="django_pooled_backend.W001",
        )
    ]


@checks.register()
def check_settings_that_fight_pooling(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Django settings that cost every request something, or break through PgBouncer."""
    messages: list[checks.CheckMessage] = []
    for alias in pooled_aliases():
        config = settings.DATABASES[alias]
        options = _pool_options(alias, config)
        if options is None:
            continue
        raw = (config.get("OPTIONS") or {}).get("pool")
        explicit_check = isinstance(raw, Mapping) and ("check" in raw or "pool_pre_ping" in raw)
        if config.get("CONN_HEALTH_CHECKS") and not explicit_check:
            messages.append(
                checks.Warning(
                    f"DATABASES[{alias!r}]['CONN_HEALTH_CHECKS'] is True: the pool already "
                    "checks each connection it lends, and this setting makes that check a "
                    "round trip to the server on every request.",
                    hint="Remove CONN_HEALTH_CHECKS, or set OPTIONS['pool']['check'] to "
                    "'always' if a round trip per request is what you want.",
                    id="django_pooled_backend.W002",
                )
            )
        if options.transaction_pooling:
            messages.extend(_transaction_pooling_messages(alias, config))
    return messages


def _transaction_pooling_messages(
    alias: str, config: Mapping[str, Any]
) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    db_options = config.get("OPTIONS") or {}
    where = f"DATABASES[{alias!r}]"
    if not config.get("DISABLE_SERVER_SIDE_CURSORS"):
        messages.append(
            checks.Error(
                f"{where} goes through a transaction-mode pooler (OPTIONS['pool']"
                "['transaction_pooling'] is True), where a server-side cursor (QuerySet."
                "iterator()) can be fetched from a server connection that does not have it.",
                hint=f"Set {where}['DISABLE_SERVER_SIDE_CURSORS'] = True.",
                id="django_pooled_backend.E003",
            )
        )
    if db_options.get("assume_role"):
        messages.append(
            checks.Error(
                f"{where}['OPTIONS']['assume_role'] is set, but SET ROLE is session state, "
                "which a transaction-mode pooler does not keep: queries would run under "
                "another role, and other clients would get this one.",
                hint="Connect as the role itself (USER), or use PgBouncer in session mode.",
                id="django_pooled_backend.E004",
            )
        )
    if db_options.get("prepare_threshold") is not None:
        messages.append(
            checks.Warning(
                f"{where}['OPTIONS']['prepare_threshold'] is "
                f"{db_options['prepare_threshold']!r}: prepared statements only work through "
                "a transaction-mode PgBouncer 1.22 or newer with max_prepared_statements > 0.",
                hint="Check the PgBouncer version and its max_prepared_statements, or remove "
                "prepare_threshold (Django then prepares nothing).",
                id="django_pooled_backend.W003",
            )
        )
    return messages


# -- the database check ------------------------------------------------------

CAPACITY_SQL = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int
"""


@checks.register(checks.Tags.database)
def check_server_capacity(
    app_configs: Any = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Each pooled database asked for: can the server take every process' pool at once?"""
    messages: list[checks.CheckMessage] = []
    for alias in databases or ():
        wrapper = connections[alias]
        if wrapper.settings_dict.get("ENGINE") != ENGINE:
            continue
        messages.extend(server_capacity_messages(wrapper, _same_server(alias)))
    return messages


def _same_server(alias: str) -> list[tuple[str, PoolOptions]]:
    """The other pooled aliases connecting to the same HOST and PORT as ``alias``."""
    config = settings.DATABASES[alias]
    same: list[tuple[str, PoolOptions]] = []
    for other in pooled_aliases():
        other_config = settings.DATABASES[other]
        if other == alias or (other_config.get("HOST"), other_config.get("PORT")) != (
            config.get("HOST"),
            config.get("PORT"),
        ):
            continue
        if (options := _pool_options(other, other_config)) is not None:
            same.append((other, options))
    return same


def server_capacity_messages(
    wrapper: Any, others: Sequence[tuple[str, PoolOptions]] = ()
) -> list[checks.CheckMessage]:
    """W004 if the pools of ``wrapper``'s alias (and ``others``) can outgrow the server.

    ``wrapper`` is the alias' DatabaseWrapper; its server is asked for
    ``max_connections`` and its reserved slots.  An alias behind a
    transaction-mode pooler is not checked: the pooler, not the server,
    takes its connections.
    """
    alias = wrapper.alias
    options = _pool_options(alias, wrapper.settings_dict)
    if options is None or options.transaction_pooling:
        return []
    was_connected = wrapper.connection is not None
    try:
        with wrapper.cursor() as cursor:
            cursor.execute(CAPACITY_SQL)
            max_connections, superuser_reserved, reserved = cursor.fetchone()
    except Exception as exc:  # noqa: BLE001 - a check reports, it does not crash
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return [
            checks.Warning(
                f"Could not ask the server of DATABASES[{alias!r}] for max_connections: "
                f"{first_line}",
                hint="Run the check again when the database can be reached, or leave out "
                "--database.",
                id="django_pooled_backend.W005",
            )
        ]
    finally:
        if not was_connected:
            # Give back what the check borrowed; a connection in use stays.
            wrapper.close()
    available = max_connections - superuser_reserved - reserved
    parts = [(alias, options), *others]
    demand = sum(o.max_size * (o.expected_processes or 1) for _, o in parts)
    if demand <= available:
        return []
    terms = " + ".join(
        f"{a!r}: max_size {o.max_size} x expected_processes "
        f"{o.expected_processes if o.expected_processes else '1 (not set)'}"
        for a, o in parts
    )
    return [
        checks.Warning(
            f"The pools of DATABASES[{alias!r}] can open {demand} server connections at once "
            f"({terms}), but the server accepts {available} (max_connections "
            f"{max_connections} - superuser_reserved_connections {superuser_reserved} - "
            f"reserved_connections {reserved}).",
            hint="Lower OPTIONS['pool']['max_size'], run fewer processes, raise the server's "
            "max_connections, or put PgBouncer in between; set OPTIONS['pool']"
            "['expected_processes'] to the number of processes that use this database. "
            + DOCS.format("'Deployment'"),
            id="django_pooled_backend.W004",
        )
    ]


@checks.register()
def check_stats_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """POOLED_BACKEND_STATS_DIR and POOLED_BACKEND_STATS_INTERVAL have usable values."""
    errors: list[checks.CheckMessage] = []
    for read in (configured_directory, configured_interval):
        try:
            read()
        except ImproperlyConfigured as exc:
            errors.append(
                checks.Error(
                    str(exc),
                    hint="See the 'poolstats' page of the django-pooled-backend docs.",
                    id="django_pooled_backend.E005",
                )
            )
    return errors
