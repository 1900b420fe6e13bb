"""A generated corpus of disguised session-state changes, for the statement judge.

Each :class:`Change` is a statement that leaves session state behind; each
disguise rewrites it the ways a hand-written query, an ORM or an attacker's
input could (comments between any two tokens, case, white space, quoted and
qualified names, other statements before it in the same ``execute()``,
nested in subqueries and CTEs, dollar-quoted bodies with tags...).
:func:`corpus` combines them exhaustively, then adds seeded random
combinations, so that a run is the same every time.

Every generated text is valid SQL that changes the state when run (given the
objects of :data:`SETUP`): the real-server test runs a sample of them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

ROLE = "dpb_tenant"

# Objects some changes need, created in the test database before the pool
# reads the catalog.
SETUP = [
    "CREATE OR REPLACE FUNCTION dpb_judge_fn() RETURNS text LANGUAGE plpgsql AS "
    "$$ BEGIN RETURN set_config('app.judge', 'fn', false); END $$",
    "CREATE OR REPLACE PROCEDURE dpb_judge_proc() LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM set_config('app.judge', 'proc', false); END $$",
    "CREATE TABLE IF NOT EXISTS dpb_judge_row (x int)",
    "INSERT INTO dpb_judge_row SELECT 1 WHERE NOT EXISTS (SELECT FROM dpb_judge_row)",
    "CREATE OR REPLACE FUNCTION dpb_judge_attr(r dpb_judge_row) RETURNS text LANGUAGE sql AS "
    "$$ SELECT set_config('app.judge', 'attr', false) $$",
    "CREATE TABLE IF NOT EXISTS dpb_judge_trig (x int)",
    "CREATE OR REPLACE FUNCTION dpb_judge_trig_fn() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM set_config('app.judge', 'trigger', false); RETURN NEW; END $$",
    "CREATE OR REPLACE TRIGGER dpb_judge_trig BEFORE INSERT ON dpb_judge_trig "
    "FOR EACH ROW EXECUTE FUNCTION dpb_judge_trig_fn()",
    # An overload of a pg_catalog name: md5(42) picks it (no implicit int -> text).
    "CREATE OR REPLACE FUNCTION public.md5(integer) RETURNS text LANGUAGE sql AS "
    "$$ SELECT set_config('app.judge', 'shadow', false) $$",
    "CREATE SEQUENCE IF NOT EXISTS dpb_judge_seq",
    # Code that runs when a relation is named: a view (and a view of it), a
    # column default, a stored generated column, a row security policy.
    "CREATE OR REPLACE VIEW dpb_judge_view AS SELECT dpb_judge_fn() AS v",
    "CREATE OR REPLACE VIEW dpb_judge_view2 AS SELECT v FROM dpb_judge_view",
    "CREATE TABLE IF NOT EXISTS dpb_judge_def (x int, v text DEFAULT dpb_judge_fn())",
    "CREATE OR REPLACE FUNCTION dpb_judge_imm(integer) RETURNS text LANGUAGE plpgsql IMMUTABLE "
    "AS $$ BEGIN RETURN set_config('app.judge', 'generated', false); END $$",
    "CREATE TABLE IF NOT EXISTS dpb_judge_gen "
    "(x int, v text GENERATED ALWAYS AS (dpb_judge_imm(x)) STORED)",
    "INSERT INTO dpb_judge_gen (x) SELECT 1 WHERE NOT EXISTS (SELECT FROM dpb_judge_gen)",
    "CREATE TABLE IF NOT EXISTS dpb_judge_rls (x int)",
    "ALTER TABLE dpb_judge_rls ENABLE ROW LEVEL SECURITY",
    "DROP POLICY IF EXISTS dpb_judge_rls ON dpb_judge_rls",
    "CREATE POLICY dpb_judge_rls ON dpb_judge_rls USING (dpb_judge_fn() IS NOT NULL)",
    # Reached through another relation: a partition with a trigger, and a
    # table with a trigger whose foreign key cascades updates of its parent.
    "CREATE TABLE IF NOT EXISTS dpb_judge_part (x int) PARTITION BY LIST (x)",
    "CREATE TABLE IF NOT EXISTS dpb_judge_part_1 PARTITION OF dpb_judge_part FOR VALUES IN (1)",
    "CREATE OR REPLACE TRIGGER dpb_judge_part_trig BEFORE INSERT ON dpb_judge_part_1 "
    "FOR EACH ROW EXECUTE FUNCTION dpb_judge_trig_fn()",
    "CREATE TABLE IF NOT EXISTS dpb_judge_parent (id int PRIMARY KEY)",
    "INSERT INTO dpb_judge_parent SELECT 1 WHERE NOT EXISTS (SELECT FROM dpb_judge_parent)",
    "CREATE TABLE IF NOT EXISTS dpb_judge_child "
    "(parent_id int REFERENCES dpb_judge_parent ON UPDATE CASCADE)",
    "INSERT INTO dpb_judge_child SELECT id FROM dpb_judge_parent "
    "WHERE NOT EXISTS (SELECT FROM dpb_judge_child)",
    "CREATE OR REPLACE TRIGGER dpb_judge_child_trig BEFORE UPDATE ON dpb_judge_child "
    "FOR EACH ROW EXECUTE FUNCTION dpb_judge_trig_fn()",
    # A domain whose check calls such a function, and a table with a column of it.
    "CREATE OR REPLACE FUNCTION dpb_judge_check(integer) RETURNS boolean LANGUAGE plpgsql "
    "AS $$ BEGIN PERFORM set_config('app.judge', 'domain', false); RETURN true; END $$",
    "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_type WHERE typname = 'dpb_judge_dom') THEN "
    "CREATE DOMAIN dpb_judge_dom AS integer CHECK (dpb_judge_check(VALUE)); END IF; END $$",
    "CREATE TABLE IF NOT EXISTS dpb_judge_domtab (x dpb_judge_dom)",
]


@dataclass(frozen=True)
class Change:
    """A statement that changes session state; ``call`` if it is a function call."""

    name: str
    sql: str
    # For function calls: the call expression (disguised on its own) and the
    # function name inside it.
    call: str | None = None
    function: str | None = None
    # Runs on the real server as written and leaves state that a later
    # borrower could see (SET LOCAL and BEGIN do not, outside a transaction).
    on_server: bool = True
    # Whether "pg_catalog." in front still calls it (not for an overload of
    # your own, which pg_catalog.md5(42) does not reach: an error).
    qualifiable: bool = True


def _call(
    name: str, function: str, expression: str, on_server: bool = True, qualifiable: bool = True
) -> Change:
    return Change(name, f"SELECT {expression}", expression, function, on_server, qualifiable)


CHANGES: list[Change] = [
    Change("set_search_path", "SET search_path TO pg_catalog"),
    Change("set_equals", "SET statement_timeout = 1234"),
    Change("set_session", "SET SESSION statement_timeout TO 4321"),
    Change("set_time_zone", "SET TIME ZONE 'Asia/Kolkata'"),
    Change("set_role", f"SET ROLE {ROLE}"),
    Change("set_session_authorization", f"SET SESSION AUTHORIZATION {ROLE}"),
    Change("listen", "LISTEN dpb_judge"),
    Change("prepare", "PREPARE dpb_judge_p AS SELECT 1"),
    Change("create_temp_table", "CREATE TEMP TABLE dpb_judge_tmp (x int)"),
    Change("create_temp_table_as", "CREATE TEMPORARY TABLE dpb_judge_tmp AS SELECT 1 AS x"),
    Change("select_into_temp", "SELECT 1 AS x INTO TEMP dpb_judge_tmp"),
    Change(
        "select_into_temp_table", "SELECT * INTO TEMPORARY TABLE dpb_judge_tmp FROM dpb_judge_row"
    ),
    Change(
        "with_select_into",
        "WITH a AS (SELECT 1 AS x) SELECT * INTO TEMP dpb_judge_tmp FROM a",
    ),
    Change("declare_with_hold", "DECLARE dpb_judge_c CURSOR WITH HOLD FOR SELECT 1"),
    Change(
        "do_block",
        "DO $$BEGIN PERFORM set_config('app.judge', 'do', false); END$$",
    ),
    Change(
        "do_block_tagged",
        "DO LANGUAGE plpgsql $body$BEGIN PERFORM set_config('app.judge', 'do', false); END$body$",
    ),
    Change(
        "do_block_e_string",
        "DO E'BEGIN PERFORM set_config(\\'app.judge\\', \\'do\\', false); END'",
    ),
    Change("call_procedure", "CALL dpb_judge_proc()"),
    Change(
        "execute_prepared",
        "PREPARE dpb_judge_x AS SELECT set_config('app.judge', 'exec', false); EXECUTE dpb_judge_x",
    ),
    Change(
        "copy",
        "COPY (SELECT set_config('app.judge', 'copy', false)) TO '/dev/null'",
    ),
    Change(
        "update_pg_settings",
        "UPDATE pg_settings SET setting = 'pg_catalog' WHERE name = 'search_path'",
    ),
    Change("insert_with_trigger", "INSERT INTO dpb_judge_trig VALUES (1)"),
    Change("attribute_notation", "SELECT r.dpb_judge_attr FROM dpb_judge_row r"),
    Change("view", "SELECT v FROM dpb_judge_view"),
    Change("view_of_view", "SELECT * FROM dpb_judge_view2"),
    Change("column_default", "INSERT INTO dpb_judge_def (x) VALUES (1)"),
    Change("generated_column", "UPDATE dpb_judge_gen SET x = 2"),
    Change("insert_into_partitioned", "INSERT INTO dpb_judge_part VALUES (1)"),
    Change("cascading_foreign_key", "UPDATE dpb_judge_parent SET id = -id"),
    Change("domain_check_insert", "INSERT INTO dpb_judge_domtab VALUES (1)"),
    Change("domain_check_cast", "SELECT 1::dpb_judge_dom"),
    # Superusers (the test server's user) bypass row security.
    Change("row_security_policy", "SELECT * FROM dpb_judge_rls", on_server=False),
    Change("set_local", "SET LOCAL statement_timeout = 5", on_server=False),
    _call("set_config", "set_config", "set_config('app.judge', 'x', false)"),
    _call("advisory_lock", "pg_advisory_lock", "pg_advisory_lock(4242)"),
    _call("try_advisory_lock", "pg_try_advisory_lock", "pg_try_advisory_lock(4243)"),
    _call("advisory_lock_shared", "pg_advisory_lock_shared", "pg_advisory_lock_shared(4244)"),
    _call("setseed", "setseed", "setseed(0.5)", on_server=False),
    _call("nextval", "nextval", "nextval('dpb_judge_seq')", on_server=False),
    _call("own_function", "dpb_judge_fn", "dpb_judge_fn()", qualifiable=False),
    _call("shadowing_overload", "md5", "md5(42)", qualifiable=False),
    _call(
        "query_to_xml",
        "query_to_xml",
        "query_to_xml('SELECT set_config(''app.judge'', ''xml'', false)', true, false, '')",
        on_server=False,  # the embedded server is built without libxml
    ),
    _call(
        "ts_rewrite",
        "ts_rewrite",
        "ts_rewrite('a'::tsquery, "
        "'SELECT set_config(''app.judge'', ''ts'', false)::tsquery, ''b''::tsquery')",
    ),
    _call("pg_notify", "pg_notify", "pg_notify('dpb_judge', 'x')", on_server=False),
]

# -- disguises ------------------------------------------------------------------
# A text piece that the lexer must keep whole: strings, quoted identifiers,
# dollar-quoted bodies.  Disguises only touch what is between them.
_QUOTED = re.compile(
    r"""(E'(?:[^'\\]|''|\\.)*'|'(?:[^']|'')*'|"(?:[^"]|"")*"|(\$\w*\$).*?\2)""", re.S
)

SEPARATORS = [
    " ",
    "\t",
    "\n",
    "\r\n",
    "  \f ",
    "/**/",
    " /* ; SET search_path TO x */ ",
    "/* a /* nested; */ b */",
    " -- ; LISTEN x\n",
    "--\n",
    "\n\t/*\n*/\t",
]

PREFIXES = [
    "SELECT 1; ",
    "SELECT 1;",
    "select 1 ;\n",
    "SELECT ';'; ",
    "SELECT $$;$$; ",
    "SELECT $t$ $$; $t$; ",
    "SELECT 'it''s;'; ",
    "SELECT E'\\';'; ",
    'SELECT "a;b" FROM (SELECT 1 AS "a;b") s; ',
    "/* ; */ SELECT 1; ",
    "SELECT 1 -- ;\n; ",
    ";; ",
    "; ",
    "SELECT pg_sleep(0); ",
    "SELECT count(*) FROM dpb_judge_row; ",
    "WITH a AS (SELECT 1) SELECT * FROM a; ",
    "SHOW search_path; ",
    "VALUES (1); ",
    "(SELECT 1) UNION (SELECT 2); ",
]

# Ways to write a qualified or quoted function name ({} is the name).
NAMES = [
    "{}",
    '"{}"',
    "pg_catalog.{}",
    "PG_CATALOG.{upper}",
    '"pg_catalog"."{}"',
    "pg_catalog . {}",
    "pg_catalog/**/./**/{}",
    'pg_catalog/* . */."{}"',
    "{upper}",
    "{mixed}",
    'U&"{}"',
    "U&\"{escaped}\" UESCAPE '!' ",
]

# Between a function's name and its parenthesis.
BEFORE_PAREN = ["", " ", "\t", "\n", "/**/", "/* ( */", "/* /* */ */", "--x\n", " -- (\n "]

# Contexts for a call expression ({} is the call).
CONTEXTS = [
    "SELECT {}",
    "SELECT 1 WHERE {} IS NOT NULL",
    "SELECT * FROM (SELECT {}) AS sub",
    "SELECT (SELECT {})",
    "WITH x AS (SELECT {}) SELECT * FROM x",
    "WITH x AS MATERIALIZED (SELECT {} AS v) SELECT v FROM x",
    "VALUES ({})",
    "SELECT coalesce(({})::text, 'x')",
    "SELECT CASE WHEN true THEN {} END",
    "SELECT count(*) FILTER (WHERE {} IS NOT NULL) FROM dpb_judge_row",
    "SELECT x FROM dpb_judge_row ORDER BY ({})::text",
    "SELECT * FROM dpb_judge_row r, LATERAL (SELECT {}) l",
    "SELECT ARRAY[({})::text]",
    "SELECT ({})::text",
    "SELECT CAST({} AS text)",
    "(SELECT {})",
    "((SELECT {}))",
    "SELECT x FROM dpb_judge_row WHERE x IN (SELECT 1 FROM (SELECT {}) s)",
    "UPDATE dpb_judge_row SET x = x WHERE {} IS NOT NULL",
    "DELETE FROM dpb_judge_row WHERE {} IS NULL",
    "INSERT INTO dpb_judge_row (x) SELECT 1 WHERE {} IS NULL",
    "SELECT row_number() OVER (ORDER BY ({})::text) FROM dpb_judge_row",
    "TABLE dpb_judge_row LIMIT 0; SELECT {}",
]


def _outside_quotes(sql: str, change: Callable[[str], str]) -> str:
    """Apply ``change`` to the parts of ``sql`` outside strings, quotes and bodies."""
    parts = _QUOTED.split(sql)
    out = []
    i = 0
    while i < len(parts):
        out.append(change(parts[i]))
        if i + 1 < len(parts):
            out.append(parts[i + 1])  # the quoted piece, kept
        i += 3  # split() also returns the inner group (the tag)
    return "".join(out)


def _mixed(word: str) -> str:
    return "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(word))


def separate(sql: str, sep: str) -> str:
    """Replace every space outside quotes with ``sep``."""
    return _outside_quotes(sql, lambda part: part.replace(" ", sep))


def recase(sql: str, how: str) -> str:
    """Upper, lower or mixed case outside quotes (dollar bodies kept)."""
    change = {"upper": str.upper, "lower": str.lower, "mixed": _mixed}[how]
    return _outside_quotes(sql, change)


def name_forms(function: str, qualifiable: bool = True) -> Iterator[str]:
    for form in NAMES:
        if not qualifiable and "pg_catalog" in form.lower():
            continue
        escaped = f"!{ord(function[0]):04x}{function[1:]}"  # U& escape of the first letter
        yield form.format(function, upper=function.upper(), mixed=_mixed(function), escaped=escaped)


@dataclass(frozen=True)
class Case:
    """One disguised change: ``kind`` names the disguise, ``change`` the state."""

    kind: str
    change: Change
    sql: str

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.change.name}"


def _disguised_calls(change: Change) -> Iterator[tuple[str, str]]:
    assert change.call is not None
    assert change.function is not None
    args = change.call[len(change.function) :]
    for form in name_forms(change.function, change.qualifiable):
        yield "name", f"SELECT {form}{args}"
    for gap in BEFORE_PAREN:
        yield "before_paren", f"SELECT {change.function}{gap}{args}"
        if change.qualifiable:
            yield "qualified_before_paren", f'SELECT "pg_catalog".{change.function}{gap}{args}'
    for context in CONTEXTS:
        yield "context", context.format(change.call)
    for gap in SEPARATORS:
        # Comments and white space between every token of the arguments too.
        yield "call_separators", separate(f"SELECT {change.call}", gap)


def corpus(random_cases: int = 2000, seed: int = 14) -> list[Case]:
    """Every change, disguised every way, then ``random_cases`` random combinations."""
    cases: list[Case] = []
    for change in CHANGES:
        cases.append(Case("plain", change, change.sql))
        for sep in SEPARATORS:
            cases.append(Case("separators", change, separate(change.sql, sep)))
            cases.append(Case("leading", change, sep + change.sql))
        for how in ("upper", "lower", "mixed"):
            cases.append(Case("case", change, recase(change.sql, how)))
        for prefix in PREFIXES:
            cases.append(Case("after_statement", change, prefix + change.sql))
            if "dpb_judge" not in prefix:  # a changed search_path or role may not see it
                cases.append(Case("before_statement", change, change.sql + "; " + prefix))
        cases.append(Case("trailing_semicolon", change, change.sql + ";"))
        cases.append(Case("parenthesized_prefix", change, "(SELECT 1);" + change.sql))
        if change.call is not None:
            for kind, sql in _disguised_calls(change):
                cases.append(Case(kind, change, sql))
    rng = random.Random(seed)
    for _ in range(random_cases):
        change = rng.choice(CHANGES)
        sql = change.sql
        sep = rng.choice(SEPARATORS)
        how = rng.choice(("upper", "lower", "mixed", "as is"))
        if change.call is not None and change.function is not None and rng.random() < 0.7:
            form = rng.choice(list(name_forms(change.function, change.qualifiable)))
            call = form + rng.choice(BEFORE_PAREN) + change.call[len(change.function) :]
            # The context disguised, the call's own disguise kept as it is.
            context = separate(rng.choice(CONTEXTS), sep)
            sql = (context if how == "as is" else recase(context, how)).format(call)
        else:
            sql = separate(sql if how == "as is" else recase(sql, how), sep)
        prefixes = rng.sample(PREFIXES, rng.randint(0, 3))
        sql = "".join(prefixes) + rng.choice(SEPARATORS) + sql
        if rng.random() < 0.5:
            sql += ";" + rng.choice(["", " ", " SELECT 1", " -- end"])
        cases.append(Case("random", change, sql))
    return cases


# -- false positives: texts that must stay clean ---------------------------------

CLEAN = [
    "SELECT 'SET search_path TO x'",
    "SELECT 'a''; SET search_path TO x; --'",
    "SELECT E'\\'; SET search_path TO x; --'",
    "SELECT $$; LISTEN x; SELECT set_config('a.b', 'c', false)$$",
    "SELECT $q$ $$; LISTEN x; $$ $q$",
    "SELECT 1 /* ; SET search_path TO x */",
    "SELECT 1 /* nested /* ; SET x = 1 */ still a comment; LISTEN x */",
    "SELECT 1 -- ; SET search_path TO x",
    'SELECT "set_config" FROM (SELECT 1 AS "set_config") s',
    "SELECT 'set_config(''a'', ''b'', false)'",
    "SELECT lower('X'), \"lower\"('X'), pg_catalog.lower('X'), \"pg_catalog\".\"lower\"('X')",
    "SELECT pg_catalog /* x */ . lower /* y */ ('X')",
    "SELECT count(*) FILTER (WHERE x > 0) OVER (PARTITION BY x) FROM dpb_judge_row",
    "SELECT x FROM dpb_judge_row ORDER BY (x) DESC",
    "SELECT * FROM generate_series(1, 3) AS g(i)",
    "SELECT 1; SELECT 2; ; SELECT 3;",
    "(SELECT 1) UNION ALL (SELECT 2)",
    "SELECT currval('dpb_judge_seq') IS NULL",  # fails if unset, changes nothing
    "SELECT pg_sleep(0)",
    "SELECT 1 FOR UPDATE",
    "INSERT INTO dpb_judge_row AS r (x) VALUES (1) ON CONFLICT DO NOTHING",
    "SELECT U&'d\\0061t\\+000061'",
    "SELECT x'1F', b'101', n'abc'",
    "SELECT 1.5e3, .5, 3.",
    "SELECT $1",
    "SELECT name, setting FROM pg_settings",  # its rules run on UPDATE only
    "SELECT x FROM dpb_judge_trig",  # triggers run on writes only
    "SELECT x, v FROM dpb_judge_def",  # defaults run on inserts only
    "UPDATE dpb_judge_def SET x = 2",
    "INSERT INTO dpb_judge_row (x) VALUES (1)",  # neither trigger nor default of ours
    "SELECT x FROM dpb_judge_part",  # a partition's trigger runs on writes only
    "SELECT id FROM dpb_judge_parent",
    "SELECT x FROM dpb_judge_domtab",  # a domain's check runs on writes and casts
    "",
    "  ;  ",
    "/* only a comment */",
]

# With parameters (psycopg replaces placeholders); (sql, dirty).
WITH_PARAMS = [
    ('SELECT "shop_item"."id" FROM "shop_item" WHERE "shop_item"."name" LIKE %s', False),
    ("SELECT %(name)s, %s::int", False),
    ("SELECT '100%%'", False),
    ("SELECT 1 %% 2", False),
    # A placeholder in a string: its value may close the string.
    ("SELECT '%s; SET search_path TO x; --'", True),
    ("SELECT 1 /* %s */", True),
    ("SELECT $$%s$$", True),
    ('SELECT "%s"', True),
    ("SELECT %(a'b)s; SET search_path TO x; SELECT %(c')s", True),
    ("SELECT 1 %", True),
    ("SELECT f%s(1)", True),
    ("SELECT %s; SET search_path TO x", True),
]
