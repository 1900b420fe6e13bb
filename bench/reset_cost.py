"""What the session reset costs per request: ``reset`` "auto" against "always" (and "never").

One command, from the repository root (after ``bash .ci/setup-venv bench``)::

    .venv/bin/python bench/reset_cost.py                 # 60 rounds, about 2 minutes
    .venv/bin/python bench/reset_cost.py --rounds 3 --window 0.05   # a smoke run

Three ``DATABASES`` aliases on the same database, this backend with
request-scoped release, identical but for ``reset``: ``never`` (the floor:
no reset at all), ``auto`` (the judge finds the request clean: no reset),
``always`` (a reset after every request).

The request is light on purpose, so that the reset's share shows: Django's
``request_started``, one indexed ``SELECT`` through ``connection.cursor()``,
``request_finished`` (which gives the connection back).

Paired: one process, the same T threads for every alias.  Each round runs
a short window (``--window`` seconds) per alias, the aliases in a rotating
order, all T threads on the same alias at once; the report gives, over the
rounds, the median of requests per second and of the CPU time of the
process per request, and the medians of the per-round ratios (so that
drifts of a shared machine, slower than a round, cancel out).

Then the judge's own cost: per statement of a few ORM queries, a miss of
its verdict cache (the text lexed and judged) and a hit (a dict lookup).

The server is ``DATABASE_URL`` if set, else the embedded PostgreSQL of
``testproject.pgserver`` (started here, stopped at exit).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Run as a script, this folder comes first on sys.path: put the root there.
if sys.path[0] == str(ROOT / "bench"):
    sys.path[0] = str(ROOT)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

ALIASES = ("never", "auto", "always")
RATIOS = (("auto", "never"), ("always", "never"), ("always", "auto"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/reset_cost.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=60, help="rounds (default 60)")
    parser.add_argument(
        "--window", type=float, default=0.25, help="seconds per alias per round (default 0.25)"
    )
    parser.add_argument("--threads", default="1,4", help="thread counts (default 1,4)")
    parser.add_argument("--items", type=int, default=1000, help="rows in the table")
    parser.add_argument("--seed", type=int, default=14)
    return parser.parse_args(argv)


def configure(max_size: int) -> None:
    """Add one alias per reset mode to DATABASES, then set Django up."""
    from django.conf import settings

    default = settings.DATABASES["default"]
    base = {
        key: default[key] for key in ("NAME", "USER", "PASSWORD", "HOST", "PORT") if key in default
    }
    for reset in ALIASES:
        settings.DATABASES[reset] = {
            **base,
            "ENGINE": "django_pooled_backend",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {
                "application_name": f"bench-reset {reset}",
                "pool": {
                    "min_size": 1,
                    "max_size": max_size,
                    "timeout": 30,
                    "release": "request",
                    "reset": reset,
                },
            },
        }
    import django

    django.setup()


class BenchHandler:
    """Stands for Django's WSGIHandler as the sender of the request signals."""


ENVIRON = {"REQUEST_METHOD": "GET"}


def light_request(alias: str, pk: int) -> None:
    """``request_started``, an indexed SELECT by ``connection.cursor()``, ``request_finished``."""
    from django.core.signals import request_finished, request_started
    from django.db import connections

    request_started.send(sender=BenchHandler, environ=ENVIRON)
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT name FROM shop_item WHERE id = %s", [pk])
            cursor.fetchone()
    finally:
        request_finished.send(sender=BenchHandler)


def paired(threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of one window per alias, all ``threads`` threads on one alias at a time."""
    from django.db import connections

    start = threading.Barrier(threads + 1)
    done = threading.Barrier(threads + 1)
    current: list[str | None] = [None]  # the alias of the next window (None: stop)
    counts = [0] * threads
    errors: list[str] = []

    def worker(n: int) -> None:
        rng = random.Random(args.seed * 100 + n)
        for warm in ALIASES:  # warm up: connections open, code paths hot
            for _ in range(50):
                light_request(warm, rng.randint(1, args.items))
        done.wait()
        try:
            while True:
                start.wait()
                alias = current[0]
                if alias is None:
                    return
                end = time.perf_counter() + args.window
                count = 0
                while time.perf_counter() < end:
                    try:
                        light_request(alias, rng.randint(1, args.items))
                    except Exception as exc:  # noqa: BLE001 - reported
                        errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                        continue
                    count += 1
                counts[n] = count
                done.wait()
        finally:
            for each in ALIASES:
                connections[each].close()

    workers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in workers:
        t.start()
    done.wait()  # every thread warmed up
    rps: dict[str, list[float]] = {a: [] for a in ALIASES}
    cpu_us: dict[str, list[float]] = {a: [] for a in ALIASES}
    for r in range(args.rounds):
        k = r % len(ALIASES)
        for alias in ALIASES[k:] + ALIASES[:k]:
            current[0] = alias
            t0, c0 = time.perf_counter(), time.process_time()
            start.wait()
            done.wait()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            total = max(1, sum(counts))
            rps[alias].append(sum(counts) / elapsed)
            cpu_us[alias].append(1e6 * cpu / total)
    current[0] = None
    start.wait()
    for t in workers:
        t.join(30)
    return {
        "rps": {a: statistics.median(v) for a, v in rps.items()},
        "cpu_us": {a: statistics.median(v) for a, v in cpu_us.items()},
        "rps_ratio": {
            f"{a}/{b}": statistics.median(x / y for x, y in zip(rps[a], rps[b], strict=True))
            for a, b in RATIOS
        },
        "cpu_ratio": {
            f"{a}/{b}": statistics.median(x / y for x, y in zip(cpu_us[a], cpu_us[b], strict=True))
            for a, b in RATIOS
        },
        "errors": errors,
    }


def judge_costs() -> list[tuple[str, float, float]]:
    """Per ORM statement: its length, a cache miss (lex and judge) and a hit, in µs."""
    from django.db import connections
    from django.db.models import Count, Q

    from django_pooled_backend.session import StatementJudge
    from testproject.shop.models import Item

    connection = connections["auto"]
    judge = StatementJudge()
    with connection.cursor():
        judge.learn(connection.connection)
    connection.close()
    queries = [
        Item.objects.using("auto").filter(pk=1),
        Item.objects.using("auto").filter(Q(name__icontains="a") | Q(quantity__gte=2))[:5],
        Item.objects.using("auto")
        .annotate(n=Count("orders"))
        .filter(n__gt=0, name__startswith="x")
        .order_by("-created")[:10],
    ]
    out = []
    for qs in queries:
        sql, _ = qs.query.sql_with_params()
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            judge.judge(sql, True)
        miss = (time.perf_counter() - t0) / n
        judge.dirties(sql, True)
        n = 200_000
        t0 = time.perf_counter()
        for _ in range(n):
            judge.dirties(sql, True)
        hit = (time.perf_counter() - t0) / n
        assert not judge.dirties(sql, True), sql
        out.append((f"{len(sql)} characters", 1e6 * miss, 1e6 * hit))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from testproject import pgserver

    pgserver.database_url("testproject")  # before the settings read DATABASE_URL
    thread_counts = [int(t) for t in args.threads.split(",")]
    configure(max(thread_counts))
    from bench.release_modes import prepare_data, table

    prepare_data(args.items)
    started = time.monotonic()
    results = {}
    for threads in thread_counts:
        results[threads] = result = paired(threads, args)
        if result["errors"]:
            print(f"T={threads}: {len(result['errors'])} errors: {result['errors'][0]}")
            return 1
    print(
        f"{args.rounds} rounds x {args.window:g} s per alias in "
        f"{time.monotonic() - started:.0f} s; medians over rounds:\n"
    )
    rows = []
    for threads, result in results.items():
        for alias in ALIASES:
            rows.append(
                (
                    str(threads),
                    alias,
                    f"{result['rps'][alias]:.0f}",
                    f"{result['cpu_us'][alias]:.0f}",
                )
            )
    print(table(("T", "reset", "requests/s", "CPU us/request"), rows))
    print()
    rows = []
    for threads, result in results.items():
        for a, b in RATIOS:
            key = f"{a}/{b}"
            rows.append(
                (
                    str(threads),
                    key,
                    f"{result['rps_ratio'][key]:.3f}",
                    f"{result['cpu_ratio'][key]:.3f}",
                )
            )
    print(table(("T", "ratio", "requests/s", "CPU us/request"), rows))
    print("\nThe judge, per statement (us):\n")
    costs = [(what, f"{miss:.1f}", f"{hit:.2f}") for what, miss, hit in judge_costs()]
    print(table(("ORM query", "cache miss", "cache hit"), costs))
    return 0


if __name__ == "__main__":
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()  # a kill still stops what the run started
    sys.exit(main())
