"""Where the time of one request goes: workload (a) at T=1, per strategy.

Usage::

    .venv/bin/python bench/profile_borrow.py                       # pooled vs persistent
    .venv/bin/python bench/profile_borrow.py --strategies persistent,pooled,django-pool
    .venv/bin/python bench/profile_borrow.py --requests 20000 --rounds 5 --top 30

First, without a profiler, each strategy runs ``--requests`` requests in a
fresh thread, ``--rounds`` times in rotating order: the median time per
request and its difference to persistent connections are the overhead.
Then one round per strategy runs under cProfile, and the functions of the
borrow/return path are listed with their time per request (cProfile adds
its own cost per call: compare the strategies with each other, and trust the
unprofiled numbers for absolute costs).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder is first on sys.path, where its modules
# would shadow others (a "profile" here would be imported by cProfile).
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run, strategies  # noqa: E402

# The functions of the borrow/return path, as pstats names them.
PATH = [
    ("django/core/signals", None, "request_started/finished.send"),
    ("django/dispatch/dispatcher.py", "send", "Signal.send (all signals)"),
    ("django/db/__init__.py", "close_old_connections", "close_old_connections"),
    ("django/db/backends/base/base.py", "close_if_unusable_or_obsolete", None),
    ("django/db/backends/base/base.py", "ensure_connection", None),
    ("django/db/backends/base/base.py", "connect", None),
    ("django/db/backends/base/base.py", "check_settings", None),
    ("django_pooled_backend/base.py", "check_settings", None),
    ("django_pooled_backend/base.py", "get_connection_params", None),
    ("django_pooled_backend/base.py", "_current_pool", None),
    ("django_pooled_backend/base.py", "_pool_key", None),
    ("django_pooled_backend/registry.py", "get_pool", None),
    ("django_pooled_backend/base.py", "get_new_connection", None),
    ("django/db/backends/postgresql/base.py", "get_new_connection", None),
    ("django_pooled_backend/pool.py", "borrow", None),
    ("psycopg_pool/pool.py", "getconn", None),
    ("psycopg_pool/pool.py", "_getconn_unchecked", None),
    ("django_pooled_backend/pool.py", "_check_borrowed", None),
    ("django_pooled_backend/reset.py", "finish_reset", None),
    ("django_pooled_backend/tracking.py", "current_holder", None),
    ("django/db/backends/base/base.py", "set_autocommit", None),
    ("django/db/backends/postgresql/base.py", "_set_autocommit", None),
    ("django_pooled_backend/base.py", "init_connection_state", None),
    ("django/db/backends/base/base.py", "init_connection_state", None),
    ("django/db/backends/postgresql/base.py", "init_connection_state", None),
    ("django/db/backends/base/base.py", "close", None),
    ("django_pooled_backend/base.py", "_close", None),
    ("django/db/backends/postgresql/base.py", "_close", None),
    ("django_pooled_backend/pool.py", "give_back", None),
    ("django_pooled_backend/pool.py", "_start_reset", None),
    ("django_pooled_backend/reset.py", "send_reset", None),
    ("psycopg_pool/pool.py", "putconn", None),
    ("psycopg_pool/pool.py", "_return_connection", None),
    ("logging/__init__.py", "info", "logging.Logger.info"),
    ("logging/__init__.py", "debug", "logging.Logger.debug"),
    ("select", "select", "select.select"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/profile_borrow.py", description=__doc__)
    parser.add_argument("--strategies", default="persistent,pooled,pooled-no-reset,django-pool")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    return parser.parse_args(argv)


def _in_thread(fn: object) -> None:
    thread = threading.Thread(target=fn)  # type: ignore[arg-type]
    thread.start()
    thread.join()


def timed(alias: str, n: int) -> float:
    """Seconds per request of workload (a) over ``n`` requests, in a fresh thread."""
    from bench import workloads

    out: list[float] = []

    def go() -> None:
        from django.db import connections

        for pk in range(1, 201):
            workloads.request(workloads.view_read, alias, pk)
        t0 = time.perf_counter()
        for i in range(n):
            workloads.request(workloads.view_read, alias, 1 + i % 1000)
        out.append((time.perf_counter() - t0) / n)
        connections[alias].close()

    _in_thread(go)
    return out[0]


def profiled(alias: str, n: int) -> pstats.Stats:
    from bench import workloads

    profile = cProfile.Profile()

    def go() -> None:
        from django.db import connections

        for pk in range(1, 201):
            workloads.request(workloads.view_read, alias, pk)
        profile.enable()
        for i in range(n):
            workloads.request(workloads.view_read, alias, 1 + i % 1000)
        profile.disable()
        connections[alias].close()

    _in_thread(go)
    return pstats.Stats(profile)


def _matches(file_part: str, func: str | None, filename: str, name: str) -> bool:
    if file_part == "select":
        return filename == "~" and "select.select" in name
    return file_part in filename and (func is None or name == func)


def path_table(stats: pstats.Stats, n: int) -> list[tuple[str, float, float, float]]:
    """(name, calls per request, µs own per request, µs cumulative per request)."""
    rows = []
    entries = stats.stats  # type: ignore[attr-defined]
    for file_part, func, label in PATH:
        calls = tt = ct = 0.0
        for (filename, _line, name), (_cc, nc, t, c, _callers) in entries.items():
            if _matches(file_part, func, filename.replace("\\", "/"), name):
                calls += nc
                tt += t
                ct += c
        if calls:
            rows.append((label or f"{file_part.split('/')[-1]}:{func}", calls / n, tt, ct))
    return [(name, calls, 1e6 * tt / n, 1e6 * ct / n) for name, calls, tt, ct in rows]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import environ

    db = environ.Env.db_url_config(run.database_url())
    run.ensure_database(db)
    chosen = [strategies.BY_NAME[n] for n in args.strategies.split(",")]
    if strategies.REFERENCE not in [s.name for s in chosen]:
        chosen.insert(0, strategies.BY_NAME[strategies.REFERENCE])
    run.configure_django(db, chosen, None)
    run.prepare_table(args.items)

    print(f"== Unprofiled: {args.requests} requests of workload (a) at T=1, {args.rounds} rounds")
    per: dict[str, list[float]] = {s.name: [] for s in chosen}
    diffs: dict[str, list[float]] = {s.name: [] for s in chosen}
    for r in range(args.rounds):
        order = chosen[r % len(chosen) :] + chosen[: r % len(chosen)]
        this_round = {}
        for s in order:
            this_round[s.name] = timed(s.name, args.requests)
            strategies.close_pools(s)
        ref = this_round[strategies.REFERENCE]
        for name, value in this_round.items():
            per[name].append(value)
            diffs[name].append(value - ref)
    for s in chosen:
        print(
            f"{s.name:<20} {1e6 * statistics.median(per[s.name]):8.1f} µs/request   "
            f"{1e6 * statistics.median(diffs[s.name]):+8.1f} µs vs persistent "
            f"(per round: {', '.join(f'{1e6 * d:+.0f}' for d in diffs[s.name])})"
        )

    for s in chosen:
        stats = profiled(s.name, args.requests)
        strategies.close_pools(s)
        print(f"\n== cProfile, {s.name}: the borrow/return path, per request")
        print(f"{'function':<52} {'calls':>6} {'own µs':>8} {'cum µs':>8}")
        for name, calls, own, cum in path_table(stats, args.requests):
            print(f"{name:<52} {calls:6.2f} {own:8.2f} {cum:8.2f}")
        buffer = io.StringIO()
        stats.stream = buffer  # type: ignore[attr-defined]
        stats.sort_stats(args.sort).print_stats(args.top)
        print(f"\n== cProfile, {s.name}: top {args.top} by {args.sort}")
        text = buffer.getvalue()
        print(text[text.find("   ncalls") :])
    return 0


if __name__ == "__main__":
    sys.exit(main())
