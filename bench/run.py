"""Benchmark every connection strategy side by side, in one process, in one command.

Usage (from the repository root, after ``bash .ci/setup-venv "test,bench"``)::

    .venv/bin/python bench/run.py                 # 5 repetitions, T = 1, 4, 16, 64
    .venv/bin/python bench/run.py --quick         # a smoke run (about a minute)
    .venv/bin/python bench/run.py --strategies persistent,pooled --threads 1,4

The server is ``DATABASE_URL`` if set, else the embedded PostgreSQL of
``testproject.pgserver`` (started here, stopped at exit).  Within each
repetition, every (workload, T) runs all strategies back to back in a
shuffled order, so that ratios to persistent connections compare runs made
seconds apart.  Results go to ``bench/results/latest.rst`` (the tables, committed)
and ``latest.json`` (every repetition of every cell, not committed).  The
one-thread micro-measurements are ``bench/micro.py``'s (pyperf).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder is first on sys.path, where its modules
# would shadow others (a "profile" here would be imported by cProfile).
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report, strategies  # noqa: E402
from testproject import pgbouncer as bouncer  # noqa: E402
from testproject import pgserver  # noqa: E402

QUICK = {
    "reps": 1,
    "seconds": 1.0,
    "warmup": 0.5,
    "threads": "1,4",
}
FULL = {
    "reps": 5,
    "seconds": 2.0,
    "warmup": 1.0,
    "threads": "1,4,16,64",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer reps, seconds and threads")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, quick 1)")
    parser.add_argument("--seconds", type=float, help="measured seconds per cell (default 2)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds per cell (default 1)")
    parser.add_argument("--threads", help="comma-separated thread counts (default 1,4,16,64)")
    parser.add_argument(
        "--strategies",
        default=",".join(s.name for s in strategies.STRATEGIES),
        help="comma-separated strategies (default: all): "
        + ", ".join(s.name for s in strategies.STRATEGIES),
    )
    parser.add_argument("--workloads", default="a,b,c", help="comma-separated: a, b, c")
    parser.add_argument(
        "--max-size",
        type=int,
        default=strategies.POOL_MAX,
        help=f"server connections of every bounded strategy (default {strategies.POOL_MAX})",
    )
    parser.add_argument("--items", type=int, default=10_000, help="rows in the table")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--output-dir", type=Path, default=ROOT / "bench" / "results", help="where to write"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="run nothing: write the reports again from a latest.json (after a report change)",
    )
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.threads = [int(t) for t in str(args.threads).split(",")]
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in strategies.BY_NAME]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose among {list(strategies.BY_NAME)}")
    if strategies.REFERENCE not in names:
        # Ratios need the reference in every repetition.
        names.insert(0, strategies.REFERENCE)
    args.strategy_list = [strategies.BY_NAME[n] for n in names]
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    return args


def configure_django(
    db: dict[str, Any],
    chosen: list[strategies.Strategy],
    port: int | None,
    max_size: int = strategies.POOL_MAX,
) -> None:
    import django
    from django.conf import settings

    databases = {
        # Used only to create and fill the table.
        "default": {**strategies.Strategy("setup", "").settings(db, None)},
        **{s.name: s.settings(db, port, max_size) for s in chosen},
    }
    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-not-secret",
        DATABASES=databases,
        INSTALLED_APPS=["testproject.shop"],
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


def prepare_table(items: int) -> None:
    from django.core.management import call_command
    from django.db import connections

    from testproject.shop.models import Item

    call_command("migrate", "shop", database="default", verbosity=0, interactive=False)
    if Item.objects.count() != items:
        with connections["default"].cursor() as cursor:
            cursor.execute("TRUNCATE shop_item, shop_order RESTART IDENTITY")
        Item.objects.bulk_create(
            [Item(name=f"item {n}", quantity=0) for n in range(1, items + 1)], batch_size=2000
        )
    with connections["default"].cursor() as cursor:
        cursor.execute("VACUUM ANALYZE shop_item")
    connections["default"].close()


def server_version(db: dict[str, Any]) -> str:
    import psycopg

    with psycopg.connect(
        host=db["HOST"],
        port=db["PORT"],
        user=db["USER"],
        password=db["PASSWORD"],
        dbname=db["NAME"],
    ) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def render(path: Path, output_dir: Path) -> int:
    """Write the Markdown and reStructuredText reports again from a JSON report."""
    import json

    from bench.workloads import WORKLOADS

    data = json.loads(path.read_text())
    present = {c["strategy"] for c in data["cells"]}
    keys = sorted({c["workload"] for c in data["cells"]})
    paths = report.write(
        output_dir,
        data["machine"],
        data["run"],
        data["cells"],
        [s.name for s in strategies.STRATEGIES if s.name in present],
        {k: WORKLOADS[k].description for k in keys},
    )
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.output_dir)
    import environ

    url = pgserver.database_url("bench")
    db = environ.Env.db_url_config(url)
    sample_dsn = (
        f"host={db['HOST']} port={db['PORT']} user={db['USER']} "
        f"password={db['PASSWORD']} dbname={db['NAME']}"
    )

    chosen = []
    for s in args.strategy_list:
        missing = strategies.missing_requirement(s)
        if missing:
            print(
                f"skipping {s.name}: module {missing!r} is not installed "
                '(pip install -e ".[bench]")'
            )
            continue
        chosen.append(s)

    pgb = None
    if any(s.via_pgbouncer for s in chosen):
        binary = bouncer.find()
        if binary is None:
            print(f"skipping the PgBouncer strategies: pgbouncer not found. {bouncer.INSTALL_HINT}")
            chosen = [s for s in chosen if not s.via_pgbouncer]
        else:
            pgb = bouncer.start(
                url,
                executable=binary,
                default_pool_size=args.max_size,
                settings={
                    # At most --max-size server connections, as the pools have.
                    "max_db_connections": str(args.max_size),
                    "min_pool_size": "0",
                    "reserve_pool_size": "0",
                    "max_client_conn": "900",
                    "ignore_startup_parameters": "extra_float_digits",
                },
            )
    try:
        return _run(args, db, chosen, pgb, sample_dsn)
    finally:
        if pgb is not None:
            pgb.stop()


def _run(
    args: argparse.Namespace,
    db: dict[str, Any],
    chosen: list[strategies.Strategy],
    pgb: bouncer.PgBouncer | None,
    sample_dsn: str,
) -> int:
    configure_django(db, chosen, pgb.port if pgb else None, args.max_size)
    prepare_table(args.items)
    from bench import workloads

    info = report.machine(server_version(db), ".".join(map(str, pgb.version)) if pgb else None)
    run_info = {
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "repetitions": args.reps,
        "seconds per cell": f"{args.seconds:g} measured after {args.warmup:g} of warm-up",
        "pool max_size": args.max_size,
    }
    print(f"Benchmark on PostgreSQL {info['postgresql']}, {info['cpu']} x{info['cores']}")
    cells: list[dict[str, Any]] = []
    started = time.monotonic()
    for rep in range(args.reps):
        rng = random.Random(args.seed * 100 + rep)
        for key in args.workload_list:
            workload = workloads.WORKLOADS[key]
            for threads in args.threads:
                order = list(chosen)
                rng.shuffle(order)
                for strategy in order:
                    cell = workloads.run_cell(
                        strategy,
                        workload,
                        threads,
                        warmup=args.warmup,
                        seconds=args.seconds,
                        items=args.items,
                        sample_dsn=sample_dsn,
                        seed=args.seed + rep,
                    )
                    cell["borrow_waits"] = strategies.borrow_waits(strategy)
                    strategies.close_pools(strategy)
                    cell["rep"] = rep
                    cells.append(cell)
                    print(
                        f"rep {rep + 1}/{args.reps} ({key}) T={threads:<3} "
                        f"{strategy.name:<21} {cell['rps']:8.0f} req/s  "
                        f"p99 {cell['p99_ms']:7.2f} ms  conns {cell['peak_server_connections']:3}  "
                        f"progressed {cell['threads_progressed']}/{threads}"
                        + (
                            f"  errors {cell['errors']}: {cell['first_error']}"
                            if cell["errors"]
                            else ""
                        ),
                        flush=True,
                    )
    run_info["duration"] = f"{time.monotonic() - started:.0f} s"
    paths = report.write(
        args.output_dir,
        info,
        run_info,
        cells,
        [s.name for s in chosen],
        {k: workloads.WORKLOADS[k].description for k in args.workload_list},
    )
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()  # a kill still stops what the run started
    sys.exit(main())
