"""The postgres+pool:// URL scheme for django-environ: pool options in the query string."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import environ
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

import django_pooled_backend.environ as scheme
from django_pooled_backend.options import parse_pool_options

URL = "postgres+pool://app:s3cr%40t@db.example:6432/shop"


def config(query: str, url: str = URL, **kwargs: object) -> dict[str, object]:
    return environ.Env.db_url_config(f"{url}?{query}" if query else url, **kwargs)  # type: ignore[no-any-return]


def error(query: str) -> str:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        config(query)
    message = str(excinfo.value)
    assert "s3cr" not in message
    return message


def test_scheme_selects_the_engine_and_keeps_the_connection_settings() -> None:
    result = config("")
    assert result["ENGINE"] == "django_pooled_backend"
    assert (result["NAME"], result["USER"], result["PASSWORD"]) == ("shop", "app", "s3cr@t")
    assert (result["HOST"], result["PORT"]) == ("db.example", 6432)
    assert config("", url=URL.replace("postgres+pool", "postgresql+pool"))["ENGINE"] == (
        "django_pooled_backend"
    )


def test_pool_parameters_become_typed_pool_options_and_the_rest_stays_libpq() -> None:
    result = config(
        "pool_max_size=20&pool_timeout=2.5&pool_min_size=0&pool_check=always"
        "&pool_leak_threshold=none&pool_reset=false&pool_transaction_pooling=true"
        "&pool_name=7&sslmode=require&connect_timeout=3"
    )
    options = result["OPTIONS"]
    assert options == {
        "sslmode": "require",
        "connect_timeout": 3,
        "pool": {
            "max_size": 20,
            "timeout": 2.5,
            "min_size": 0,
            "check": "always",
            "leak_threshold": None,
            "reset": False,
            "transaction_pooling": True,
            "name": "7",
        },
    }
    parsed = parse_pool_options("default", options["pool"])  # type: ignore[index]
    assert (parsed.max_size, parsed.timeout, parsed.check, parsed.name) == (20, 2.5, "always", "7")


def test_sqlalchemy_spellings_keep_their_names() -> None:
    result = config("pool_size=5&pool_max_overflow=3&pool_recycle=-1&pool_pre_ping=1")
    pool = result["OPTIONS"]["pool"]  # type: ignore[index]
    assert pool == {"pool_size": 5, "max_overflow": 3, "pool_recycle": -1, "pool_pre_ping": True}
    parsed = parse_pool_options("default", pool)
    assert (parsed.min_size, parsed.max_size, parsed.check) == (5, 8, "always")


def test_explicit_engine_maps_pool_parameters_of_a_postgres_url() -> None:
    url = "postgres://app:s3cr%40t@db.example:6432/shop"
    result = config("pool_max_size=4", url=url, engine="django_pooled_backend")
    assert result["OPTIONS"] == {"pool": {"max_size": 4}}
    # Other engines are none of our business.
    assert config("pool_max_size=4", url="mysql://app:x@db/shop")["OPTIONS"] == {"pool_max_size": 4}


@pytest.mark.parametrize("plain", ["postgres", "postgresql", "pgsql", "psql"])
def test_pool_parameters_of_a_plain_postgres_url_are_refused_naming_the_scheme(
    plain: str,
) -> None:
    # Without +pool the URL selects Django's stock backend: no pool at all.
    url = URL.replace("postgres+pool", plain)
    with pytest.raises(ImproperlyConfigured) as excinfo:
        config("sslmode=require&pool_max_size=20&pool_timeout=5", url=url)
    message = str(excinfo.value)
    assert message == (
        f"Query parameters 'pool_max_size', 'pool_timeout' of database URL "
        f"{plain}://app:***@db.example:6432/shop are pool options, but the {plain}:// "
        "scheme selects Django's own PostgreSQL backend, which has no pool: they would "
        "reach libpq, which refuses them. Use the postgres+pool:// scheme "
        "(postgres+pool://app:***@db.example:6432/shop?pool_max_size=...) to get "
        "django_pooled_backend, or remove the pool_* parameters."
    )
    assert "s3cr" not in message


def test_a_plain_postgres_url_without_pool_parameters_still_gives_django_s_backend() -> None:
    result = config("sslmode=require", url=URL.replace("postgres+pool", "postgres"))
    assert result["ENGINE"] == "django.db.backends.postgresql"
    assert result["OPTIONS"] == {"sslmode": "require"}


# A meta path finder that makes django-environ look uninstalled, in a child
# interpreter: the rest of the environment is this one's.
WITHOUT_ENVIRON = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "environ" or name.startswith("environ."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
try:
    import django_pooled_backend.environ
except Exception as exc:
    print(type(exc).__module__ + "." + type(exc).__qualname__)
    print(exc)
"""


def test_without_django_environ_the_import_says_which_extra_to_install() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_ENVIRON],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    kind, message = result.stdout.split("\n", 1)
    assert kind == "django.core.exceptions.ImproperlyConfigured"
    assert message.strip() == (
        "django_pooled_backend.environ reads database URLs with django-environ, which is "
        "not installed. Install it with: pip install 'django-pooled-backend[environ]'"
    )


def test_a_value_of_the_wrong_type_names_the_query_parameter_not_the_password() -> None:
    message = error("pool_max_size=abc")
    assert message == (
        "Query parameter 'pool_max_size' of database URL "
        "postgres+pool://app:***@db.example:6432/shop is 'abc': it must be an integer. "
        "Use a positive whole number, for example 10."
    )


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("pool_max_size=0", "'pool_max_size' of database URL"),
        ("pool_timeout=-1", "it must be a positive, finite number of seconds"),
        ("pool_timeout=inf", "it must be a positive, finite number of seconds"),
        ("pool_reset=maybe", "'pool_reset' of database URL postgres+pool://app:***@"),
        ("pool_check=sometimes", "it must be 'auto', 'always', 'never' or a callable"),
        ("pool_max_sise=3", "has an unknown key 'max_sise' (value 3). Did you mean 'max_size'?"),
        ("pool_min_size=5&pool_max_size=2", "has min_size 5 greater than max_size 2"),
        ("pool_conninfo=x", "'pool_conninfo' of database URL postgres+pool://app:***@db"),
        ("pool_expected_processes=0", "it must be at least 1"),
    ],
)
def test_bad_values_are_refused_when_the_url_is_read(query: str, expected: str) -> None:
    assert expected in error(query)


def test_register_is_idempotent() -> None:
    scheme.register()
    scheme.register()
    assert config("pool_max_size=3")["OPTIONS"] == {"pool": {"max_size": 3}}
    assert environ.Env.POSTGRES_FAMILY.count("postgres+pool") == 1


def test_redact_hides_the_password_of_every_url_form() -> None:
    assert scheme.redact("postgres+pool://u:p@h/db?password=x") == "postgres+pool://u:***@h/db"
    assert scheme.redact("postgres+pool://u@h:1,h2:2/db") == "postgres+pool://u@h:1,h2:2/db"
    assert scheme.redact("postgres+pool://h/db") == "postgres+pool://h/db"


def test_the_testproject_reads_its_database_from_a_pool_url(db: None) -> None:
    # settings.py builds a postgres+pool:// URL from DATABASE_URL and POOL_*.
    pool = connection.settings_dict["OPTIONS"]["pool"]
    release = os.environ.get("POOL_RELEASE", "request")
    assert pool == {
        "min_size": 1,
        "max_size": 10,
        "timeout": 10.0,
        "max_idle_lent": 5.0,
        "release": release,
    }
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
