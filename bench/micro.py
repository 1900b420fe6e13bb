"""Micro-measurements with pyperf: one request in one thread, per strategy, and a pool cycle.

Usage (from the repository root, after ``bash .ci/setup-venv "test,bench"``)::

    .venv/bin/python bench/micro.py                       # every measurement
    .venv/bin/python bench/micro.py --fast --rounds 1     # a smoke run
    .venv/bin/python bench/micro.py --only request --strategies persistent,pooled

Measurements, each a pyperf benchmark run in worker processes that pyperf
spawns, warms up and calibrates:

``request``
    Workload (a) of ``bench/run.py`` at one thread (``request_started``, a
    get by primary key, ``request_finished``), per strategy, against
    persistent connections: the one-thread overhead of a pool.
``cycle``
    ``ensure_connection()`` then ``close()`` of the default alias (one
    borrow, one return with its reset, the statistics' counters), the
    package of this tree against the package at ``--base`` (``git archive``).
``hooks``
    The statements the pool statistics add to a borrow and to a return,
    alone (pyperf's ``timeit``).

The variants of a measurement take turns, ``--rounds`` times; each turn
appends ``--processes`` worker processes to the variant's JSON file (the
loop count calibrated in the first turn, then kept), so that drifts of a
shared machine fall on every variant alike.  ``pyperf compare_to`` then
compares them, with its significance test.  The raw JSON files stay in
``--output-dir`` (not committed); ``latest.rst`` there holds the tables,
with the command, the date, the machine and the versions.

The server is ``DATABASE_URL`` if set, else the embedded PostgreSQL of
``testproject.pgserver`` (started here, stopped at exit).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder is first on sys.path: the root goes last
# instead, so that the package at --base, first on a worker's PYTHONPATH,
# is the one imported.
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    del sys.path[0]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench import report, run, strategies  # noqa: E402
from testproject import pgserver  # noqa: E402

MEASUREMENTS = ("request", "cycle", "hooks")
HOOKS = {
    "borrow": "started = time.monotonic()\ncounters.waits.append(time.monotonic() - started)",
    "give_back": "counters.resets += 1",
}
HOOKS_SETUP = "import time\nfrom django_pooled_backend.stats import PoolCounters\n"
HOOKS_SETUP += "counters = PoolCounters()"


# -- the workers (pyperf runs this file again with "worker") ---------------------


def worker() -> None:
    """A pyperf worker: ``worker --bench NAME [--strategy S]`` and pyperf's options."""
    import pyperf

    def pass_on(cmd: list[str], args: argparse.Namespace) -> None:
        cmd += ["--bench", args.bench, "--strategy", args.strategy]

    runner = pyperf.Runner(add_cmdline_args=pass_on, program_args=(__file__, "worker"))
    runner.argparser.add_argument("mode", choices=["worker"])  # not dest "worker": pyperf's
    runner.argparser.add_argument("--bench", choices=MEASUREMENTS, required=True)
    runner.argparser.add_argument("--strategy", default="")
    args = runner.parse_args()
    if args.bench == "hooks":
        for name, stmt in HOOKS.items():
            runner.timeit(name, stmt, HOOKS_SETUP)
        return
    if args.bench == "cycle":
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
        import django

        django.setup()
        from django.db import connection

        import django_pooled_backend

        runner.metadata["package"] = str(Path(django_pooled_backend.__file__).parent)

        def cycle(loops: int) -> float:
            started = time.perf_counter()
            for _ in range(loops):
                connection.ensure_connection()
                connection.close()
            return time.perf_counter() - started

        runner.bench_time_func("cycle", cycle)
        return
    import environ

    from bench import workloads

    db = environ.Env.db_url_config(os.environ["DATABASE_URL"])
    run.configure_django(db, [strategies.BY_NAME[args.strategy]], None)

    def requests(loops: int) -> float:
        started = time.perf_counter()
        for i in range(loops):
            workloads.request(workloads.view_read, args.strategy, 1 + i % 1000)
        return time.perf_counter() - started

    runner.bench_time_func("request", requests)


# -- the driver ----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/micro.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated")
    parser.add_argument(
        "--strategies",
        default="persistent,pooled,pooled-transaction,django-pool",
        help="of the request measurement (persistent is always in)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns of every variant")
    parser.add_argument("--processes", type=int, default=4, help="worker processes per turn")
    parser.add_argument("--fast", action="store_true", help="pyperf --fast in every worker")
    parser.add_argument("--base", default=None, help="revision of the cycle's other package")
    parser.add_argument("--items", type=int, default=10_000, help="rows in the table")
    parser.add_argument(
        "--output-dir", type=Path, default=ROOT / "bench" / "results" / "micro", help="where"
    )
    args = parser.parse_args(argv)
    args.only = [m for m in args.only.split(",") if m]
    unknown = set(args.only) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown measurements {sorted(unknown)}; choose among {MEASUREMENTS}")
    names = [n for n in args.strategies.split(",") if n]
    if strategies.REFERENCE not in names:
        names.insert(0, strategies.REFERENCE)
    args.strategy_names = names
    return args


def turns(
    variants: dict[str, tuple[str, dict[str, str]]], args: argparse.Namespace, bench: str
) -> dict[str, Path]:
    """Run every variant ``args.rounds`` times in turn; returns its JSON file."""
    import pyperf

    files = {name: args.output_dir / f"{bench}-{name}.json" for name in variants}
    for path in files.values():
        path.unlink(missing_ok=True)
    for r in range(args.rounds):
        names = list(variants)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            strategy, env = variants[name]
            path = files[name]
            command = [sys.executable, __file__, "worker", "--bench", bench]
            command += ["--strategy", strategy, "--append", str(path), "--quiet"]
            # pyperf gives its workers a clean environment but for these.
            command += ["--inherit-environ", "DATABASE_URL,PYTHONPATH"]
            command += ["--processes", str(args.processes)] + (["--fast"] if args.fast else [])
            if path.exists():
                # Calibrated in the first turn: every turn then runs as many loops.
                loops = pyperf.BenchmarkSuite.load(str(path)).get_benchmarks()[0].get_loops()
                command += ["--loops", str(loops)]
            print(f"round {r + 1}/{args.rounds} {bench} {name}", flush=True)
            subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, check=True)
    return files


def compare(files: dict[str, Path]) -> str:
    """``pyperf compare_to --table`` of the variants, the first as the reference."""
    out = subprocess.run(
        [sys.executable, "-m", "pyperf", "compare_to", "--table", "--table-format", "rest"]
        + [str(p) for p in files.values()],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def extract(rev: str, into: Path) -> Path:
    """The package as it was at ``rev``, in ``into``."""
    archive = subprocess.run(
        ["git", "archive", rev, "django_pooled_backend"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import environ

    url = pgserver.database_url("bench")
    db = environ.Env.db_url_config(url)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    run.configure_django(db, [], None)
    run.prepare_table(args.items)
    sections: list[tuple[str, str]] = []
    if "request" in args.only:
        variants = {n: (n, {"DATABASE_URL": url}) for n in args.strategy_names}
        table = compare(turns(variants, args, "request"))
        sections.append(("One request at T=1, per strategy (time per request)", table))
    if "cycle" in args.only:
        base = args.base or _merge_base()
        with tempfile.TemporaryDirectory() as tmp:
            other = extract(base, Path(tmp))
            variants = {
                f"base-{base[:10]}": ("", {"PYTHONPATH": f"{other}{os.pathsep}{ROOT}"}),
                "this-tree": ("", {"PYTHONPATH": str(ROOT)}),
            }
            files = turns(variants, args, "cycle")
            for path, where in zip(files.values(), (other, ROOT), strict=True):
                package = _metadata(path)["package"]
                assert package == str(where / "django_pooled_backend"), (path, package)
            table = compare(files)
        sections.append(("ensure_connection() + close(), this tree against the base", table))
    if "hooks" in args.only:
        files = turns({"this-tree": ("", {})}, args, "hooks")
        out = subprocess.run(
            [sys.executable, "-m", "pyperf", "show", "--quiet", *map(str, files.values())],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sections.append(
            ("What the statistics add to a borrow and a return", "::\n\n" + _indent(out))
        )
    path = args.output_dir / "latest.rst"
    path.write_text(render(sections, args, _server_version(url)))
    print(path.read_text())
    print(f"Wrote {path} (and the raw pyperf JSON files beside it)")
    return 0


def render(sections: list[tuple[str, str]], args: argparse.Namespace, server: str) -> str:
    """The reStructuredText report: how it was run, on what, then the tables."""
    info: dict[str, Any] = report.machine(server, None)
    info.pop("pgbouncer", None)
    info["command"] = "``" + " ".join(["bench/micro.py", *sys.argv[1:]]) + "``"
    info["pyperf"] = _version("pyperf")
    info["rounds x processes"] = f"{args.rounds} x {args.processes}" + (
        " (pyperf --fast)" if args.fast else ""
    )
    lines = [".. Generated by bench/micro.py: do not edit, run it again.", ""]
    lines += ["Measured on", "^" * 11, ""]
    lines += [f"- **{key}**: {value}" for key, value in info.items()]
    for title, body in sections:
        lines += ["", title, "^" * len(title), "", body.rstrip()]
    return "\n".join(lines) + "\n"


def _metadata(path: Path) -> dict[str, Any]:
    import pyperf

    benchmark = pyperf.BenchmarkSuite.load(str(path)).get_benchmarks()[0]
    metadata: dict[str, Any] = benchmark.get_metadata()
    return metadata


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" if line else "" for line in text.rstrip().splitlines())


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _merge_base() -> str:
    return subprocess.run(
        ["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def _server_version(url: str) -> str:
    import psycopg

    with psycopg.connect(url.replace("postgres://", "postgresql://", 1)) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker()
    else:
        from testproject.shutdown import exit_on_sigterm

        exit_on_sigterm()  # a kill still stops what the run started
        sys.exit(main())
