"""Which borrows may have changed session state, so that only those pay a reset.

Most requests run nothing but ``SELECT``, ``INSERT``, ``UPDATE`` and
``DELETE`` statements built by the ORM: they leave no session state behind,
and resetting their connection would cost a query per request for nothing.
Every statement goes through the connection's cursor class; the classes here
look at its SQL text (not its parameters, which are data) and mark the
connection *dirty* unless the statement is plainly harmless:

* it starts with ``SELECT``, ``INSERT``, ``UPDATE``, ``DELETE``, ``WITH``,
  ``SAVEPOINT``, ``RELEASE`` or ``ROLLBACK TO`` (anything else, ``SET``,
  ``PREPARE``, ``LISTEN``, ``DECLARE``, ``CREATE TEMP TABLE``, ``DO``,
  ``CALL``, ``COPY``..., is dirty), and has no ``INTO`` but ``INSERT INTO``
  (``SELECT ... INTO TEMP`` creates a table), and
* every ``name(`` in it is an SQL keyword or a function of ``pg_catalog``
  that cannot change session state (``set_config``, ``setseed``,
  ``nextval``/``setval`` and the advisory lock functions can): a function
  of your own might, so calling one is dirty.

Both lists come from the server itself (``pg_get_keywords()`` and
``pg_proc``), read once per pool; until they are known every statement is
dirty.  Verdicts are cached per SQL string: the ORM sends the same few
strings over and over, so a statement costs a dictionary lookup.

What this cannot see: state changed by triggers, rules or column defaults
(their functions run without appearing in the SQL), and statements sent
through ``pgconn`` (libpq) directly.  Use ``reset: "always"`` if your
database changes session state that way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from django.db.backends.postgresql.base import Cursor, ServerBindingCursor

if TYPE_CHECKING:
    from psycopg import Connection

_CLEAN_START = re.compile(
    r"\s*(?:SELECT|INSERT|UPDATE|DELETE|WITH|SAVEPOINT|RELEASE|ROLLBACK|BEGIN|COMMIT|END"
    r"|START\s+TRANSACTION)\b",
    re.IGNORECASE,
)
# "INTO table (" and "INTO schema.table (" open a column list, not a call.
_INTO_TABLE = re.compile(
    r'\bINTO\s+(?:(?:"(?:[^"]|"")+"|\w+)\s*\.\s*)?(?:"(?:[^"]|"")+"|\w+)\s*\(', re.IGNORECASE
)
# "SELECT ... INTO [TEMP] t" creates a table; only INSERT INTO does not.
_SELECT_INTO = re.compile(r"(\S+)\s+INTO\b", re.IGNORECASE)
_CALL = re.compile(
    r'(?:("(?:[^"]|"")+"|[A-Za-z_][\w$]*)\s*\.\s*)?("(?:[^"]|"")+"|[A-Za-z_][\w$]*)\s*\('
)

# pg_catalog functions that change session state.
_UNSAFE_FUNCTIONS = frozenset({"set_config", "setseed", "nextval", "setval"})
_UNSAFE_PREFIXES = ("pg_advisory", "pg_try_advisory", "pg_replication_origin_session")

CATALOG_QUERY = (
    "SELECT (SELECT array_agg(DISTINCT lower(proname::text)) FROM pg_catalog.pg_proc "
    "WHERE pronamespace = 'pg_catalog'::regnamespace), "
    "(SELECT array_agg(lower(word)) FROM pg_catalog.pg_get_keywords())"
)

_CACHE_SIZE = 4096


class StatementJudge:
    """Decides, per SQL string, whether a statement may change session state."""

    def __init__(self) -> None:
        self._harmless: frozenset[str] | None = None
        self._verdicts: dict[str, bool] = {}

    @property
    def ready(self) -> bool:
        return self._harmless is not None

    def learn(self, conn: Connection[Any]) -> None:
        """Read the server's keywords and functions (once per pool)."""
        row = conn.execute(CATALOG_QUERY, prepare=False).fetchone()
        functions, keywords = row if row else ([], [])
        safe = {
            f
            for f in functions or []
            if f not in _UNSAFE_FUNCTIONS and not f.startswith(_UNSAFE_PREFIXES)
        }
        self._harmless = frozenset(safe | set(keywords or []))

    def dirties(self, query: object) -> bool:
        """Whether running ``query`` may leave session state behind."""
        if not isinstance(query, str):
            # bytes or psycopg.sql objects: not worth decoding to judge.
            return True
        verdict = self._verdicts.get(query)
        if verdict is None:
            harmless = self._harmless
            if harmless is None:
                return True
            verdict = self._judge(query, harmless)
            if len(self._verdicts) >= _CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[query] = verdict
        return verdict

    @staticmethod
    def _judge(query: str, harmless: frozenset[str]) -> bool:
        if not query.strip():
            return False  # the empty query of a health check
        if not _CLEAN_START.match(query):
            return True
        for word in _SELECT_INTO.findall(query):
            if word.lower() != "insert":
                return True
        text = _INTO_TABLE.sub("INTO ", query)
        for schema, name in _CALL.findall(text):
            if schema and schema.lower() not in ("pg_catalog", '"pg_catalog"'):
                return True
            if name.startswith('"'):
                return True  # a quoted name is not a keyword nor a catalog function we know
            if name.lower() not in harmless:
                return True
        return False


def _mark(cursor: Any, query: object) -> None:
    conn = cursor._conn
    conn._dpb_active = True  # for max_idle_lent (see DjangoConnectionPool.take_back_idle())
    if not conn._dpb_stateful:
        judge = conn._dpb_judge
        if judge is None or judge.dirties(query):
            conn._dpb_stateful = conn._dpb_dirty = True


class _Tracking:
    """Notes, before running it, whether a statement may dirty the session."""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _mark(self, query)
        return super().execute(query, params, **kwargs)  # type: ignore[misc]

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        _mark(self, query)
        return super().executemany(query, params_seq, **kwargs)  # type: ignore[misc]

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _mark(self, query)
        return super().stream(query, params, **kwargs)  # type: ignore[misc]

    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        _mark(self, statement)
        return super().copy(statement, params, **kwargs)  # type: ignore[misc]


class TrackingCursor(_Tracking, Cursor):
    """Django's client-side binding cursor, judging what it runs."""


class TrackingServerBindingCursor(_Tracking, ServerBindingCursor):
    """Django's server-side binding cursor, judging what it runs."""
