"""Which borrows may have changed session state, so that only those pay a reset.

Most requests run nothing but ``SELECT``, ``INSERT``, ``UPDATE`` and
``DELETE`` statements built by the ORM: they leave no session state behind,
and resetting their connection would cost a query per request for nothing.
Every statement goes through the connection's cursor class; the classes here
look at its SQL text (not its parameters, which are data) and mark the
connection *dirty* unless they can prove the text harmless.

The judge **fails safe**: it tokenizes the text as PostgreSQL's own lexer
does (comments, nested ``/* */``, ``'...'``, ``E'...'``, ``U&'...'``,
dollar quotes, quoted identifiers, numbers, operators), and anything it does
not understand is dirty: an unterminated string, comment or quoted
identifier, a character PostgreSQL would reject, a ``'...'`` string with a
backslash (its end depends on ``standard_conforming_strings``).  The text is
split at every ``;`` (one ``execute()`` may send several statements), and
each statement must be harmless:

* it starts with ``SELECT``, ``INSERT``, ``UPDATE``, ``DELETE``, ``WITH``,
  ``VALUES``, ``TABLE``, ``SHOW`` (possibly after opening parentheses, for
  a ``SELECT``), or is transaction control: ``SAVEPOINT``, ``RELEASE``,
  ``ROLLBACK``, ``BEGIN``, ``START TRANSACTION``, ``COMMIT``, ``END``,
  ``ABORT`` (a transaction is never lent open: the pool rolls back what
  its borrower left open); anything else (``SET``, ``PREPARE``,
  ``LISTEN``, ``DECLARE``, ``CREATE``, ``DO``, ``CALL``, ``COPY``,
  ``EXECUTE``...) is dirty;
* it has no ``INTO`` but ``INSERT INTO`` (``SELECT ... INTO`` creates a
  table);
* every function call in it (a name, quoted or not, possibly qualified,
  followed by ``(`` after any comments) is a function of ``pg_catalog`` that
  cannot change session state: qualified by ``pg_catalog`` only, unquoted
  names folded to lower case as the server does, quoted ones taken as they
  are.  Not harmless: ``set_config``, ``setseed``, ``nextval``, ``setval``,
  ``pg_notify``, the advisory lock, large object, replication and backup
  functions, and those that run SQL given as text (``query_to_xml``,
  ``ts_stat``...).  Nor is an unqualified ``pg_catalog`` name that a
  function of another schema also has (an overload of your own may be
  picked instead).  Reserved keywords followed by ``(`` are syntax, not
  calls (unless a function of another schema has that name:
  ``substring(a, b)`` may call it); so are a few places where a name
  before ``(`` is a column list (``INSERT INTO t (...)``, ``ON CONFLICT
  (...) DO``, ``... AS t(a, b)``), ``FILTER (`` or ``OVER (`` after a
  call, and ``ORDER BY (``;
* it calls no function of your own after a dot (``t.f`` calls ``f(t)``),
  and names no relation whose code may dirty the session when the
  statement runs it: a view, a row security policy, a foreign table (any
  statement naming it), a trigger, a rule (``UPDATE pg_settings`` runs
  ``set_config()`` through one) or a stored generated column (a statement
  that says ``INSERT``, ``UPDATE``, ``DELETE`` or ``MERGE``), a column
  default (one that says ``INSERT`` or ``DEFAULT``).  The code of views,
  policies, defaults and generated columns is read from the catalog and
  judged as SQL; triggers and rules are not read: they count as dirty.  A
  partitioned or inheritance parent of such a relation counts as one, and
  so does a table that a foreign key of such a relation cascades from.
  Domain checks are judged too: a domain whose check may dirty the session
  counts as a relation named by any statement (a cast to it), and a table
  with a column of it as one with a trigger.

Parameters: when a statement has them, psycopg replaces ``%s`` and
``%(name)s`` everywhere in the text, strings included; so with parameters,
a ``%`` other than ``%%`` inside a string, comment or quoted identifier is
dirty, as is a placeholder glued to a name.

The keywords, functions and relations come from the server itself, read
once per pool; until they are known every statement is dirty.  Verdicts are
cached per SQL string (and per "with parameters or not"): the ORM sends the
same few strings over and over, so a statement costs a dictionary lookup.

What this cannot see: what runs without appearing in the SQL text nor in
the code read from the catalog: casts, operators and functions of
``pg_catalog`` (aggregates, comparisons of your own types)
that call functions of your own; the sequence state that ``nextval()`` sets
through a default or an identity column (``currval()``, ``lastval()``);
objects created after the pool read the catalog; and statements sent
through ``pgconn`` (libpq) directly.  Use ``reset: "always"`` if your
database changes session state that way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db.backends.postgresql.base import Cursor, ServerBindingCursor

if TYPE_CHECKING:
    from psycopg import Connection

# pg_catalog functions that change session state (or may: run SQL given as
# text, open what outlives the statement).  Transaction-scoped ones are
# harmless for the next borrower, but they are rare enough to be judged with
# their session-scoped siblings.
_UNSAFE_FUNCTIONS = frozenset(
    {
        "set_config",
        "setseed",
        "nextval",
        "setval",
        "pg_notify",
        "ts_stat",
        "ts_rewrite",
    }
)
_UNSAFE_PREFIXES = (
    "pg_advisory",
    "pg_try_advisory",
    "pg_replication_origin",
    "pg_replication_slot",
    "pg_create_",
    "pg_copy_",
    "pg_drop_replication_slot",
    "pg_sync_replication_slots",
    "pg_logical_",
    "pg_backup_",
    "lo_",
    "binary_upgrade_",
)
# query_to_xml() runs its text argument; cursor_to_xml() reads a cursor;
# table/schema/database_to_xml() read relations (views may call anything).
_UNSAFE_INFIX = "_to_xml"

_SYSTEM = "('pg_catalog'::regnamespace, 'information_schema'::regnamespace)"
CATALOG_QUERY = (
    # Functions of pg_catalog, and names of functions elsewhere.
    "SELECT (SELECT array_agg(DISTINCT proname::text) FROM pg_catalog.pg_proc "
    "WHERE pronamespace = 'pg_catalog'::regnamespace), "
    "(SELECT array_agg(DISTINCT proname::text) FROM pg_catalog.pg_proc "
    f"WHERE pronamespace NOT IN {_SYSTEM}), "
    # Keywords that are never function names: "word (" is syntax.
    "(SELECT array_agg(word::text) FROM pg_catalog.pg_get_keywords() WHERE catcode IN ('R', 'C')), "
    # Relations whose rules (but a view's SELECT) or triggers run on writes.
    "(SELECT array_agg(DISTINCT c.relname::text) FROM pg_catalog.pg_class c WHERE EXISTS "
    "(SELECT FROM pg_catalog.pg_rewrite r WHERE r.ev_class = c.oid AND r.ev_type <> '1') "
    "OR EXISTS (SELECT FROM pg_catalog.pg_trigger t "
    "WHERE t.tgrelid = c.oid AND NOT t.tgisinternal)), "
    # Foreign tables: reading one opens connections that outlive the statement.
    "(SELECT array_agg(relname::text) FROM pg_catalog.pg_class WHERE relkind = 'f'), "
    # Code that runs when a relation is named, judged as SQL (see learn()):
    # views, row security policies, column defaults and generated columns.
    "(SELECT array_agg(ARRAY[relname::text, use, code]) FROM ("
    "SELECT c.relname, 'read' AS use, pg_catalog.pg_get_viewdef(c.oid) AS code "
    "FROM pg_catalog.pg_class c "
    f"WHERE c.relkind = 'v' AND c.relnamespace NOT IN {_SYSTEM} "
    "UNION ALL SELECT c.relname, 'read', 'SELECT ' "
    "|| coalesce(pg_catalog.pg_get_expr(p.polqual, p.polrelid), 'true') || ', ' "
    "|| coalesce(pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid), 'true') "
    "FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_class c ON c.oid = p.polrelid "
    "UNION ALL SELECT c.relname, CASE a.attgenerated WHEN 's' THEN 'write' "
    "WHEN '' THEN 'insert' ELSE 'read' END, "
    "'SELECT ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid) "
    "FROM pg_catalog.pg_attrdef d JOIN pg_catalog.pg_class c ON c.oid = d.adrelid "
    "JOIN pg_catalog.pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
    f"WHERE c.relnamespace NOT IN {_SYSTEM} "
    # Domain checks, under the domain's name (a cast to it runs them).
    "UNION ALL SELECT t.typname, 'read', "
    "regexp_replace(pg_catalog.pg_get_constraintdef(c.oid), '^CHECK ', 'SELECT ') "
    "FROM pg_catalog.pg_constraint c JOIN pg_catalog.pg_type t ON t.oid = c.contypid "
    "WHERE c.contype = 'c') code), "
    # Where a statement on one name reaches another's code: a partition or
    # an inheritance child through its parent (with the same statements), a
    # table whose foreign key cascades (or sets null or default) through the
    # table it references, a domain through a table with a column of it (or
    # of an array of it) and through a domain over it (writes).
    "(SELECT array_agg(ARRAY[reached, through, use]) FROM ("
    "SELECT r.relname::text AS reached, t.relname::text AS through, 'same' AS use "
    "FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class r ON r.oid = i.inhrelid "
    "JOIN pg_catalog.pg_class t ON t.oid = i.inhparent "
    "UNION SELECT r.relname::text, t.relname::text, 'write' "
    "FROM pg_catalog.pg_constraint f JOIN pg_catalog.pg_class r ON r.oid = f.conrelid "
    "JOIN pg_catalog.pg_class t ON t.oid = f.confrelid WHERE f.contype = 'f' "
    "AND (f.confdeltype IN ('c', 'n', 'd') OR f.confupdtype IN ('c', 'n', 'd')) "
    "UNION SELECT d.typname::text, c.relname::text, 'write' "
    "FROM pg_catalog.pg_type d JOIN pg_catalog.pg_attribute a "
    "ON a.atttypid = d.oid OR a.atttypid = d.typarray "
    "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid WHERE d.typtype = 'd' "
    "UNION SELECT d.typname::text, o.typname::text, 'same' "
    "FROM pg_catalog.pg_type d JOIN pg_catalog.pg_type o ON o.typbasetype = d.oid "
    "WHERE d.typtype = 'd') edges)"
)

# Which statements naming a watched relation run its code: any (a view, a
# policy, a foreign table), writes (triggers, rules, generated columns),
# inserts and DEFAULT (column defaults).
_ANY: frozenset[str] = frozenset()
_WRITES = frozenset({"insert", "update", "delete", "merge"})
_USES = {"read": _ANY, "write": _WRITES, "insert": frozenset({"insert", "default"})}
_WATCH_WORDS = _WRITES | {"default"}


def _widen(current: frozenset[str] | None, words: frozenset[str]) -> frozenset[str]:
    if current is None:
        return words
    return _ANY if not current or not words else current | words


_CACHE_SIZE = 4096

# Statements that may start a harmless statement, and those after "(".
# Transaction control too: a transaction is never lent open (the pool rolls
# back what its borrower left open), and its characteristics end with it.
_START = frozenset(
    {"select", "insert", "update", "delete", "with", "values", "table", "show"}
    | {"savepoint", "release", "rollback", "begin", "start", "commit", "end", "abort"}
)
_PAREN_START = frozenset({"select", "with", "values", "table"})

# -- the lexer ---------------------------------------------------------------
# Token kinds: a word (unquoted identifier or keyword, ASCII-folded to lower
# case as the server does), a quoted identifier (its exact name), a literal
# (string, number, parameter), or a character of punctuation or operator.
_WORD = 0
_QUOTED = 1
_LITERAL = 2
_CHAR = 3

_IDENT_START = r"A-Za-z_\x80-\U0010ffff"
_IDENT_CONT = r"A-Za-z_0-9$\x80-\U0010ffff"
_DOLLAR_TAG = re.compile(rf"\$(?:[{_IDENT_START}][A-Za-z_0-9\x80-\U0010ffff]*)?\$")
_SPACE = re.compile(r"[ \t\n\r\f\v]+")
_IDENT = re.compile(rf"[{_IDENT_START}][{_IDENT_CONT}]*")
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PARAM = re.compile(r"\$[0-9]+")
_STRING = re.compile(r"'(?:[^']|'')*'")
_E_STRING = re.compile(r"'(?:[^'\\]|''|\\.)*'", re.DOTALL)
_QUOTED_IDENT = re.compile(r'"(?:[^"]|"")*"')
_LINE_COMMENT = re.compile(r"--[^\n\r]*")
_COMMENT_MARK = re.compile(r"/\*|\*/")
_PLACEHOLDER = re.compile(r"%(?:\([A-Za-z0-9_]+\))?[sbt]")
_OPERATOR_CHARS = frozenset("+-*/<>=~!@#%^&|`?")
_PUNCTUATION = frozenset("()[],;:.")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class _Unsure(Exception):
    """The text holds something the lexer cannot prove harmless."""


def _skip_comment(text: str, pos: int) -> int:
    """The end of the (nested) ``/* */`` comment starting at ``pos``."""
    depth = 0
    while True:
        mark = _COMMENT_MARK.search(text, pos)
        if mark is None:
            raise _Unsure("unterminated comment")
        pos = mark.end()
        depth += 1 if mark.group() == "/*" else -1
        if depth == 0:
            return pos


def _check_percent(piece: str, with_params: bool) -> None:
    # psycopg replaces placeholders in strings and comments too: with
    # parameters, only "%%" (which becomes "%") leaves the text as lexed.
    if with_params and "%" in piece and "%" in piece.replace("%%", ""):
        raise _Unsure("a placeholder inside a string, comment or quoted identifier")


def tokenize(text: str, with_params: bool = False) -> list[tuple[int, str | None]]:
    """The tokens of ``text`` as PostgreSQL reads them; raise :class:`_Unsure` if in doubt.

    Comments and white space are dropped.  ``with_params``: the text is a
    psycopg template, whose placeholders are replaced before it is sent.
    """
    tokens: list[tuple[int, str | None]] = []
    append = tokens.append
    pos = 0
    end = len(text)
    while pos < end:
        c = text[pos]
        if c in " \t\n\r\f\v":
            pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
            continue
        nxt = text[pos + 1 : pos + 2]
        if c == "-" and nxt == "-":
            m = _LINE_COMMENT.match(text, pos)
            assert m is not None
            _check_percent(m.group(), with_params)
            pos = m.end()
            continue
        if c == "/" and nxt == "*":
            start = pos
            pos = _skip_comment(text, pos)
            _check_percent(text[start:pos], with_params)
            continue
        if c == "'":
            m = _STRING.match(text, pos)
            if m is None:
                raise _Unsure("unterminated string")
            if "\\" in m.group():
                # Ends elsewhere with standard_conforming_strings off.
                raise _Unsure("a backslash in a string")
            _check_percent(m.group(), with_params)
            append((_LITERAL, None))
            pos = m.end()
            continue
        if c == '"':
            m = _QUOTED_IDENT.match(text, pos)
            if m is None:
                raise _Unsure("unterminated quoted identifier")
            _check_percent(m.group(), with_params)
            append((_QUOTED, m.group()[1:-1].replace('""', '"')))
            pos = m.end()
            continue
        if c == "$":
            m = _PARAM.match(text, pos)
            if m is not None:
                append((_LITERAL, None))
                pos = m.end()
                continue
            m = _DOLLAR_TAG.match(text, pos)
            if m is None:
                raise _Unsure("a lone $")
            close = text.find(m.group(), m.end())
            if close < 0:
                raise _Unsure("unterminated dollar quote")
            pos = close + len(m.group())
            _check_percent(text[m.start() : pos], with_params)
            append((_LITERAL, None))
            continue
        if c in _IDENT_START_CHARS or c >= "\x80":
            low = c.lower() if c < "\x80" else c
            if nxt == "'" and low in "ebxn":
                if low == "e":
                    m = _E_STRING.match(text, pos + 1)
                else:
                    m = _STRING.match(text, pos + 1)
                    if m is not None and "\\" in m.group():
                        raise _Unsure("a backslash in a string")
                if m is None:
                    raise _Unsure("unterminated string")
                _check_percent(m.group(), with_params)
                append((_LITERAL, None))
                pos = m.end()
                continue
            if low == "u" and nxt == "&" and text[pos + 2 : pos + 3] in ("'", '"'):
                quote = text[pos + 2]
                m = (_STRING if quote == "'" else _QUOTED_IDENT).match(text, pos + 2)
                if m is None:
                    raise _Unsure("unterminated string")
                _check_percent(m.group(), with_params)
                # A U& identifier's escapes are not decoded: no name known.
                append((_LITERAL, None) if quote == "'" else (_QUOTED, None))
                pos = m.end()
                continue
            m = _IDENT.match(text, pos)
            assert m is not None
            word = m.group()
            if word.isascii():
                append((_WORD, word.translate(_ASCII_LOWER)))
            else:
                # The server folds ASCII letters only: keep the rest as is,
                # which matches no keyword nor catalog name.
                append((_WORD, "\x00" + word))
            pos = m.end()
            continue
        if c in "0123456789" or (c == "." and nxt in _DIGITS and nxt != ""):
            m = _NUMBER.match(text, pos)
            assert m is not None
            append((_LITERAL, None))
            pos = m.end()
            continue
        if c == "%" and with_params:
            if nxt == "%":
                append((_CHAR, "%"))
                pos += 2
                continue
            m = _PLACEHOLDER.match(text, pos)
            if m is None:
                raise _Unsure("a % that is not a placeholder")
            before = text[pos - 1 : pos]
            if before and (before == "$" or before in _IDENT_CONT_CHARS or before >= "\x80"):
                # "f%s" becomes f$1, another name, with server-side binding.
                raise _Unsure("a placeholder glued to a name")
            append((_LITERAL, None))
            pos = m.end()
            continue
        if c in _OPERATOR_CHARS or c in _PUNCTUATION:
            append((_CHAR, c))
            pos += 1
            continue
        raise _Unsure(f"unexpected character {c!r}")
    return tokens


_DIGITS = frozenset("0123456789")
_IDENT_START_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_IDENT_CONT_CHARS = _IDENT_START_CHARS | _DIGITS | {"$"}


class _Catalog(NamedTuple):
    """What the judge learned from the server."""

    harmless: frozenset[str]  # pg_catalog functions that cannot change session state
    syntax: frozenset[str]  # keywords that are never function names
    own: frozenset[str]  # names of functions outside pg_catalog
    # Relation -> the words that make a statement naming it run its code
    # (empty: any statement).
    watched: dict[str, frozenset[str]]


class StatementJudge:
    """Decides, per SQL string, whether a statement may change session state."""

    def __init__(self) -> None:
        self._catalog: _Catalog | None = None
        self._verdicts: dict[str, bool] = {}
        self._verdicts_with_params: dict[str, bool] = {}

    @property
    def ready(self) -> bool:
        return self._catalog is not None

    def learn(self, conn: Connection[Any]) -> None:
        """Read the server's keywords, functions, and relations that run code (once per pool).

        The code that runs when a relation is named (a view's query, a
        policy, a column default) is judged like a statement: a relation
        whose code may dirty the session dirties a statement that names it
        (for defaults, one that inserts or says DEFAULT).  A view of such a
        view is found by judging again until nothing changes, and so is a
        partitioned or inheritance parent of such a relation, a table that a
        foreign key of such a relation cascades from, and, for a domain
        whose check may dirty the session, the domain's name (a cast), a
        table with a column of it (writes) and a domain over it.  ``nextval()``
        is let through in defaults: the sequence state it sets (``currval()``)
        is not tracked, as for identity columns, which do the same unseen.
        """
        row = conn.execute(CATALOG_QUERY, prepare=False).fetchone()
        if row is None or not row[0] or not row[2]:
            return  # not a catalog worth trusting: everything stays dirty
        catalog, own, syntax, on_writes, foreign, code, edges = row
        harmless = frozenset(
            f
            for f in catalog
            if f not in _UNSAFE_FUNCTIONS
            and not f.startswith(_UNSAFE_PREFIXES)
            and _UNSAFE_INFIX not in f
        )
        watched: dict[str, frozenset[str]] = {}
        for name in on_writes or []:
            watched[name] = _widen(watched.get(name), _WRITES)
        for name in foreign or []:
            watched[name] = _ANY
        learned = _Catalog(harmless, frozenset(syntax), frozenset(own or []), watched)
        in_defaults = learned._replace(harmless=harmless | {"nextval"})
        changed = True
        while changed:
            changed = False
            for relation, use, text in code or []:
                words = _USES[use]
                current = watched.get(relation)
                if current is not None and _widen(current, words) == current:
                    continue
                if _judge(text, False, in_defaults if use == "insert" else learned):
                    watched[relation] = _widen(current, words)
                    changed = True
            for reached, through, use in edges or []:
                below = watched.get(reached)
                if below is None:
                    continue
                current = watched.get(through)
                widened = _widen(current, below if use == "same" else _WRITES)
                if widened != current:
                    watched[through] = widened
                    changed = True
        # Published once complete: until then every statement is dirty.
        self._catalog = learned

    def dirties(self, query: object, with_params: bool = False) -> bool:
        """Whether running ``query`` may leave session state behind.

        ``with_params``: the query is sent with parameters (psycopg then
        replaces its placeholders).
        """
        if not isinstance(query, str):
            # bytes, psycopg.sql objects, templates: not worth decoding to judge.
            return True
        verdicts = self._verdicts_with_params if with_params else self._verdicts
        verdict = verdicts.get(query)
        if verdict is None:
            catalog = self._catalog
            if catalog is None:
                return True
            verdict = _judge(query, with_params, catalog)
            if len(verdicts) >= _CACHE_SIZE:
                verdicts.clear()
            verdicts[query] = verdict
        return verdict

    def judge(self, query: str, with_params: bool = False) -> bool:
        """Judge ``query`` without the cache: True if it may dirty the session."""
        catalog = self._catalog
        return True if catalog is None else _judge(query, with_params, catalog)


def _judge(query: str, with_params: bool, catalog: _Catalog) -> bool:
    try:
        tokens = tokenize(query, with_params)
    except _Unsure:
        return True
    start = 0
    for i, (kind, value) in enumerate(tokens):
        if kind == _CHAR and value == ";":
            if _dirty_statement(tokens, start, i, catalog):
                return True
            start = i + 1
    return _dirty_statement(tokens, start, len(tokens), catalog)


def _dirty_statement(
    tokens: list[tuple[int, str | None]], start: int, end: int, catalog: _Catalog
) -> bool:
    if start == end:
        return False  # an empty statement
    harmless, syntax, own, watched = catalog
    first = start
    while first < end and tokens[first] == (_CHAR, "("):
        first += 1
    if first == end:
        return True
    kind, word = tokens[first]
    if kind != _WORD or word not in (_PAREN_START if first > start else _START):
        return True
    if word == "start" and (first + 1 >= end or tokens[first + 1] != (_WORD, "transaction")):
        return True  # only START TRANSACTION
    # Words of watched relations named, and words of the statement that
    # run their code (INSERT, UPDATE, DEFAULT...), compared at the end.
    triggers: set[str] = set()
    said: set[str] = set()
    for i in range(first, end):
        kind, value = tokens[i]
        if kind == _CHAR:
            if (
                value == "("
                and i > first
                and tokens[i - 1][0] in (_WORD, _QUOTED)
                and _dirty_call(tokens, first, i, end, harmless, syntax, own)
            ):
                return True
            continue
        if kind == _WORD:
            if value == "into" and tokens[i - 1] != (_WORD, "insert"):
                return True  # SELECT ... INTO creates a table
            if value == "uescape":
                # U&"..." UESCAPE '!' is one name, which the lexer does not decode.
                return True
            if value in _WATCH_WORDS:
                said.add(value)
        elif kind != _QUOTED:
            continue
        if value is None:
            continue
        words = watched.get(value)
        if words is not None:
            if not words:
                return True  # a view, policy or foreign table that may dirty it
            triggers |= words
        if (
            value in own
            and i > first
            and tokens[i - 1] == (_CHAR, ".")
            and (i + 1 == end or tokens[i + 1] != (_CHAR, "("))
        ):
            return True  # t.f is f(t) (and s.f( a call, judged as such)
    return not triggers.isdisjoint(said)


def _dirty_call(
    tokens: list[tuple[int, str | None]],
    first: int,
    paren: int,
    end: int,
    harmless: frozenset[str],
    syntax: frozenset[str],
    own: frozenset[str],
) -> bool:
    """Whether ``name (`` before ``tokens[paren]`` is a call that may dirty the session."""
    kind, name = tokens[paren - 1]
    if kind == _WORD and name in syntax:
        # A reserved keyword: SELECT (, IN (, COALESCE(...  SUBSTRING(a, b)
        # and OVERLAY(a, b) are calls looked up on the search_path,
        # though: an overload of your own may be picked.
        return name in own
    qualified = paren - 3 >= first and tokens[paren - 2] == (_CHAR, ".")
    if qualified:
        if tokens[paren - 3][0] not in (_WORD, _QUOTED):
            return True  # (expr).f(: not something to prove harmless
        before = tokens[paren - 4] if paren - 4 >= first else None
    else:
        before = tokens[paren - 2] if paren - 2 >= first else None
    if before == (_WORD, "into"):
        return False  # INSERT INTO [schema.]table (columns)
    if not qualified:
        if before == (_CHAR, ")") or before == (_WORD, "as"):
            # f(x) FILTER (, OVER (, (subquery) t(a, b), AS t(a, b),
            # AS MATERIALIZED (, CAST(x AS type(n)): not calls.
            return False
        if (
            name == "by"
            and kind == _WORD
            and before in ((_WORD, "order"), (_WORD, "group"), (_WORD, "partition"))
        ):
            return False
        if name == "conflict" and kind == _WORD and before == (_WORD, "on"):
            # ON CONFLICT (columns) DO: "conflict(...)" followed by DO
            # cannot parse as a call in a join condition.
            depth = 0
            for j in range(paren, end):
                if tokens[j] == (_CHAR, "("):
                    depth += 1
                elif tokens[j] == (_CHAR, ")"):
                    depth -= 1
                    if depth == 0:
                        return not (j + 1 < end and tokens[j + 1] == (_WORD, "do"))
            return True
    else:
        if tokens[paren - 3] not in ((_WORD, "pg_catalog"), (_QUOTED, "pg_catalog")):
            return True
        if before == (_CHAR, "."):
            return True  # database.schema.function(
        return name not in harmless
    # Unqualified: a function of another schema on the search_path with
    # the same name may be the one called, for some argument types.
    return name not in harmless or name in own


def _mark(cursor: Any, query: object, with_params: bool) -> None:
    conn = cursor.connection
    conn._dpb_active = True  # for max_idle_lent (see tracking.take_back_idle())
    if not conn._dpb_stateful:
        judge = conn._dpb_judge
        if judge is None or judge.dirties(query, with_params):
            conn._dpb_stateful = conn._dpb_dirty = True


class _Tracking:
    """Notes, before running it, whether a statement may dirty the session.

    Every way psycopg's cursors send SQL: ``execute()`` (which
    ``Connection.execute()`` and Django's ``callproc()`` go through),
    ``executemany()``, ``stream()`` and ``copy()``.  Server-side cursors are
    marked dirty by the backend's ``create_cursor()``.
    """

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _mark(self, query, params is not None)
        return super().execute(query, params, **kwargs)  # type: ignore[misc]

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        _mark(self, query, True)
        return super().executemany(query, params_seq, **kwargs)  # type: ignore[misc]

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _mark(self, query, params is not None)
        return super().stream(query, params, **kwargs)  # type: ignore[misc]

    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        _mark(self, statement, params is not None)
        return super().copy(statement, params, **kwargs)  # type: ignore[misc]


class TrackingCursor(_Tracking, Cursor):
    """Django's client-side binding cursor, judging what it runs."""


class TrackingServerBindingCursor(_Tracking, ServerBindingCursor):
    """Django's server-side binding cursor, judging what it runs."""
