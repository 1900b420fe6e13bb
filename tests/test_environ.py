"""The postgres+pool:// URL scheme for django-environ: pool options in the query string."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

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


# Characters a generated password may hold: the URL delimiters, "%", a few
# non-ASCII letters, and letters and digits that appear nowhere in the
# messages below, so that any three characters of a password found in a
# message can only come from the password.
_PASSWORD_ALPHABET = "@:/%#?" + "éß€漢ñ" + "XYZKJWV" + "789"


def generated_passwords(count: int, seed: int) -> list[str]:
    """Random passwords (seeded), each with at least one "@", ":", "/", "%", "#" or "?"."""
    rng = random.Random(seed)
    passwords = []
    for index in range(count):
        special = "@:/%#?"[index % 6]
        body = [rng.choice(_PASSWORD_ALPHABET) for _ in range(rng.randint(3, 16))]
        body.insert(rng.randint(0, len(body)), special)
        passwords.append("".join(body))
    return passwords


def assert_no_part_of(password: str, message: str, baseline: str) -> None:
    """No three characters of ``password`` in ``message``, but for text of every such message.

    ``baseline`` is the message for a harmless password: text such as "://"
    or "'/'" is in every message and tells nothing about the password.
    """
    assert password not in message
    for size in range(3, len(password) + 1):
        for start in range(len(password) - size + 1):
            part = password[start : start + size]
            if part not in baseline:
                assert part not in message, f"{part!r} of the password is in {message!r}"


def url_error(password: str) -> str:
    url = f"postgres+pool://app:{password}@db.example:6432/shop"
    with pytest.raises(ImproperlyConfigured) as excinfo:
        config("pool_max_size=abc", url=url)
    return str(excinfo.value)


@pytest.mark.parametrize("password", generated_passwords(300, seed=15))
def test_a_bad_pool_parameter_never_shows_any_part_of_the_password(password: str) -> None:
    read_right = url_error("harmless")
    misread = url_error("harm/less")
    assert misread.startswith(
        "The user name or password of database URL "
        "postgres+pool://app:***@db.example:6432/shop contains a '/', '?' or '#' "
        "that is not percent-encoded"
    )
    for written in (password, quote(password, safe="")):
        message = url_error(written)
        # django-environ reads a password right unless it holds a raw "/",
        # "?" or "#", which is refused; either way the message is the one
        # of any other password.
        expected = misread if not set(written).isdisjoint("/?#") else read_right
        assert message == expected
        assert_no_part_of(password, message, expected)
        assert_no_part_of(written, message, expected)


@pytest.mark.parametrize("password", generated_passwords(120, seed=16))
def test_passwords_that_django_environ_reads_right(password: str) -> None:
    # Percent-encoded, any password comes through; raw, any password without
    # "/", "?", "#" or a "%" that starts an escape ("%41" reads as "A").
    encoded = quote(password, safe="")
    result = config("pool_max_size=3", url=f"postgres+pool://app:{encoded}@db:7/shop")
    assert (result["PASSWORD"], result["HOST"], result["PORT"]) == (password, "db", 7)
    if set(password).isdisjoint("/?#%"):
        result = config("pool_max_size=3", url=f"postgres+pool://app:{password}@db:7/shop")
        assert (result["USER"], result["PASSWORD"]) == ("app", password)
        assert (result["HOST"], result["PORT"], result["NAME"]) == ("db", 7, "shop")
        assert result["OPTIONS"] == {"pool": {"max_size": 3}}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgres+pool://u:p@ss@h:1/db?pool_x=1", "postgres+pool://u:***@h:1/db"),
        ("postgres+pool://u:p/s@s@h/db", "postgres+pool://u:***@h/db"),
        ("postgres+pool://u:p?s#s@h/db?a=b@c", "postgres+pool://u:***@h/db"),
        ("postgres+pool://u:pw@h/db?application_name=a@b", "postgres+pool://u:***@h/db"),
        ("postgres+pool://u:pw@[::1]:5,h2/db", "postgres+pool://u:***@[::1]:5,h2/db"),
        ("postgres+pool://u:pw@%2Frun%2Fpg/db", "postgres+pool://u:***@%2Frun%2Fpg/db"),
        ("postgres+pool://u:p@w@/run/pg/db", "postgres+pool://u:***@/run/pg/db"),
        ("postgres+pool://u:p@w@h:x", "postgres+pool://***"),
    ],
)
def test_redact_ends_the_userinfo_at_the_last_at_sign_before_the_host(url: str, shown: str) -> None:
    assert scheme.redact(url) == shown
