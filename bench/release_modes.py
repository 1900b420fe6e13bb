"""Release modes side by side: persistent connections, request- and transaction-scoped release.

One command, from the repository root (after ``bash .ci/setup-venv test``)::

    .venv/bin/python bench/release_modes.py             # 5 repetitions, about 6 minutes
    .venv/bin/python bench/release_modes.py --reps 1 --seconds 1 --warmup 0.5   # a smoke run

Three strategies, each a ``DATABASES`` alias on the same database:

* ``persistent``: Django's stock ENGINE with ``CONN_MAX_AGE = None``, one
  server connection per thread, kept (the reference);
* ``request``: this backend, ``max_size`` 8, ``release = "request"``;
* ``transaction``: this backend, ``max_size`` 8, ``release = "transaction"``.

Workloads (a request is what Django's WSGI handler does around a view:
``request_started``, the view, ``request_finished``):

* ``io``: I/O-heavy, get by primary key, 20 ms of waiting on something
  that is not the database, get again; at T=64 threads;
* ``io100``: the same with 100 ms of waiting, at T=64: 64 threads of one
  process then need less than one CPU core, where ``io`` needs more than
  one on a small machine (and so measures the interpreter's lock more
  than waiting);
* ``read``: database-bound, a get by primary key; at T=1 and T=4;
* ``write``: database-bound, a get, then an update in ``atomic()``; at T=1
  and T=4.

Each repetition runs every cell (workload, T) with the strategies in a
shuffled order, back to back, so that the ratios compare runs made seconds
apart on a shared machine; the report gives medians over repetitions of
the throughput and of the per-repetition ratios, and the peak number of
server connections each strategy had (sampled from ``pg_stat_activity``).
Every cell starts from a fresh pool of ``--min-size`` connections.

Then, for the database-bound workloads, a paired measurement at T=1: one
thread sends rounds of 20 requests per strategy, strategies alternating
(rotating the order), and the report gives the medians over rounds of the
time per request, wall and CPU (``time.thread_time()``, syscalls included:
what the client side costs, much less sensitive to other load than
throughput is), and of the per-round ratios to request-scoped release.

The server is ``DATABASE_URL`` if set, else the embedded PostgreSQL of
``testproject.pgserver`` (started here, stopped at exit).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Run as a script, this folder comes first on sys.path: put the root there.
if sys.path[0] == str(ROOT / "bench"):
    sys.path[0] = str(ROOT)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

STRATEGIES = ("persistent", "request", "transaction")
CELLS = (("io", 64), ("io100", 64), ("read", 1), ("read", 4), ("write", 1), ("write", 4))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/release_modes.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    parser.add_argument("--max-size", type=int, default=8, help="pool max_size (default 8)")
    parser.add_argument("--min-size", type=int, default=1, help="pool min_size (default 1)")
    parser.add_argument("--items", type=int, default=1000, help="rows in the table")
    parser.add_argument(
        "--cells",
        default=",".join(f"{w}:{t}" for w, t in CELLS),
        help="workload:threads pairs (default: io:64,io100:64,read:1,read:4,write:1,write:4)",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=60,
        help="rounds of the paired T=1 measurement (default 60, 0: skip)",
    )
    parser.add_argument("--seed", type=int, default=11)
    return parser.parse_args(argv)


def configure(args: argparse.Namespace) -> None:
    """Add one alias per strategy to DATABASES, then set Django up."""
    from django.conf import settings

    default = settings.DATABASES["default"]
    base = {
        key: default[key] for key in ("NAME", "USER", "PASSWORD", "HOST", "PORT") if key in default
    }
    pool = {"min_size": args.min_size, "max_size": args.max_size, "timeout": 30}
    settings.DATABASES["persistent"] = {
        **base,
        "ENGINE": "django.db.backends.postgresql",
        "CONN_MAX_AGE": None,
        "OPTIONS": {"application_name": "bench-release persistent"},
    }
    for release in ("request", "transaction"):
        settings.DATABASES[release] = {
            **base,
            "ENGINE": "django_pooled_backend",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {
                "application_name": f"bench-release {release}",
                "pool": {**pool, "release": release},
            },
        }
    import django

    django.setup()


def prepare_data(items: int) -> None:
    from django.core.management import call_command
    from django.db import connections

    from testproject.shop.models import Item

    call_command("migrate", verbosity=0, interactive=False)
    if Item.objects.count() != items:
        Item.objects.all().delete()
        Item.objects.bulk_create(Item(id=i, name=f"item {i}") for i in range(1, items + 1))
    connections.close_all()


def views() -> dict[str, Callable[[str, int], None]]:
    from django.db import transaction
    from django.db.models import F

    from testproject.shop.models import Item

    def waiting(seconds: float) -> Callable[[str, int], None]:
        def io(alias: str, pk: int) -> None:
            Item.objects.using(alias).get(pk=pk)
            time.sleep(seconds)
            Item.objects.using(alias).get(pk=pk)

        return io

    def read(alias: str, pk: int) -> None:
        Item.objects.using(alias).get(pk=pk)

    def write(alias: str, pk: int) -> None:
        Item.objects.using(alias).get(pk=pk)
        with transaction.atomic(using=alias):
            Item.objects.using(alias).filter(pk=pk).update(quantity=F("quantity") + 1)

    return {"io": waiting(0.020), "io100": waiting(0.100), "read": read, "write": write}


class BenchHandler:
    """Stands for Django's WSGIHandler as the sender of the request signals."""


def request(view: Callable[[str, int], None], alias: str, pk: int) -> None:
    from django.core.signals import request_finished, request_started

    request_started.send(sender=BenchHandler, environ={"REQUEST_METHOD": "GET"})
    try:
        view(alias, pk)
    finally:
        request_finished.send(sender=BenchHandler)


class Sampler(threading.Thread):
    """Samples the server connections of one strategy from pg_stat_activity; keeps the peak."""

    def __init__(self, dsn: str, application_name: str) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.dsn, self.application_name = dsn, application_name
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.done.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    [self.application_name],
                ).fetchone()
                self.peak = max(self.peak, row[0] if row else 0)
                self.done.wait(0.02)

    def stop(self) -> int:
        self.done.set()
        self.join(10)
        return self.peak


def run_cell(
    strategy: str,
    view: Callable[[str, int], None],
    threads: int,
    args: argparse.Namespace,
    dsn: str,
    seed: int,
) -> dict[str, Any]:
    """T threads send requests for warmup + seconds; count those completed in the window."""
    from django.db import connections

    from django_pooled_backend import registry

    registry.close_alias(strategy)  # every run starts from a fresh pool
    barrier = threading.Barrier(threads + 1)
    window: list[float] = []
    counts = [0] * threads
    completed = [0] * threads  # warm-up included
    errors: list[str] = []

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        try:
            barrier.wait()
            start, end = window
            while (now := time.perf_counter()) < end:
                try:
                    request(view, strategy, rng.randint(1, args.items))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                    continue
                completed[n] += 1
                if now >= start and time.perf_counter() <= end:
                    counts[n] += 1
        finally:
            connections[strategy].close()

    sampler = Sampler(dsn, f"bench-release {strategy}")
    sampler.start()
    workers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in workers:
        t.start()
    now = time.perf_counter()
    window.extend([now + args.warmup, now + args.warmup + args.seconds])
    barrier.wait()
    cpu = time.process_time()
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    for t in workers:
        t.join(args.warmup + args.seconds + 120)
    cpu = time.process_time() - cpu
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches
    elapsed = time.perf_counter() - now
    peak = sampler.stop()
    # Per request completed in the whole run (warm-up included), as the CPU
    # and the switches are counted over the whole run.
    done = max(1, sum(completed))
    waits = _borrow_waits(strategy)
    return {
        "rps": sum(counts) / args.seconds,
        # CPU time of this process (all its threads) per second: above about
        # 0.8, the threads queue for the interpreter's lock more than they wait.
        "cpu": cpu / elapsed,
        "cpu_us_per_request": 1e6 * cpu / done,
        # Voluntary context switches of the process: a thread blocking (on
        # the socket, the pool's queue, the interpreter's lock, a sleep).
        "switches_per_request": switches / done,
        "queued_pct": waits[0] if waits else None,
        "wait_ms": waits[1] if waits else None,
        "peak": peak,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def _borrow_waits(strategy: str) -> tuple[float, float] | None:
    """Of the pool of ``strategy``: the % of borrows that queued, and their mean wait in ms."""
    from bench.strategies import pool_waits
    from django_pooled_backend import registry

    pools = registry.pools_for_alias(strategy)
    if not pools:
        return None
    waits = pool_waits(pools[0])
    if not waits["borrows"]:
        return None
    wait = waits["wait_ms"] / waits["queued"] if waits["queued"] else 0.0
    return 100 * waits["queued"] / waits["borrows"], wait


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from testproject import pgserver

    pgserver.database_url("testproject")  # before the settings read DATABASE_URL
    configure(args)
    prepare_data(args.items)
    import psycopg
    from django.db import connections

    url = os.environ["DATABASE_URL"].replace("postgres://", "postgresql://", 1)
    dsn = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    all_views = views()
    cells = [(w, int(t)) for w, t in (c.split(":") for c in args.cells.split(","))]
    rng = random.Random(args.seed)
    results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {
        cell: {s: [] for s in STRATEGIES} for cell in cells
    }
    started = time.monotonic()
    for rep in range(args.reps):
        for workload, threads in cells:
            order = list(STRATEGIES)
            rng.shuffle(order)
            for strategy in order:
                result = run_cell(
                    strategy, all_views[workload], threads, args, dsn, seed=rep * 7 + threads
                )
                results[(workload, threads)][strategy].append(result)
                print(
                    f"rep {rep + 1}/{args.reps} {workload:5s} T={threads:<3d} {strategy:11s} "
                    f"{result['rps']:8.1f} req/s  peak {result['peak']:3d} server connections  "
                    f"client CPU {result['cpu']:.2f}  load {os.getloadavg()[0]:.1f}"
                    + (
                        f"  {result['errors']} errors: {result['first_error']}"
                        if result["errors"]
                        else ""
                    ),
                    flush=True,
                )
    connections.close_all()
    print(f"\n{args.reps} repetitions in {time.monotonic() - started:.0f} s; medians:\n")
    print(report(results, args))
    if args.paired_rounds:
        print("\nPaired, T=1, medians over rounds:\n")
        print(paired_report({w: paired(all_views[w], args) for w in ("read", "write")}))
    return 0


PAIRED_CHUNK = 20


def paired(view: Callable[[str, int], None], args: argparse.Namespace) -> dict[str, Any]:
    """Time per request at T=1, strategies alternating in one thread (see the module doc)."""
    from django.db import connections

    wall: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    cpu: dict[str, list[float]] = {s: [] for s in STRATEGIES}

    def go() -> None:
        rng = random.Random(args.seed)
        for strategy in STRATEGIES:
            for _ in range(100):  # warm up: connections open, code paths hot
                request(view, strategy, rng.randint(1, args.items))
        for r in range(args.paired_rounds):
            k = r % len(STRATEGIES)
            for strategy in STRATEGIES[k:] + STRATEGIES[:k]:
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(PAIRED_CHUNK):
                    request(view, strategy, rng.randint(1, args.items))
                cpu[strategy].append((time.thread_time() - c0) / PAIRED_CHUNK)
                wall[strategy].append((time.perf_counter() - t0) / PAIRED_CHUNK)
        for strategy in STRATEGIES:
            connections[strategy].close()

    thread = threading.Thread(target=go, name="bench-paired")
    thread.start()
    thread.join()

    def ratio(series: dict[str, list[float]], num: str) -> float:
        return statistics.median(a / b for a, b in zip(series[num], series["request"], strict=True))

    return {
        strategy: {
            "wall_us": 1e6 * statistics.median(wall[strategy]),
            "cpu_us": 1e6 * statistics.median(cpu[strategy]),
            "wall_ratio": ratio(wall, strategy),
            "cpu_ratio": ratio(cpu, strategy),
        }
        for strategy in STRATEGIES
    }


def paired_report(measured: dict[str, dict[str, Any]]) -> str:
    header = (
        "Workload",
        "Strategy",
        "wall us/request",
        "CPU us/request",
        "wall / request",
        "CPU / request",
    )
    rows = [
        (
            workload,
            strategy,
            f"{m['wall_us']:.0f}",
            f"{m['cpu_us']:.0f}",
            f"{m['wall_ratio']:.3f}",
            f"{m['cpu_ratio']:.3f}",
        )
        for workload, by_strategy in measured.items()
        for strategy, m in by_strategy.items()
    ]
    return table(header, rows)


def report(
    results: dict[tuple[str, int], dict[str, list[dict[str, Any]]]], args: argparse.Namespace
) -> str:
    """An RST table: medians of throughput and of per-repetition ratios, peak connections."""
    header = (
        "Workload",
        "T",
        "persistent req/s (conns, CPU)",
        "request req/s (conns, CPU)",
        "transaction req/s (conns, CPU)",
        "transaction / persistent",
        "transaction / request",
    )
    rows = []
    for (workload, threads), by_strategy in results.items():

        def cell(strategy: str, by_strategy: dict[str, list[dict[str, Any]]] = by_strategy) -> str:
            runs = by_strategy[strategy]
            rps = statistics.median(r["rps"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            return f"{rps:.0f} ({max(r['peak'] for r in runs)}, {cpu:.2f})"

        def ratio(
            num: str, den: str, by_strategy: dict[str, list[dict[str, Any]]] = by_strategy
        ) -> str:
            pairs = zip(by_strategy[num], by_strategy[den], strict=True)
            return f"{statistics.median(a['rps'] / b['rps'] for a, b in pairs if b['rps']):.3f}"

        rows.append(
            (
                workload,
                str(threads),
                cell("persistent"),
                cell("request"),
                cell("transaction"),
                ratio("transaction", "persistent"),
                ratio("transaction", "request"),
            )
        )
    lines = [table(header, rows)]
    lines.append(
        "\nPer request (over the whole run, warm-up included; medians): CPU µs of the "
        "benchmark process, its voluntary context switches, and for the pools the share "
        "of borrows that queued (their mean wait):\n"
    )
    detail = []
    for (workload, threads), by_strategy in results.items():
        for strategy in STRATEGIES:
            runs = by_strategy[strategy]
            queued = [r["queued_pct"] for r in runs if r.get("queued_pct") is not None]
            wait = [r["wait_ms"] for r in runs if r.get("wait_ms") is not None]
            waited = (
                f"{statistics.median(queued):.0f}% ({statistics.median(wait):.1f} ms)"
                if queued
                else "--"
            )
            detail.append(
                (
                    workload,
                    str(threads),
                    strategy,
                    f"{statistics.median(r['cpu_us_per_request'] for r in runs):.0f}",
                    f"{statistics.median(r['switches_per_request'] for r in runs):.1f}",
                    waited,
                )
            )
    lines.append(
        table(("Workload", "T", "Strategy", "CPU µs", "switches", "borrows that waited"), detail)
    )
    lines.append(
        f"\n({args.reps} repetitions x {args.seconds:g} s measured after {args.warmup:g} s of "
        f"warm-up; pools min_size {args.min_size}, max_size {args.max_size}; conns: the peak "
        "number of server connections seen in pg_stat_activity; CPU: CPU seconds of the "
        "benchmark process per second)"
    )
    return "\n".join(lines)


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """An RST simple table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(rule)
    return "\n".join(lines)


if __name__ == "__main__":
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()  # a kill still stops what the run started
    sys.exit(main())
