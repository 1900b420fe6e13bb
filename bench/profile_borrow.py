"""Where the time of one request goes: workload (a) at T=1, per strategy, under cProfile.

Usage::

    .venv/bin/python bench/profile_borrow.py                       # pooled vs persistent
    .venv/bin/python bench/profile_borrow.py --strategies persistent,pooled,django-pool
    .venv/bin/python bench/profile_borrow.py --requests 20000 --top 30

``--requests`` requests per strategy run under cProfile, and the functions
of the borrow/return path are listed with their time per request (cProfile
adds its own cost per call: compare the strategies with each other; the
unprofiled time per request is ``bench/micro.py``'s, measured with pyperf).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder is first on sys.path, where its modules
# would shadow others (a "profile" here would be imported by cProfile).
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run, strategies  # noqa: E402
from testproject import pgserver  # noqa: E402

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
    ("django_pooled_backend/handoff.py", "take", None),
    ("django_pooled_backend/reset.py", "check_lent", None),
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
    ("django_pooled_backend/reset.py", "start_return", None),
    ("django_pooled_backend/handoff.py", "give", None),
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
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    args = parser.parse_args(argv)
    if args.items < 1000:
        parser.error(f"--items {args.items}: at least 1000 (the requests cycle over 1000 rows)")
    return args


def _in_thread(fn: object) -> None:
    thread = threading.Thread(target=fn)  # type: ignore[arg-type]
    thread.start()
    thread.join()


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

    db = environ.Env.db_url_config(pgserver.database_url("bench"))
    chosen = [strategies.BY_NAME[n] for n in args.strategies.split(",")]
    if strategies.REFERENCE not in [s.name for s in chosen]:
        chosen.insert(0, strategies.BY_NAME[strategies.REFERENCE])
    run.configure_django(db, chosen, None)
    run.prepare_table(args.items)

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
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()  # a kill still stops what the run started
    sys.exit(main())
