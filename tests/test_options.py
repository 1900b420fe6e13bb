"""OPTIONS["pool"]: every spelling Django's pool and SQLAlchemy accept, every bad value refused."""

from __future__ import annotations

import math
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_pooled_backend.options import PoolOptions, parse_pool_options


def test_true_gives_the_documented_defaults() -> None:
    options = parse_pool_options("default", True)
    assert options == PoolOptions()
    assert (options.min_size, options.max_size, options.timeout) == (1, 10, 10.0)
    assert options.reset == "always"
    assert options.check == "auto"


def test_django_pool_keys_are_accepted_with_their_meaning() -> None:
    options = parse_pool_options(
        "default",
        {
            "min_size": 2,
            "max_size": 8,
            "timeout": 3,
            "max_waiting": 5,
            "max_lifetime": 1800,
            "max_idle": 60,
            "reconnect_timeout": 30,
            "num_workers": 1,
        },
    )
    assert (options.min_size, options.max_size, options.timeout) == (2, 8, 3.0)
    assert (options.max_waiting, options.max_lifetime, options.max_idle) == (5, 1800.0, 60.0)
    assert (options.reconnect_timeout, options.num_workers) == (30.0, 1)


def test_sqlalchemy_pool_size_and_max_overflow_bound_the_pool() -> None:
    options = parse_pool_options("default", {"pool_size": 5, "max_overflow": 3})
    assert (options.min_size, options.max_size) == (5, 8)


def test_sqlalchemy_pool_size_alone_keeps_the_default_overflow_of_10() -> None:
    options = parse_pool_options("default", {"pool_size": 5})
    assert (options.min_size, options.max_size) == (5, 15)


def test_sqlalchemy_max_overflow_zero_makes_a_static_pool() -> None:
    options = parse_pool_options("default", {"pool_size": 4, "max_overflow": 0})
    assert options.min_size == options.max_size == 4


def test_sqlalchemy_timeout_recycle_and_pre_ping() -> None:
    options = parse_pool_options(
        "default", {"pool_timeout": 2.5, "pool_recycle": 300, "pool_pre_ping": True}
    )
    assert options.timeout == 2.5
    assert options.max_lifetime == 300.0
    assert options.check == "always"


def test_sqlalchemy_recycle_minus_one_means_never() -> None:
    assert math.isinf(parse_pool_options("default", {"pool_recycle": -1}).max_lifetime)


def test_both_spellings_with_the_same_value_are_fine() -> None:
    options = parse_pool_options("default", {"timeout": 4, "pool_timeout": 4})
    assert options.timeout == 4.0


def test_check_accepts_a_callable_like_django_6() -> None:
    def check(conn: Any) -> None:
        pass

    options = parse_pool_options("default", {"check": check})
    assert options.check == "always"
    assert options.custom_check is check


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"max_sise": 10},
            [
                "DATABASES['default']['OPTIONS']['pool'] has an unknown key 'max_sise'.",
                "Did you mean 'max_size'?",
                "Valid keys are:",
            ],
        ),
        (
            {"max_size": 0},
            ["['pool']['max_size'] is 0", "it must be at least 1", "for example 10"],
        ),
        (
            {"max_size": -3},
            ["['pool']['max_size'] is -3", "it must be at least 1"],
        ),
        (
            {"min_size": -1},
            ["['pool']['min_size'] is -1", "it must be at least 0"],
        ),
        (
            {"max_size": "10"},
            ["['pool']['max_size'] is '10'", "it must be an integer"],
        ),
        (
            {"max_size": 2.5},
            ["['pool']['max_size'] is 2.5", "it must be an integer"],
        ),
        (
            {"max_size": True},
            ["['pool']['max_size'] is True", "it must be an integer"],
        ),
        (
            {"min_size": 5, "max_size": 2},
            ["has min_size 5 greater than max_size 2", "Lower 'min_size' or raise 'max_size'"],
        ),
        (
            {"pool_size": 5, "max_overflow": 0, "max_size": 3},
            ["which disagree", "Keep only one of them"],
        ),
        (
            {"timeout": 0},
            ["['pool']['timeout'] is 0", "positive, finite number of seconds"],
        ),
        (
            {"timeout": -1},
            ["['pool']['timeout'] is -1", "positive, finite number of seconds"],
        ),
        (
            {"timeout": "5s"},
            ["['pool']['timeout'] is '5s'", "it must be a number of seconds"],
        ),
        (
            {"timeout": float("nan")},
            ["['pool']['timeout'] is nan", "positive, finite"],
        ),
        (
            {"timeout": 5, "pool_timeout": 6},
            [
                "sets 'timeout' to 5 and 'pool_timeout' to 6, which disagree",
                "Keep only one of them",
            ],
        ),
        (
            {"min_size": 2, "pool_size": 3},
            ["sets 'min_size' to 2 and 'pool_size' to 3, which disagree"],
        ),
        (
            {"max_overflow": -1},
            ["['pool']['max_overflow'] is -1", "unbounded overflow (-1) is not supported"],
        ),
        (
            {"pool_pre_ping": "yes"},
            ["['pool']['pool_pre_ping'] is 'yes'", "it must be True or False"],
        ),
        (
            {"check": "sometimes"},
            ["['pool']['check'] is 'sometimes'", "'auto', 'always', 'never' or a callable"],
        ),
        (
            {"reset": "no"},
            ["['pool']['reset'] is 'no'", "it must be 'auto', 'always', 'never', True or False"],
        ),
        (
            {"max_waiting": -1},
            ["['pool']['max_waiting'] is -1", "it must be at least 0"],
        ),
        (
            {"conninfo": "host=db password=secret"},
            ["['pool']['conninfo'] cannot be set", "Remove 'conninfo'"],
        ),
        (
            {"open": True},
            ["['pool']['open'] cannot be set", "opens on first use"],
        ),
        (
            {"release": "statement"},
            ["['pool']['release'] is 'statement'"],
        ),
        (
            {"configure": "SET search_path TO app"},
            ["['pool']['configure'] is 'SET search_path TO app'", "must be a callable"],
        ),
        (
            {"leak_threshold": 0},
            ["['pool']['leak_threshold'] is 0", "or None to disable"],
        ),
        (
            ["max_size", 10],
            [
                "DATABASES['default']['OPTIONS']['pool'] is a list",
                "must be True or a dict",
            ],
        ),
    ],
)
def test_bad_options_raise_improperly_configured_naming_alias_key_value_and_fix(
    raw: Any, expected: list[str]
) -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_pool_options("default", raw)
    message = str(excinfo.value)
    for part in expected:
        assert part in message
    assert not isinstance(excinfo.value.__cause__, TypeError)


def test_the_message_never_shows_a_password_from_a_reserved_key() -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_pool_options("default", {"conninfo": "host=db password=hunter2"})
    assert "hunter2" not in str(excinfo.value)


def test_an_unknown_key_holding_a_password_is_not_echoed() -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_pool_options("default", {"password": "hunter2"})
    assert "unknown key 'password'" in str(excinfo.value)
    assert "hunter2" not in str(excinfo.value)


@pytest.mark.parametrize("key", ["pasword", "passwrd", "secert", "max_sise", "tiemout", "Password"])
def test_an_unknown_key_is_named_without_its_value(key: str) -> None:
    # A misspelled key may hold a password that no word list recognises.
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_pool_options("default", {key: "hunter2-xyzzy"})
    message = str(excinfo.value)
    assert f"unknown key {key!r}" in message
    assert "hunter2" not in message
    assert "xyzzy" not in message


@pytest.mark.parametrize("raw", ["postgres://app:hunter2@db/shop", b"hunter2", ["hunter2"]])
def test_pool_options_that_are_not_a_dict_are_described_by_type_only(raw: object) -> None:
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_pool_options("default", raw)
    message = str(excinfo.value)
    assert "must be True or a dict" in message
    assert "hunter2" not in message
    assert f"is a {type(raw).__name__}:" in message


def test_pool_size_with_an_explicit_max_size_keeps_max_size() -> None:
    options = parse_pool_options("default", {"pool_size": 2, "max_size": 6})
    assert (options.min_size, options.max_size) == (2, 6)
