"""System checks: each id fires on its setting; the database check asks the server."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings

from django_pooled_backend import checks
from django_pooled_backend.options import parse_pool_options
from testproject.launch import free_port

from .conftest import Wrappers

ROOT = Path(__file__).resolve().parent.parent

# The checks read settings.DATABASES; no connection is made from these copies.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")


def database(**settings_dict: Any) -> dict[str, Any]:
    """A copy of the default database's settings, changed by ``settings_dict``."""
    config = copy.deepcopy(settings.DATABASES["default"])
    options = settings_dict.pop("OPTIONS", {})
    config["OPTIONS"] = {**config.get("OPTIONS", {}), **options}
    config.update(settings_dict)
    return config


def run(check: Any, **databases: dict[str, Any]) -> list[str]:
    """The ids ``check`` reports with DATABASES set to ``databases``."""
    with override_settings(DATABASES=databases):
        return [message.id for message in check()]  # type: ignore[union-attr]


def test_the_testproject_passes_every_check() -> None:
    out = StringIO()
    call_command("check", stdout=out)
    assert "no issues" in out.getvalue()


def test_invalid_pool_options_and_conn_max_age_are_errors() -> None:
    bad = database(OPTIONS={"pool": {"max_size": 0}}, CONN_MAX_AGE=60)
    assert run(checks.check_pool_options, default=bad) == [
        "django_pooled_backend.E001",
        "django_pooled_backend.E002",
    ]


def test_conn_health_checks_warns_unless_the_check_mode_is_explicit() -> None:
    assert run(
        checks.check_settings_that_fight_pooling, default=database(CONN_HEALTH_CHECKS=True)
    ) == ["django_pooled_backend.W002"]
    explicit = database(CONN_HEALTH_CHECKS=True, OPTIONS={"pool": {"check": "always"}})
    assert run(checks.check_settings_that_fight_pooling, default=explicit) == []


def test_transaction_pooling_requires_no_server_side_cursors_and_no_role() -> None:
    behind = {"pool": {"transaction_pooling": True}}
    assert run(checks.check_settings_that_fight_pooling, default=database(OPTIONS=behind)) == [
        "django_pooled_backend.E003"
    ]
    everything_wrong = database(
        OPTIONS={**behind, "assume_role": "app", "prepare_threshold": 5},
        DISABLE_SERVER_SIDE_CURSORS=False,
    )
    assert run(checks.check_settings_that_fight_pooling, default=everything_wrong) == [
        "django_pooled_backend.E003",
        "django_pooled_backend.E004",
        "django_pooled_backend.W003",
    ]
    right = database(OPTIONS=behind, DISABLE_SERVER_SIDE_CURSORS=True)
    assert run(checks.check_settings_that_fight_pooling, default=right) == []


def test_checks_skip_other_engines_and_pooling_off() -> None:
    stock = database(ENGINE="django.db.backends.postgresql", CONN_HEALTH_CHECKS=True)
    off = database(OPTIONS={"pool": False}, CONN_HEALTH_CHECKS=True)
    invalid = database(OPTIONS={"pool": {"max_size": "x"}}, CONN_HEALTH_CHECKS=True)
    assert run(checks.check_settings_that_fight_pooling, default=stock, b=off, c=invalid) == []


@override_settings(INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"])
def test_the_engine_without_the_app_is_a_warning_with_the_fix() -> None:
    (message,) = checks.check_app_installed()
    assert message.id == "django_pooled_backend.W001"
    assert "DATABASES 'default'" in message.msg
    assert message.hint == "Add 'django_pooled_backend' to INSTALLED_APPS."


@pytest.mark.slow
def test_manage_py_check_warns_when_the_app_is_not_installed(tmp_path: Path) -> None:
    # A real project that forgot the app: the ENGINE registers the checks.
    (tmp_path / "without_app.py").write_text(
        "from testproject.settings import *  # noqa: F403\n"
        "INSTALLED_APPS = [a for a in INSTALLED_APPS if a != 'django_pooled_backend']  # noqa\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "DJANGO_SETTINGS_MODULE": "without_app",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "(django_pooled_backend.W001)" in result.stderr + result.stdout
    assert "HINT: Add 'django_pooled_backend' to INSTALLED_APPS." in result.stderr + result.stdout


# -- the database check, against the real server ----------------------------


def server_limit(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute(checks.CAPACITY_SQL).fetchone()
    assert row is not None
    max_connections, superuser_reserved, reserved = row
    return int(max_connections - superuser_reserved - reserved)


def test_check_database_asks_the_server_and_finds_room(transactional_db: None) -> None:
    out = StringIO()
    call_command("check", "--database", "default", stdout=out)
    assert "no issues" in out.getvalue()
    # Without --database, the server is not asked.
    assert checks.check_server_capacity(databases=None) == []


def test_pools_that_can_outgrow_the_server_are_a_warning_with_the_numbers(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    limit = server_limit(admin)
    wrapper = make_wrapper("capacity", {"max_size": limit, "expected_processes": 2})
    (message,) = checks.server_capacity_messages(wrapper)
    assert message.id == "django_pooled_backend.W004"
    assert f"can open {2 * limit} server connections at once" in message.msg
    assert f"'capacity': max_size {limit} x expected_processes 2" in message.msg
    assert f"but the server accepts {limit} (max_connections" in message.msg
    assert "expected_processes" in message.hint


def test_other_aliases_on_the_same_server_count_too(
    make_wrapper: Wrappers, admin: psycopg.Connection[Any]
) -> None:
    limit = server_limit(admin)
    wrapper = make_wrapper("capacity", {"max_size": limit // 2 + 1})
    assert checks.server_capacity_messages(wrapper) == []
    other = parse_pool_options("replica", {"max_size": limit // 2 + 1})
    (message,) = checks.server_capacity_messages(wrapper, [("replica", other)])
    assert "expected_processes 1 (not set) + 'replica': max_size" in message.msg


def test_same_server_lists_pooled_aliases_with_the_same_host_and_port() -> None:
    databases = {
        "default": database(),
        "second": database(OPTIONS={"pool": {"max_size": 3}}),
        "elsewhere": database(PORT=1),
        "off": database(OPTIONS={"pool": False}),
    }
    with override_settings(DATABASES=databases):
        assert [(alias, o.max_size) for alias, o in checks._same_server("default")] == [
            ("second", 3)
        ]


def test_an_unreachable_server_is_a_warning_not_a_crash(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("capacity", {"timeout": 0.5}, PORT=free_port())
    (message,) = checks.server_capacity_messages(wrapper)
    assert message.id == "django_pooled_backend.W005"
    assert "Could not ask the server of DATABASES['capacity'] for max_connections" in message.msg
    assert settings.DATABASES["default"]["PASSWORD"] not in message.msg


def test_behind_a_transaction_pooler_the_server_limit_is_not_ours(make_wrapper: Wrappers) -> None:
    wrapper = make_wrapper("capacity", {"max_size": 100_000, "transaction_pooling": True})
    assert checks.server_capacity_messages(wrapper) == []


# -- settings carried over from other pools -------------------------------------------


def all_messages(**databases: dict[str, Any]) -> list[Any]:
    """Every system check message with DATABASES set to ``databases`` (no database check)."""
    from django.core.checks import run_checks

    with override_settings(DATABASES=databases):
        return [m for m in run_checks() if m.id.startswith("django_pooled_backend.")]


def test_settings_of_django_db_connection_pool_are_a_warning_with_their_translation() -> None:
    carried = database(
        POOL_OPTIONS={"POOL_SIZE": 5, "MAX_OVERFLOW": 5, "RECYCLE": 300, "PRE_PING": True}
    )
    [message] = all_messages(default=carried)
    assert message.id == "django_pooled_backend.W006"
    assert message.msg == (
        "DATABASES['default']['POOL_OPTIONS'] is a setting of django-db-connection-pool, "
        "which django_pooled_backend ignores: this pool runs with its own defaults. "
        "The same settings in this ENGINE's words: OPTIONS['pool'] = {'pool_size': 5, "
        "'max_overflow': 5, 'pool_recycle': 300, 'pool_pre_ping': True}."
    )
    assert "'Migrating' page" in message.hint
    # The translation is accepted as it is.
    parse_pool_options("default", {"pool_size": 5, "max_overflow": 5, "pool_recycle": 300})


def test_settings_without_an_equivalent_are_named_in_the_warning() -> None:
    carried = database(POOL_OPTIONS={"POOL_SIZE": 5, "ECHO": True, "use_lifo": True})
    [message] = all_messages(default=carried)
    assert message.id == "django_pooled_backend.W006"
    assert "OPTIONS['pool'] = {'pool_size': 5}" in message.msg
    assert message.msg.endswith(" Not carried over: 'ECHO', 'use_lifo'.")


def test_telemetry_of_django_pg_real_pool_is_a_warning() -> None:
    [message] = all_messages(default=database(TELEMETRY={"ENABLED": True}))
    assert message.id == "django_pooled_backend.W006"
    assert "DATABASES['default']['TELEMETRY'] is a setting of django-pg-real-pool" in message.msg


@pytest.mark.parametrize(
    "pool",
    [
        {"reset": print},
        {"reconnect_failed": print},
        {"close_returns": True},
        {"connection_class": psycopg.Connection},
    ],
)
def test_keys_of_django_s_pool_that_are_refused_point_at_the_migration_page(
    pool: dict[str, Any],
) -> None:
    [message] = all_messages(default=database(OPTIONS={"pool": pool}))
    assert message.id == "django_pooled_backend.E001"
    assert "'Migrating' page" in message.hint


def test_pool_parameters_on_django_s_own_backend_are_an_error() -> None:
    # What dj-database-url (or django-environ without our module) makes of
    # postgres://...?pool_max_size=20: Django's backend, no pool.
    stock = database(ENGINE="django.db.backends.postgresql", OPTIONS={"pool_max_size": 20})
    [message] = all_messages(default=database(), other=stock)
    assert message.id == "django_pooled_backend.E006"
    assert message.msg.startswith(
        "DATABASES['other']['OPTIONS'] has 'pool_max_size', options of django_pooled_backend, "
        "but the ENGINE is Django's own PostgreSQL backend"
    )
    assert "postgres+pool://" in message.hint
    # Django's own pool ("pool") is not ours to judge.
    own_pool = database(ENGINE="django.db.backends.postgresql", OPTIONS={"pool": True})
    assert all_messages(default=database(), other=own_pool) == []


def test_host_lists_that_do_not_pair_are_an_error_and_a_list_without_a_target_a_warning() -> None:
    unpaired = database(HOST="db1,db2", PORT="5432,5433,5434")
    untargeted = database(HOST="db1,db2", PORT="5432,5433")
    targeted = database(HOST="db1,db2", PORT="5432", OPTIONS={"target_session_attrs": "read-write"})
    misspelled = database(HOST="db1,db2", OPTIONS={"target_session_attrs": "primary-only"})
    assert run(checks.check_hosts, default=unpaired) == ["django_pooled_backend.E007"]
    assert run(checks.check_hosts, default=untargeted) == ["django_pooled_backend.W007"]
    assert run(checks.check_hosts, default=targeted) == []
    assert run(checks.check_hosts, default=misspelled) == ["django_pooled_backend.E007"]
    with override_settings(DATABASES={"default": untargeted}):
        (message,) = checks.check_hosts()
    assert "'db1,db2'" in message.msg
    assert "'read-write'" in (message.hint or "")
