"""Read and validate ``DATABASES[alias]["OPTIONS"]["pool"]``.

The keys of Django's own ``OPTIONS["pool"]`` (psycopg_pool's) are accepted
with the same meaning, but those that would hand the pool's internals to the
settings (``reset`` as a callable, ``reconnect_failed``, ``connection_class``
...: see the migration page of the docs), plus SQLAlchemy's spelling of the
same settings and a few options of our own.  The result is one frozen
:class:`PoolOptions`; every bad value raises
:class:`~django.core.exceptions.ImproperlyConfigured` naming the alias, the
key, the value and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from django.core.exceptions import ImproperlyConfigured

CheckMode = Literal["auto", "always", "never"]
ResetMode = Literal["auto", "always", "never"]
ReleaseMode = Literal["request", "transaction"]

# SQLAlchemy's QueuePool vocabulary, as used by the most-read pooling
# tutorials, mapped onto psycopg_pool's.
SQLALCHEMY_ALIASES = {
    "pool_size": "min_size",
    "max_overflow": "max_size",
    "pool_timeout": "timeout",
    "pool_recycle": "max_lifetime",
    "pool_pre_ping": "check",
}

# ConnectionPool arguments that the backend sets itself from DATABASES.
_RESERVED = {
    "conninfo": "the connection settings come from NAME, USER, PASSWORD, HOST, PORT and OPTIONS",
    "kwargs": "the connection settings come from NAME, USER, PASSWORD, HOST, PORT and OPTIONS",
    "connection_class": "the backend uses its own connection class",
    "open": "the pool opens on first use, in the process that uses it",
}


@dataclass(frozen=True)
class PoolOptions:
    """The validated pool configuration of one database alias.

    Defaults suit a gunicorn worker (sync, or gthread with up to 10 threads):
    one warm connection per process, no more than 10, and a borrow that gives
    up after 10 seconds, well before gunicorn's 30 second worker timeout.
    """

    min_size: int = 1
    max_size: int = 10
    timeout: float = 10.0
    max_waiting: int = 0
    max_lifetime: float = 3600.0
    max_idle: float = 600.0
    reconnect_timeout: float = 300.0
    num_workers: int = 2
    name: str | None = None
    # The safe default: "auto" is only as safe as the statement judge.
    reset: ResetMode = "always"
    check: CheckMode = "auto"
    check_after: float = 0.5
    leak_threshold: float | None = None
    # A lent connection left unused outside a transaction this long (seconds)
    # is taken back; None never takes one back (see pool.take_back_idle()).
    max_idle_lent: float | None = 5.0
    release: ReleaseMode = "request"
    # Read by the system checks only (docs/checks.rst).
    transaction_pooling: bool = False
    expected_processes: int | None = None
    configure: Callable[[Any], None] | None = field(default=None, compare=False)
    custom_check: Callable[[Any], None] | None = field(default=None, compare=False)


KNOWN_KEYS = frozenset(
    {f.name for f in fields(PoolOptions) if f.name != "custom_check"} | set(SQLALCHEMY_ALIASES)
)


Where = Callable[[str | None], str]
"""Names the options (``None``) or one key in messages; see :func:`parse_pool_options`."""


def settings_where(alias: str) -> Where:
    """``DATABASES[alias]['OPTIONS']['pool']``, and ``[key]`` after it for a key."""
    base = f"DATABASES[{alias!r}]['OPTIONS']['pool']"
    return lambda key: base if key is None else f"{base}[{key!r}]"


class _Reader:
    """Collects one alias' pool options, failing with Django-style messages."""

    def __init__(self, alias: str, raw: Mapping[str, Any], where: Where) -> None:
        self.alias = alias
        self.raw = raw
        self.where = where
        # Which raw key each validated value came from, to explain conflicts.
        self.sources: dict[str, str] = {}

    def fail(self, key: str, problem: str, fix: str) -> ImproperlyConfigured:
        return ImproperlyConfigured(
            f"{self.where(key)} is {safe_repr(key, self.raw.get(key))}: {problem}. {fix}"
        )

    def integer(self, key: str, *, minimum: int, fix: str) -> int | None:
        if key not in self.raw:
            return None
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "it must be an integer", fix)
        if value < minimum:
            raise self.fail(key, f"it must be at least {minimum}", fix)
        return value

    def seconds(self, key: str, *, fix: str, allow_none: bool = False) -> float | None:
        if key not in self.raw:
            return None
        value = self.raw[key]
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "it must be a number of seconds", fix)
        if not math.isfinite(value) or value <= 0:
            raise self.fail(key, "it must be a positive, finite number of seconds", fix)
        return float(value)


def parse_pool_options(alias: str, raw: object, *, where: Where | None = None) -> PoolOptions:
    """Validate ``OPTIONS["pool"]`` of ``alias`` into a :class:`PoolOptions`.

    ``where`` names the options in error messages; by default they are named
    as the setting, ``DATABASES[alias]['OPTIONS']['pool'][key]`` (the
    database URL parser names its query parameters instead).
    """
    where = where or settings_where(alias)
    if raw is True:
        return PoolOptions()
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(
            f"{where(None)} is {_describe(raw)}: it must be True "
            "or a dict of pool options. Use True for the defaults, or for example "
            "{'min_size': 1, 'max_size': 10, 'timeout': 10}."
        )
    for key in raw:
        if key in _RESERVED:
            raise ImproperlyConfigured(
                f"{where(key)} cannot be set: "
                f"{_RESERVED[key]}. Remove {key!r} from the pool options."
            )
        if key not in KNOWN_KEYS:
            known = ", ".join(sorted(KNOWN_KEYS))
            hint = _suggest(str(key))
            # The key is named, never its value: a misspelled "pasword" holds
            # a password.
            raise ImproperlyConfigured(
                f"{where(None)} has an unknown key {key!r}.{hint} Valid keys are: {known}."
            )
    r = _Reader(alias, raw, where)
    values: dict[str, Any] = {}

    size_fix = "Use a positive whole number, for example 10."
    _put(
        values,
        r,
        "min_size",
        r.integer("min_size", minimum=0, fix="Use 0 or a positive whole number, for example 1."),
    )
    _put(values, r, "max_size", r.integer("max_size", minimum=1, fix=size_fix))
    _put(
        values,
        r,
        "max_waiting",
        r.integer("max_waiting", minimum=0, fix="Use 0 (no limit) or a positive whole number."),
    )
    _put(
        values,
        r,
        "num_workers",
        r.integer("num_workers", minimum=1, fix="Use a positive whole number, for example 2."),
    )

    # SQLAlchemy: pool_size connections kept, plus max_overflow more at most.
    pool_size = r.integer("pool_size", minimum=1, fix=size_fix)
    max_overflow = r.integer(
        "max_overflow",
        minimum=0,
        fix="Use 0 for a fixed-size pool or a positive whole number; an unbounded overflow "
        "(-1) is not supported, set max_size instead.",
    )
    if pool_size is not None:
        _put(values, r, "min_size", pool_size, alias_key="pool_size")
        if max_overflow is not None:
            _put(values, r, "max_size", pool_size + max_overflow, alias_key="max_overflow")
        elif "max_size" not in raw:
            # SQLAlchemy's default overflow.
            _put(values, r, "max_size", pool_size + 10, alias_key="pool_size")
    elif max_overflow is not None:
        base = values.get("min_size", PoolOptions.min_size)
        _put(values, r, "max_size", base + max_overflow, alias_key="max_overflow")

    timeout_fix = "Use a positive number of seconds, for example 10."
    _put(values, r, "timeout", r.seconds("timeout", fix=timeout_fix))
    _put(values, r, "timeout", r.seconds("pool_timeout", fix=timeout_fix), alias_key="pool_timeout")
    lifetime_fix = "Use a positive number of seconds, for example 3600."
    _put(values, r, "max_lifetime", r.seconds("max_lifetime", fix=lifetime_fix))
    recycle = r.raw.get("pool_recycle")
    if recycle is not None and recycle != -1:  # SQLAlchemy's -1 means "never".
        _put(
            values,
            r,
            "max_lifetime",
            r.seconds("pool_recycle", fix=lifetime_fix),
            alias_key="pool_recycle",
        )
    elif recycle == -1:
        _put(values, r, "max_lifetime", float("inf"), alias_key="pool_recycle")
    _put(
        values,
        r,
        "max_idle",
        r.seconds("max_idle", fix="Use a positive number of seconds, for example 600."),
    )
    _put(
        values,
        r,
        "reconnect_timeout",
        r.seconds("reconnect_timeout", fix="Use a positive number of seconds, for example 300."),
    )
    _put(
        values,
        r,
        "check_after",
        r.seconds("check_after", fix="Use a positive number of seconds, for example 0.5."),
    )
    _put(
        values,
        r,
        "leak_threshold",
        r.seconds(
            "leak_threshold",
            allow_none=True,
            fix="Use a positive number of seconds, for example 30, "
            "or None to disable leak detection.",
        ),
    )

    _put(
        values,
        r,
        "max_idle_lent",
        r.seconds(
            "max_idle_lent",
            allow_none=True,
            fix="Use a positive number of seconds, for example 5, or None to never take "
            "back a lent connection that its borrower leaves unused.",
        ),
    )
    if "max_idle_lent" in raw and raw["max_idle_lent"] is None:
        values["max_idle_lent"] = None

    if "name" in raw:
        if not isinstance(raw["name"], str) or not raw["name"]:
            raise r.fail(
                "name", "it must be a non-empty string", "Use a short label such as 'default'."
            )
        values["name"] = raw["name"]
    if "reset" in raw:
        reset = raw["reset"]
        if reset is True or reset is False:
            values["reset"] = "always" if reset else "never"
        elif reset in ("auto", "always", "never"):
            values["reset"] = reset
        else:
            raise r.fail(
                "reset",
                "it must be 'auto', 'always', 'never', True or False",
                "Leave it out ('always': every session is reset before the next borrower "
                "gets it), or use 'auto' to reset only sessions that a statement may have "
                "changed (see the 'reset' option in the docs for what it cannot see).",
            )
    if "transaction_pooling" in raw:
        if not isinstance(raw["transaction_pooling"], bool):
            raise r.fail(
                "transaction_pooling",
                "it must be True or False",
                "Use True when HOST is PgBouncer (or another pooler) in transaction mode.",
            )
        values["transaction_pooling"] = raw["transaction_pooling"]
    if raw.get("expected_processes") is not None:
        values["expected_processes"] = r.integer(
            "expected_processes",
            minimum=1,
            fix="Use the number of processes that open this pool at once, across all "
            "servers (gunicorn workers, Celery worker children, ...), for example 8.",
        )
    if "release" in raw:
        if raw["release"] not in ("request", "transaction"):
            raise r.fail(
                "release",
                "it must be 'request' or 'transaction'",
                "Leave it out ('request': the connection goes back at the end of the "
                "request), or use 'transaction' to give it back after each statement "
                "or transaction.",
            )
        values["release"] = raw["release"]
    if "configure" in raw:
        if not callable(raw["configure"]):
            raise r.fail(
                "configure",
                "it must be a callable taking a psycopg connection",
                "Pass a function, or leave it out.",
            )
        values["configure"] = raw["configure"]

    check = raw.get("check")
    if "check" in raw:
        if callable(check):
            values["check"] = "always"
            values["custom_check"] = check
        elif check is None:
            values["check"] = "never"
        elif check in ("auto", "always", "never"):
            values["check"] = check
        else:
            raise r.fail(
                "check",
                "it must be 'auto', 'always', 'never' or a callable",
                "Leave it out ('auto') unless every borrow must be checked "
                "with a round trip ('always').",
            )
    if "pool_pre_ping" in raw:
        ping = raw["pool_pre_ping"]
        if not isinstance(ping, bool):
            raise r.fail(
                "pool_pre_ping",
                "it must be True or False",
                "Use True to check every borrow with a round trip.",
            )
        _put(values, r, "check", "always" if ping else "auto", alias_key="pool_pre_ping")

    options = PoolOptions(**values)
    if options.min_size > options.max_size:
        key = "pool_size" if "pool_size" in raw else "min_size"
        raise ImproperlyConfigured(
            f"{where(None)} has min_size {options.min_size} "
            f"greater than max_size {options.max_size}. Lower {key!r} or raise 'max_size' "
            "so that min_size <= max_size."
        )
    return options


def _put(
    values: dict[str, Any], r: _Reader, key: str, value: Any, alias_key: str | None = None
) -> None:
    """Record ``key``; refuse two spellings of one setting that disagree."""
    if value is None:
        return
    source = alias_key or key
    if key in values and values[key] != value:
        first = r.sources[key]
        raise ImproperlyConfigured(
            f"{r.where(None)} sets {first!r} to {r.raw[first]!r} "
            f"and {source!r} to {r.raw[source]!r}, which disagree ({key} would be "
            f"{values[key]!r} or {value!r}). Keep only one of them."
        )
    values[key] = value
    r.sources.setdefault(key, source)


_SECRET_WORDS = ("pass", "secret", "dsn", "conninfo", "url", "token", "key")


def safe_repr(key: object, value: object) -> str:
    """``repr(value)``, unless the key suggests a secret: never echo a password."""
    if any(word in str(key).lower() for word in _SECRET_WORDS):
        return "'***'"
    return repr(value)


def _describe(value: object) -> str:
    """A number, None or a boolean as it is; anything else by its type only.

    Text in place of the options dict is often a DSN or a password.
    """
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def _suggest(key: str) -> str:
    import difflib

    match = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


# -- several hosts (HOST "db1,db2", PORT "5432,5433") ---------------------------

TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
"""libpq's ``target_session_attrs`` values (PostgreSQL 14), which psycopg honours host by host."""

# Targets that only accept a server or session that refuses writes: the
# pool's sessions then refuse writes too (see failover.read_only_kwargs()).
READ_ONLY_TARGETS = frozenset({"read-only", "standby", "prefer-standby"})


def split_hosts(host: object, port: object) -> list[tuple[str, str]]:
    """``(host, port)`` pairs of ``HOST`` and ``PORT`` as libpq pairs them.

    Several hosts are separated by commas; ``PORT`` has one port for every
    host, or one for all of them, or none (an empty item: the default port).
    Assumes :func:`validate_hosts` found nothing wrong.
    """
    hosts = str(host or "").split(",")
    ports = str(port or "").split(",") if port not in (None, "") else [""]
    if len(ports) == 1:
        ports = ports * len(hosts)
    return list(zip(hosts, ports, strict=False))


def validate_hosts(alias: str, settings_dict: Mapping[str, Any]) -> None:
    """Refuse ``HOST``/``PORT`` lists libpq cannot pair, and unknown ``target_session_attrs``.

    libpq would refuse them too, but at the first connection attempt, in a
    background thread of the pool, with a message that names neither the
    alias nor the setting.
    """
    host = settings_dict.get("HOST") or ""
    port = settings_dict.get("PORT") or ""
    where = f"DATABASES[{alias!r}]"
    hosts = str(host).split(",")
    ports = str(port).split(",") if port != "" else []
    for item in ports:
        if item.strip() and not item.strip().isdigit():
            raise ImproperlyConfigured(
                f"{where}['PORT'] is {port!r}: {item.strip()!r} is not a port number. "
                "Use a number, or for several hosts one number per host separated by "
                "commas, in the order of HOST (for example HOST 'db1,db2' with PORT "
                "'5432,5433')."
            )
    if len(ports) > 1 and len(ports) != len(hosts):
        raise ImproperlyConfigured(
            f"{where}['PORT'] is {port!r}: {len(ports)} ports for the {len(hosts)} "
            f"host(s) of HOST {host!r}. Give one port for every host, in the same order "
            "(for example HOST 'db1,db2' with PORT '5432,5433'), or a single port that "
            "all the hosts use."
        )
    options = settings_dict.get("OPTIONS") or {}
    if "target_session_attrs" in options:
        value = options["target_session_attrs"]
        if value not in TARGET_SESSION_ATTRS:
            known = ", ".join(repr(v) for v in TARGET_SESSION_ATTRS)
            raise ImproperlyConfigured(
                f"{where}['OPTIONS']['target_session_attrs'] is {value!r}: "
                f"libpq knows {known}. Use 'read-write' (or 'primary') for the alias that "
                "writes, so that a failover sends new connections to the new primary, and "
                "'read-only' or 'standby' for a read replica."
            )


def hosts_label(settings_dict: Mapping[str, Any], dbname: object) -> str:
    """``user@host:port/dbname``, every host of a list with its port: never the password."""
    user = settings_dict.get("USER") or "(default user)"
    host = settings_dict.get("HOST") or ""
    port = settings_dict.get("PORT") or ""
    if "," not in str(host):
        return f"{user}@{host or '(default host)'}{':' + str(port) if port else ''}/{dbname}"
    pairs = split_hosts(host, port)
    hosts = ",".join(f"{h or '(default host)'}{':' + p if p else ''}" for h, p in pairs)
    return f"{user}@{hosts}/{dbname}"
