"""The private details this backend relies on: a test fails the day they change.

psycopg and psycopg_pool are used through their public APIs only, which a
test here checks by reading the package's source.  Django's are too, but
for the hooks every backend overrides and what is listed here.

``DatabaseWrapper._reconnect()`` is the short path of ``connect()`` for a
Django connection object that connected in full before: it does what
Django's ``BaseDatabaseWrapper.connect()`` does on every call, less what a
pooled connection needs no more.  These tests read Django's ``connect()``
as installed (its bytecode, not its text, so that comments and formatting
do not matter) and fail when it sets an attribute or calls a method that the
short path does not account for.
"""

from __future__ import annotations

import ast
import dis
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLWrapper

import django_pooled_backend
from django_pooled_backend import registry
from django_pooled_backend.base import DatabaseWrapper

from .conftest import Wrappers

PACKAGE = Path(django_pooled_backend.__file__).parent

# What Django's connect() calls, and what the short path does instead.
CALLS_ACCOUNTED_FOR = {
    "check_settings": "checked by the first full connect(); the pool key is compared",
    "get_connection_params": "the pool keeps them; the pool key is compared",
    "get_new_connection": "replaced by the pool's borrow()",
    "set_autocommit": "the pool lends every connection in autocommit (AUTOCOMMIT is on)",
    "init_connection_state": "the pool restores time zone and role on every reset",
    "send": "connection_created is sent, as Django sends it",
    "settings_dict": "read",
    "monotonic": "close_at is computed the same way",
    "__class__": "the signal's sender",
}


def stored_attributes(function: Callable[..., Any]) -> set[str]:
    return {
        ins.argval
        for ins in dis.get_instructions(inspect.unwrap(function))
        if ins.opname == "STORE_ATTR"
    }


def loaded_names(function: Callable[..., Any]) -> set[str]:
    return {
        ins.argval
        for ins in dis.get_instructions(inspect.unwrap(function))
        if ins.opname in ("LOAD_ATTR", "LOAD_METHOD")
    }


def test_djangos_postgresql_backend_uses_the_base_connect() -> None:
    # Were it to override connect(), the short path would have to follow it.
    assert "connect" not in PostgreSQLWrapper.__dict__


def test_the_short_path_sets_every_attribute_djangos_connect_sets() -> None:
    missing = stored_attributes(BaseDatabaseWrapper.connect) - stored_attributes(
        DatabaseWrapper._reconnect
    )
    assert missing == set(), (
        f"Django's connect() now sets {sorted(missing)}: make DatabaseWrapper._reconnect() "
        "set them too, as connect() does"
    )


def test_djangos_connect_calls_nothing_the_short_path_does_not_account_for() -> None:
    new = loaded_names(BaseDatabaseWrapper.connect) - set(CALLS_ACCOUNTED_FOR)
    assert new == set(), (
        f"Django's connect() now uses {sorted(new)}: decide what DatabaseWrapper._reconnect() "
        "must do about it, and list it in CALLS_ACCOUNTED_FOR"
    )


# -- psycopg_pool and psycopg: public API only ---------------------------------------


def private_names_of(*classes: type) -> set[str]:
    """The private names (one leading underscore) the classes and their instances have."""
    names: set[str] = set()
    for cls in classes:
        for klass in cls.__mro__:
            names.update(vars(klass))
            names.update(getattr(klass, "__slots__", ()))
            names.update(getattr(klass, "__annotations__", {}))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def instance_private_names(make_wrapper: Wrappers) -> set[str]:
    """Private attributes set on live instances (a pool, a connection, a cursor)."""
    wrapper = make_wrapper("contract", {"min_size": 1, "max_size": 1})
    wrapper.ensure_connection()
    (pool,) = registry.pools_for_alias("contract")
    conn = wrapper.connection
    with conn.cursor() as cursor:
        objects = [pool, conn, cursor, conn.pgconn, conn.info]
        names = {n for obj in objects for n in getattr(obj, "__dict__", {})}
    wrapper.close()
    return {n for n in names if n.startswith("_") and not n.startswith(("__", "_dpb_"))}


def attribute_uses(source: str) -> set[str]:
    """Every ``x.name`` read or written in ``source``, and the names it defines itself."""
    tree = ast.parse(source)
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    return used


def own_names(source: str) -> set[str]:
    """Names a module defines: ``self.x = ...``, class attributes, functions, slots."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return names


def test_no_private_member_of_psycopg_or_psycopg_pool_is_used(make_wrapper: Wrappers) -> None:
    """The package reads, writes, calls and overrides only public names of both.

    A private name of psycopg_pool's ConnectionPool, psycopg's connection,
    cursor, libpq wrapper or connection info, used in a module that does
    not define that name itself, fails this test (``self._lock`` in
    handoff.py is the hand-off's own lock, not psycopg_pool's).
    """
    private = private_names_of(
        psycopg_pool.ConnectionPool,
        psycopg.Connection,
        psycopg.Cursor,
        psycopg.ServerCursor,
        type(psycopg.pq.PGconn),
    ) | instance_private_names(make_wrapper)
    # Django's own private hooks of its backends (_cursor, _close,
    # _set_autocommit...) are what every backend overrides.
    private -= private_names_of(BaseDatabaseWrapper, PostgreSQLWrapper)
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        used = (attribute_uses(source) & private) - own_names(source)
        # Overriding a private method counts as using it.
        overridden = {
            node.name
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef) and node.name in private
        }
        if used | overridden:
            found[path.name] = sorted(used | overridden)
    assert found == {}


def test_psycopg_pool_opens_connections_with_the_connection_class_connect(
    make_wrapper: Wrappers,
) -> None:
    # How a failed attempt reaches the pool (connection.py): psycopg_pool
    # documents connection_class; that it calls its connect() is checked here.
    wrapper = make_wrapper("contract_open", {"min_size": 1, "max_size": 1})
    wrapper.ensure_connection()
    (pool,) = registry.pools_for_alias("contract_open")
    assert pool.counters.opened >= 1
    assert wrapper.connection._dpb_pool() is pool
    wrapper.close()


def test_django_thread_ident_is_where_the_reclaim_reads_it(make_wrapper: Wrappers) -> None:
    # Django private: which thread made a connection object (tracking.reclaim_orphans()).
    import threading

    wrapper = make_wrapper("contract_ident", {"min_size": 1, "max_size": 1})
    assert wrapper._thread_ident == threading.get_ident()


def test_no_module_of_the_package_imports_another_inside_a_function() -> None:
    """No import cycle hidden in a function: every module imports the others at its top.

    ``apps.py`` excepted: ``AppConfig.ready()`` is where Django wants the
    system checks imported.
    """
    hidden = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "apps.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and inner.level > 0:
                        hidden.setdefault(path.name, []).append(inner.module or ".")
    assert hidden == {}
