"""The postgres+pool:// URL scheme for django-environ: pool options in the query string."""

from __future__ import annotations

import os

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
    assert config("pool_max_size=4", url=url)["OPTIONS"] == {"pool_max_size": 4}


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
        ("pool_max_sise=3", "has an unknown key 'max_sise'. Did you mean 'max_size'?"),
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
    assert pool == {"min_size": 1, "max_size": 10, "timeout": 10.0, "release": release}
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
