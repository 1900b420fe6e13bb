"""The ``postgres+pool://`` database URL scheme, for django-environ.

Import this module in settings before reading the URL::

    import environ
    import django_pooled_backend.environ  # registers postgres+pool://

    env = environ.Env()
    DATABASES = {"default": env.db_url("DATABASE_URL")}

with, for example,
``DATABASE_URL=postgres+pool://app:secret@db:5432/app?pool_max_size=20&pool_timeout=5``.

Every ``pool_<key>`` query parameter becomes ``OPTIONS["pool"][<key>]``
(SQLAlchemy's ``pool_size``, ``pool_recycle`` and ``pool_pre_ping`` keep
their names), converted from text to the option's type, and validated at
once by :func:`~django_pooled_backend.options.parse_pool_options`: a bad
value fails when the settings are read, naming the query parameter.  The
other query parameters stay libpq options (``sslmode``, ``connect_timeout``
...), as with ``postgres://``.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any
from urllib.parse import ParseResult, urlparse, urlunparse

from django.core.exceptions import ImproperlyConfigured

try:
    import environ as django_environ
except ModuleNotFoundError as exc:  # pragma: no cover - tested in a child interpreter
    if exc.name != "environ":
        raise
    raise ImproperlyConfigured(
        "django_pooled_backend.environ reads database URLs with django-environ, which is "
        "not installed. Install it with: pip install 'django-pooled-backend[environ]'"
    ) from exc

from .options import KNOWN_KEYS, SQLALCHEMY_ALIASES, PoolOptions, parse_pool_options

ENGINE = "django_pooled_backend"
SCHEMES = ("postgres+pool", "postgresql+pool")
PREFIX = "pool_"
# Django's own backend, which postgres:// (without +pool) selects: no pool.
STOCK_ENGINE = "django.db.backends.postgresql"

# Options whose text is kept as it is ("name=1" is a name, not a number).
_TEXT_KEYS = frozenset({"name"})
# Options that take a mode name or True/False ("reset": "auto", True...).
_MODE_KEYS = frozenset({"reset"})
_BOOL_KEYS = frozenset(
    {f.name for f in fields(PoolOptions) if f.type == "bool"} | {"pool_pre_ping"}
)
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NONE = frozenset({"none", "null"})


def register() -> None:
    """Make django-environ map the ``postgres+pool`` schemes to this ENGINE (idempotent)."""
    env_class: Any = django_environ.Env
    for scheme in SCHEMES:
        env_class.DB_SCHEMES[scheme] = ENGINE
        # Host lists, Unix socket paths: parsed as for postgres://.
        if scheme not in env_class.POSTGRES_FAMILY:
            env_class.POSTGRES_FAMILY.append(scheme)
    current = env_class.__dict__["db_url_config"]
    if getattr(current.__func__, "_dpb_original", None) is not None:
        return
    original = current.__func__

    def db_url_config(cls: Any, url: Any, engine: str | None = None) -> dict[str, Any]:
        refuse_misread_password(url, engine)
        config: dict[str, Any] = original(cls, url, engine=engine)
        if config.get("ENGINE") == ENGINE:
            pair_host_ports(config, url)
            move_pool_options(config, url)
        elif config.get("ENGINE") == STOCK_ENGINE:
            refuse_pool_options(config, url)
        return config

    db_url_config._dpb_original = original  # type: ignore[attr-defined]
    db_url_config.__doc__ = original.__doc__
    env_class.db_url_config = classmethod(db_url_config)


def move_pool_options(config: dict[str, Any], url: str | ParseResult) -> None:
    """Move the ``pool_*`` entries of ``config["OPTIONS"]`` into ``OPTIONS["pool"]``.

    Values are converted from text and validated; a bad one raises
    ``ImproperlyConfigured`` naming the query parameter, never the password.
    """
    options: dict[str, Any] = config.get("OPTIONS") or {}
    params = [key for key in options if key.startswith(PREFIX)]
    if not params:
        return
    pool: dict[str, Any] = {}
    param_of: dict[str, str] = {}
    for param in params:
        key = option_key(param)
        pool[key] = convert(key, options.pop(param))
        param_of[key] = param
    shown = redact(url)

    def where(key: str | None) -> str:
        if key is None:
            return f"The query string of database URL {shown}"
        return f"Query parameter {param_of.get(key, PREFIX + key)!r} of database URL {shown}"

    # Fail now, naming the query parameter, rather than at the first query.
    parse_pool_options("", pool, where=where)
    options["pool"] = pool
    config["OPTIONS"] = options


def pair_host_ports(config: dict[str, Any], url: str | ParseResult) -> None:
    """Give ``PORT`` one item per host of a host list, as libpq reads the URL.

    In ``postgres://db1:5433,db2/app`` db2 has the default port; django-environ
    keeps only ``PORT=5433``, which libpq would then use for every host.
    """
    text = urlunparse(url) if isinstance(url, ParseResult) else str(url)
    parts = split_userinfo(text)
    if parts is None:
        return
    hosts = parts[2].split("/", 1)[0].split(",")
    if len(hosts) < 2:
        return
    ports = []
    for item in hosts:
        rest = item.rpartition("]")[2] if item.startswith("[") else item
        ports.append(rest.rpartition(":")[2] if ":" in rest else "")
    if any(ports):
        config["PORT"] = ",".join(ports)


def refuse_pool_options(config: dict[str, Any], url: str | ParseResult) -> None:
    """Refuse ``pool_*`` parameters in a URL that selects Django's own backend.

    ``postgres://`` without ``+pool`` gives Django's PostgreSQL backend, with
    no pool: the parameters would otherwise reach libpq at the first query.
    """
    params = [key for key in config.get("OPTIONS") or {} if key.startswith(PREFIX)]
    if not params:
        return
    scheme = (url if isinstance(url, ParseResult) else urlparse(url)).scheme
    shown = redact(url)
    example = f"postgres+pool{shown[len(scheme) :]}?{params[0]}=..."
    names = ", ".join(repr(param) for param in params)
    several = len(params) > 1
    raise ImproperlyConfigured(
        f"Query parameter{'s' if several else ''} {names} of database URL {shown} "
        f"{'are pool options' if several else 'is a pool option'}, but the "
        f"{scheme}:// scheme selects Django's own PostgreSQL backend, which has no "
        f"pool: {'they' if several else 'it'} would reach libpq, which refuses "
        f"{'them' if several else 'it'}. Use the postgres+pool:// scheme ({example}) to "
        "get django_pooled_backend, or remove the pool_* parameters."
    )


def option_key(param: str) -> str:
    """The pool option a ``pool_*`` query parameter sets."""
    name = param[len(PREFIX) :]
    if name not in KNOWN_KEYS and param in SQLALCHEMY_ALIASES:
        return param
    return name


def convert(key: str, value: object) -> object:
    """Query string text to the option's type; text that fits none is left for validation."""
    # django-environ has already turned digit-only text into int.
    text = str(value)
    if key in _TEXT_KEYS:
        return text
    lowered = text.strip().lower()
    if key in _BOOL_KEYS or key in _MODE_KEYS:
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        return lowered if key in _MODE_KEYS else text
    if lowered in _NONE:
        return None
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


# What may follow the "@" that ends the userinfo: a host list, a path
# (the database name) and a query string of key=value pairs.  A password may
# contain "@", ":", "/", "?", "#", "%" and anything else, so the userinfo
# ends at the first "@" after which the rest of the URL parses as this tail.
_HOST = r"(?:\[[^\]@/?#]*\]|[^@/?#\[\],:]*)(?::\d*)?"
_TAIL = re.compile(
    rf"@(?P<hosts>{_HOST}(?:,{_HOST})*)"
    r"(?P<path>/[^@?#]*)?"
    r"(?:\?(?:[\w.%~+-]+=[^&#]*(?:&[\w.%~+-]+=[^&#]*)*)?)?$"
)
# The characters that end django-environ's (urllib's) host part early.
_SPLITTERS = frozenset("/?#")


def split_userinfo(url: str) -> tuple[str, str | None, str] | None:
    """``(scheme, userinfo or None, host and path)`` of ``url``, or ``None`` if unparsable.

    The userinfo ends at the last "@" before the host: unlike urllib's,
    this parse keeps a password with a raw "/", "?" or "#" in the userinfo.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    for at in (i for i, char in enumerate(rest) if char == "@"):
        match = _TAIL.match(rest, at)
        if match:
            return scheme, rest[:at], match["hosts"] + (match["path"] or "")
    if "@" in rest:
        return None
    hosts = re.split(r"[?#]", rest, maxsplit=1)[0]
    return scheme, None, hosts


def redact(url: str | ParseResult) -> str:
    """``url`` without its password and query string, safe to print."""
    text = urlunparse(url) if isinstance(url, ParseResult) else str(url)
    parts = split_userinfo(text)
    if parts is None:
        # Nothing can be shown that is sure to be no part of a password.
        scheme = text.partition(":")[0] if "://" in text else "database-url"
        return f"{scheme}://***"
    scheme, userinfo, hosts = parts
    if userinfo is None:
        return f"{scheme}://{hosts}"
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hosts}"


def refuse_misread_password(url: object, engine: str | None) -> None:
    """Refuse a URL of ours whose password django-environ would read wrongly.

    urllib (and so django-environ) ends the host part at the first "/", "?"
    or "#": with one of them unencoded in the password, it takes part of the
    password for the host, port or database, or gives up with a message or
    warning that prints the password.
    """
    if not isinstance(url, str):
        return
    if engine != ENGINE and url.partition("://")[0] not in SCHEMES:
        return
    parts = split_userinfo(url)
    if parts is None or parts[1] is None:
        return
    if _SPLITTERS.isdisjoint(parts[1]):
        return
    raise ImproperlyConfigured(
        f"The user name or password of database URL {redact(url)} contains a '/', '?' or "
        "'#' that is not percent-encoded: django-environ would read part of the password "
        "as the host, port or database name. Percent-encode the password, for example "
        "with urllib.parse.quote(password, safe=''), which also turns '%' into '%25' and "
        "'@' into '%40'."
    )


register()
