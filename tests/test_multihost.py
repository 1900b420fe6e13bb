"""Several hosts in HOST, libpq's target_session_attrs, and a read replica alias.

Against a real primary and a hot standby streaming from it, both on
127.0.0.1 (``testproject.pgserver.start_pair``), started once for the module.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import InternalError, connection

from django_pooled_backend import registry, stats
from django_pooled_backend.base import DatabaseWrapper
from django_pooled_backend.failover import ServerInfo, pool_servers, server_of
from django_pooled_backend.options import hosts_label, validate_hosts
from testproject import pgserver
from testproject.routers import PrimaryReplicaRouter

from .conftest import pooled

DB = "multihost"
PAIR_DIR = pgserver.DEFAULT_DATA_DIR.parent / "pair-multihost"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair() -> Iterator[pgserver.Pair]:
    # Not under pytest's temporary directory: another pytest session starting
    # makes /tmp/pytest-of-<user> private again, which the server user must traverse.
    pair = pgserver.start_pair(PAIR_DIR)
    try:
        pgserver.ensure_database(pair.primary, DB)
        with psycopg.connect(pair.primary.dsn(DB), autocommit=True) as conn:
            conn.execute("CREATE TABLE notes (body text)")
            conn.execute("INSERT INTO notes VALUES ('from the primary')")
        pgserver.wait_replayed(pair)
        yield pair
    finally:
        pgserver.stop_pair(pair)


@pytest.fixture
def wrappers(django_db_blocker: Any) -> Iterator[list[DatabaseWrapper]]:
    made: list[DatabaseWrapper] = []
    with django_db_blocker.unblock():
        try:
            yield made
        finally:
            for wrapper in made:
                wrapper.close()
                registry.close_alias(wrapper.alias)


def wrapper_on(
    made: list[DatabaseWrapper],
    alias: str,
    servers: list[pgserver.Server],
    target: str | None,
    pool: Any = True,
) -> DatabaseWrapper:
    """A Django connection to ``servers`` (HOST and PORT lists, in this order)."""
    settings_dict = copy.deepcopy(connection.settings_dict)
    options: dict[str, Any] = {"pool": pooled(pool)}
    if target is not None:
        options["target_session_attrs"] = target
    first = servers[0]
    settings_dict.update(
        NAME=DB,
        USER=first.user,
        PASSWORD=first.password,
        HOST=",".join(s.host for s in servers),
        PORT=",".join(str(s.port) for s in servers),
        OPTIONS=options,
    )
    wrapper = DatabaseWrapper(settings_dict, alias)
    made.append(wrapper)
    return wrapper


def port_of(wrapper: DatabaseWrapper) -> int:
    wrapper.ensure_connection()
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT inet_server_port()")
        (port,) = cursor.fetchone()
    return int(port)


def server_held(wrapper: DatabaseWrapper) -> ServerInfo:
    """Where ``wrapper``'s connection is, read while it is held (in either release mode)."""
    wrapper.ensure_connection()
    wrapper.set_autocommit(False)
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
        return server_of(wrapper.connection)
    finally:
        wrapper.rollback()
        wrapper.set_autocommit(True)


def test_read_write_target_connects_to_the_primary_whichever_host_is_listed_first(
    pair: pgserver.Pair, wrappers: list[DatabaseWrapper]
) -> None:
    wrapper = wrapper_on(wrappers, "rw_target", [pair.standby, pair.primary], "read-write")
    assert port_of(wrapper) == pair.primary.port
    server = server_held(wrapper)
    assert (server.port, server.role) == (pair.primary.port, "primary")


def test_without_a_target_the_first_host_that_answers_is_used_even_a_standby(
    pair: pgserver.Pair, wrappers: list[DatabaseWrapper]
) -> None:
    # Why the docs insist on target_session_attrs for the alias that writes.
    wrapper = wrapper_on(wrappers, "any_target", [pair.standby, pair.primary], None)
    assert port_of(wrapper) == pair.standby.port
    assert server_held(wrapper).role == "standby"


def test_replica_alias_reads_from_the_standby_and_refuses_writes_naming_the_alias(
    pair: pgserver.Pair, wrappers: list[DatabaseWrapper]
) -> None:
    replica = wrapper_on(wrappers, "replica", [pair.primary, pair.standby], "standby")
    assert port_of(replica) == pair.standby.port
    with replica.cursor() as cursor:
        cursor.execute("SELECT body FROM notes")
        assert cursor.fetchall() == [("from the primary",)]
    with pytest.raises(InternalError) as excinfo, replica.cursor() as cursor:
        cursor.execute("INSERT INTO notes VALUES ('refused')")
    message = str(excinfo.value)
    assert "Database alias 'replica' is a read replica" in message
    assert "'standby'" in message
    assert "read-only transaction" in message  # the server's own words
    assert "db_for_write()" in message
    replica.close()
    # The pool lends the connection again: a refused write does not break it.
    assert port_of(replica) == pair.standby.port


def test_replica_alias_that_falls_back_to_the_primary_still_refuses_writes(
    pair: pgserver.Pair, wrappers: list[DatabaseWrapper]
) -> None:
    # prefer-standby connects to the primary when no standby is listed or
    # answers: the pool's sessions refuse writes there too.
    replica = wrapper_on(wrappers, "replica_fallback", [pair.primary], "prefer-standby")
    assert port_of(replica) == pair.primary.port
    with pytest.raises(InternalError, match="is a read replica"), replica.cursor() as cursor:
        cursor.execute("INSERT INTO notes VALUES ('refused')")
    with psycopg.connect(pair.primary.dsn(DB)) as conn:
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (1,)


def test_pool_label_lists_every_host_with_its_port_and_never_the_password(
    pair: pgserver.Pair, wrappers: list[DatabaseWrapper]
) -> None:
    wrapper = wrapper_on(wrappers, "labelled", [pair.primary, pair.standby], "read-write")
    pool = wrapper.pool
    assert pool is not None
    assert pool.label == (
        f"postgres@127.0.0.1:{pair.primary.port},127.0.0.1:{pair.standby.port}/{DB}"
    )
    assert pair.primary.password not in pool.label


def test_router_sends_reads_to_the_replica_and_writes_and_migrations_to_the_primary() -> None:
    from testproject.shop.models import Item

    router = PrimaryReplicaRouter()
    assert router.db_for_read(Item) == "replica"
    assert router.db_for_write(Item) == "default"
    assert router.allow_migrate("default", "shop") is True
    assert router.allow_migrate("replica", "shop") is False


@pytest.mark.parametrize(
    ("host", "port", "options", "words"),
    [
        (
            "db1,db2",
            "5432,5433,5434",
            {},
            ["DATABASES['main']['PORT'] is '5432,5433,5434'", "3 ports", "2 host(s)"],
        ),
        ("db1", "5432,5433", {}, ["2 ports for the 1 host(s)"]),
        ("db1,db2", "5432,x", {}, ["'x' is not a port number"]),
        (
            "db1,db2",
            "",
            {"target_session_attrs": "readwrite"},
            ["['target_session_attrs'] is 'readwrite'", "'read-write'"],
        ),
    ],
)  # fmt: skip
def test_host_lists_libpq_would_refuse_are_refused_naming_alias_key_and_fix(
    host: str, port: str, options: dict[str, Any], words: list[str]
) -> None:
    settings_dict = {"HOST": host, "PORT": port, "OPTIONS": options}
    with pytest.raises(ImproperlyConfigured) as excinfo:
        validate_hosts("main", settings_dict)
    for word in words:
        assert word in str(excinfo.value)
    assert "for example" in str(excinfo.value) or "Use" in str(excinfo.value)


def test_host_lists_libpq_accepts_pass() -> None:
    for host, port in [
        ("db1,db2", "5432,5433"),
        ("db1,db2", "5432"),
        ("db1,db2", ""),
        ("db", 5432),
    ]:
        validate_hosts("main", {"HOST": host, "PORT": port, "OPTIONS": {}})
    validate_hosts(
        "main", {"HOST": "a,b", "PORT": "", "OPTIONS": {"target_session_attrs": "standby"}}
    )


def test_label_pairs_each_host_with_its_port() -> None:
    settings_dict = {"USER": "app", "PASSWORD": "s3cret", "HOST": "db1,db2", "PORT": "5432,"}
    assert hosts_label(settings_dict, "shop") == "app@db1:5432,db2/shop"
    one_port = {**settings_dict, "PORT": "6432"}
    assert hosts_label(one_port, "shop") == "app@db1:6432,db2:6432/shop"


def test_poolstats_shows_the_primary_and_the_replica_pools_with_their_hosts(
    pair: pgserver.Pair, wrappers: list[DatabaseWrapper], tmp_path: Path, settings: Any
) -> None:
    primary = wrapper_on(wrappers, "ha_primary", [pair.standby, pair.primary], "read-write")
    replica = wrapper_on(wrappers, "ha_replica", [pair.primary, pair.standby], "standby")
    assert port_of(primary) == pair.primary.port
    assert port_of(replica) == pair.standby.port
    settings.POOLED_BACKEND_STATS_DIR = str(tmp_path)
    stats.Publisher(tmp_path, 1.0).publish()
    out = StringIO()
    call_command("poolstats", "--json", stdout=out)
    assert pair.primary.password not in out.getvalue()
    (mine,) = [p for p in json.loads(out.getvalue())["processes"] if p["pid"] == os.getpid()]
    targets = {pool["alias"]: pool["target"] for pool in mine["pools"]}
    hosts = {
        "ha_primary": f"127.0.0.1:{pair.standby.port},127.0.0.1:{pair.primary.port}",
        "ha_replica": f"127.0.0.1:{pair.primary.port},127.0.0.1:{pair.standby.port}",
    }
    for alias, listed in hosts.items():
        assert targets[alias] == f"postgres@{listed}/{DB}"
    # Which server each pool's connections are on, and its role.
    # A connection busy at the snapshot (psycopg_pool's worker setting up one
    # it just opened) is counted under "(busy)": only the known ones here.
    servers = {
        pool["alias"]: [
            (s["host"], s["port"], s["role"]) for s in pool["servers"] if s["role"] != "unknown"
        ]
        for pool in mine["pools"]
    }
    assert servers["ha_primary"] == [("127.0.0.1", pair.primary.port, "primary")]
    assert servers["ha_replica"] == [("127.0.0.1", pair.standby.port, "standby")]
    counts = {
        pool["alias"]: next(s["connections"] for s in pool["servers"] if s["role"] != "unknown")
        for pool in mine["pools"]
    }
    text = StringIO()
    call_command("poolstats", stdout=text)
    assert "ha_primary" in text.getvalue()
    assert "ha_replica" in text.getvalue()
    section = text.getvalue().split("Servers (which server each connection is on)\n")[1]
    rows = [line.split() for line in section.split("\n\n")[0].splitlines()[1:]]
    pid = str(os.getpid())
    for alias, server, role in [
        ("ha_primary", pair.primary, "primary"),
        ("ha_replica", pair.standby, "standby"),
    ]:
        assert [pid, alias, f"127.0.0.1:{server.port}", role, str(counts[alias])] in rows
    metrics = StringIO()
    call_command("poolstats", "--prometheus", stdout=metrics)
    assert (
        f'django_pooled_backend_server_connections{{alias="ha_replica",host="{stats.HOSTNAME}",'
        f'pid="{pid}",role="standby",server="127.0.0.1:{pair.standby.port}"}} '
        f"{float(counts['ha_replica'])}"
    ) in metrics.getvalue()


def test_pool_servers_counts_idle_and_lent_connections_per_server_and_role(
    pair: pgserver.Pair, wrappers: list[DatabaseWrapper]
) -> None:
    sizes = {"min_size": 2, "max_size": 2}
    primary = wrapper_on(wrappers, "servers_rw", [pair.standby, pair.primary], "read-write", sizes)
    replica = wrapper_on(wrappers, "servers_ro", [pair.primary, pair.standby], "standby", sizes)
    for wrapper, server, role in (
        (primary, pair.primary, "primary"),
        (replica, pair.standby, "standby"),
    ):
        pool = wrapper.pool
        assert pool is not None
        pool.wait(timeout=10)
        # One lent out (in a transaction), one idle: both counted.
        wrapper.ensure_connection()
        wrapper.set_autocommit(False)
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert pool_servers(pool) == [
            {"host": "127.0.0.1", "port": server.port, "role": role, "connections": 2}
        ]
        wrapper.rollback()
        wrapper.set_autocommit(True)
