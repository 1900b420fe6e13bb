"""End to end: the testproject's read view under gunicorn, driven by wrk, per connection strategy.

One command, from the repository root (after ``bash .ci/setup-venv "test,bench"``
and ``apt-get install wrk pgbouncer``)::

    .venv/bin/python bench/wrk.py                     # threads 4 and 8, max_size 4: ~4 minutes
    .venv/bin/python bench/wrk.py --threads 4 --rounds 1 --seconds 1   # a smoke run

Variants, each a gunicorn (``--workers`` gthread workers of T threads) serving
the testproject on a database of its own (same schema, same rows), all
started before the first measurement and kept running:

* ``persistent``: Django's stock ENGINE, ``CONN_MAX_AGE = None``
  (``TESTPROJECT_ENGINE``, ``?conn_max_age=None`` in ``DATABASE_URL``): one
  server connection per gunicorn thread, kept (the reference);
* ``pooled``: this ENGINE (the testproject's default settings), ``min_size``
  1, ``max_size`` ``--max-size`` per worker;
* ``django_pool``: Django's own pool (``TESTPROJECT_DJANGO_POOL=1``), same sizes;
* ``pgbouncer``: Django's stock ENGINE, ``CONN_MAX_AGE = None``, through
  PgBouncer in transaction mode with a pool of ``--workers`` x
  ``--max-size`` server connections (the same server budget as the pools).

For each T, a round runs wrk (``--connections`` keep-alive connections,
one wrk thread, each request ``GET /items/<random pk>/``) for ``--seconds``
against each variant in turn, the order rotating from round to round; the
report gives per variant the median over rounds of requests/s and of wrk's
p99 latency, and the median of the per-round ratios to ``persistent``
(with their interquartile range).  T at most ``--max-size`` and T above it are the two
cases of issue 16.

Gunicorn is started with ``tests/live.py``'s :func:`serve` (which creates
and drops each variant's database); PgBouncer with ``testproject/pgbouncer.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if sys.path[0] == str(ROOT / "bench"):
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("persistent", "pooled", "django_pool", "pgbouncer")
REFERENCE = "persistent"
STOCK = "django.db.backends.postgresql"

# wrk's Lua: a random item per request; at the end, one JSON line with the
# counts and the latency percentiles (µs) that the report needs.
LUA = """
math.randomseed(%(seed)d)
request = function()
    return wrk.format("GET", "/items/" .. math.random(1, %(items)d) .. "/")
end
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '\\nJSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, ' ..
        '"max_us": %%d, "errors": %%d, "non_2xx": %%d}\\n',
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/wrk.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", default="4,8", help="gunicorn threads per worker (4,8)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--max-size", type=int, default=4, help="pool max_size per worker (4)")
    parser.add_argument(
        "--connections",
        type=int,
        default=0,
        help="wrk connections (default: 2 x workers x threads)",
    )
    parser.add_argument("--seconds", type=int, default=3, help="seconds per wrk run (3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per T (5)")
    parser.add_argument("--items", type=int, default=1000, help="rows in shop_item (1000)")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}; {REFERENCE} is always included",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every run here")
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = [REFERENCE] + [v for v in dict.fromkeys(chosen) if v != REFERENCE]
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed: apt-get install wrk (.ci/run does)")
    return args


def variant_env(variant: str, url: str, bouncer_url: str | None) -> dict[str, str]:
    """What gunicorn's environment adds for ``variant`` (``url``: its database)."""
    if variant == "pooled":
        return {}
    if variant == "django_pool":
        return {"TESTPROJECT_ENGINE": STOCK, "TESTPROJECT_DJANGO_POOL": "1"}
    if variant == "pgbouncer":
        assert bouncer_url is not None
        url = bouncer_url
    return {"TESTPROJECT_ENGINE": STOCK, "DATABASE_URL": f"{url}?conn_max_age=None"}


def seed(url: str, items: int) -> None:
    import psycopg

    with psycopg.connect(url.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO shop_item (id, name, quantity, created) "
            "SELECT i, 'item ' || i, 0, now() FROM generate_series(1, %s) i",
            [items],
        )


@dataclass(frozen=True)
class Site:
    """A variant's gunicorn: where it listens; whose CPU it uses (gunicorn, PgBouncer)."""

    port: int
    pids: tuple[int, ...]


@contextlib.contextmanager
def sites(
    variants: Sequence[str], threads: int, args: argparse.Namespace, workdir: Path
) -> Iterator[dict[str, Site]]:
    """Every variant's gunicorn (and PgBouncer), serving; yields variant -> its site."""
    from testproject import pgbouncer

    # Imported by name: the test helpers are not type-checked with bench/.
    live: Any = importlib.import_module("tests.live")
    database_url, serve = live.database_url, live.serve
    with contextlib.ExitStack() as stack:
        bouncer = None
        if "pgbouncer" in variants:
            if pgbouncer.find() is None:
                raise SystemExit(f"pgbouncer is not installed. {pgbouncer.INSTALL_HINT}")
            bouncer = pgbouncer.start(
                os.environ["DATABASE_URL"],
                pool_mode="transaction",
                default_pool_size=args.workers * args.max_size,
            )
            stack.callback(bouncer.stop)
        running = {}
        for variant in variants:
            db = f"dpb_wrk_{variant}"
            extra = variant_env(variant, database_url(db), bouncer.url(db) if bouncer else None)
            server = stack.enter_context(
                serve(
                    db,
                    workdir / variant,
                    max_size=args.max_size,
                    workers=args.workers,
                    threads=threads,
                    interval=1.0,
                    migrate=True,
                    extra_env=extra,
                )
            )
            seed(database_url(db), args.items)
            pids: tuple[int, ...] = (server.master.pid,)
            if variant == "pgbouncer" and bouncer is not None:
                pids += (bouncer.process.pid,)
            running[variant] = Site(server.port, pids)
        yield running


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) used so far by processes ``pids`` and their children."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may contain spaces: split after it.
        fields = text[text.rindex(")") + 2 :].split()
        if int(entry) in pids or int(fields[1]) in pids:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_wrk(site: Site, seconds: int, connections: int, script: Path) -> dict[str, Any]:
    """One wrk run; its JSON line, with requests/s and the site's CPU per request."""
    cpu = tree_cpu(site.pids)
    done = subprocess.run(
        [
            *("wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s"),
            *("--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{site.port}"),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    result: dict[str, Any] = json.loads(line[5:])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    # Requests still in flight when wrk stops are few against thousands.
    result["cpu_us"] = 1e6 * (tree_cpu(site.pids) - cpu) / max(1, result["requests"])
    return result


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per variant: medians over rounds, and the per-round ratios to the reference."""
    from bench.paired import quartiles

    reference = runs[REFERENCE]
    out = {}
    for variant, mine in runs.items():
        ratios = [a["rps"] / b["rps"] for a, b in zip(mine, reference, strict=True) if b["rps"]]
        p99_ratios = [
            a["p99_us"] / b["p99_us"] for a, b in zip(mine, reference, strict=True) if b["p99_us"]
        ]
        cpu_diffs = [a["cpu_us"] - b["cpu_us"] for a, b in zip(mine, reference, strict=True)]
        out[variant] = {
            "rps": statistics.median(r["rps"] for r in mine),
            "cpu_us": statistics.median(r["cpu_us"] for r in mine),
            "cpu_us_diff": statistics.median(cpu_diffs),
            "ratio": statistics.median(ratios),
            "ratio_q1": quartiles(ratios)[0],
            "ratio_q3": quartiles(ratios)[1],
            "p50_ms": statistics.median(r["p50_us"] for r in mine) / 1000,
            "p99_ms": statistics.median(r["p99_us"] for r in mine) / 1000,
            "p99_ratio": statistics.median(p99_ratios),
            "errors": sum(r["errors"] + r["non_2xx"] for r in mine),
        }
    return out


def report(results: dict[int, dict[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    from bench.paired import table

    header = (
        "T",
        "variant",
        "req/s",
        "ratio [IQR]",
        "CPU µs/req",
        "ΔCPU µs",
        "p50 ms",
        "p99 ms",
        "p99 ratio",
        "errors",
    )
    rows = []
    for threads, by_variant in results.items():
        for variant, s in by_variant.items():
            rows.append(
                (
                    f"{threads} ({'>' if threads > args.max_size else '<='} max_size)",
                    variant,
                    f"{s['rps']:.0f}",
                    "1"
                    if variant == REFERENCE
                    else f"{s['ratio']:.3f} [{s['ratio_q1']:.2f}-{s['ratio_q3']:.2f}]",
                    f"{s['cpu_us']:.0f}",
                    "0" if variant == REFERENCE else f"{s['cpu_us_diff']:+.0f}",
                    f"{s['p50_ms']:.2f}",
                    f"{s['p99_ms']:.2f}",
                    "1" if variant == REFERENCE else f"{s['p99_ratio']:.2f}",
                    str(s["errors"]),
                )
            )
    return table(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from testproject import pgserver

    pgserver.database_url("testproject")  # DATABASE_URL, or the embedded server
    import platform

    import django
    import psycopg

    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    print(
        f"bench/wrk.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}, Django {django.get_version()}, "
        f"psycopg {psycopg.__version__}, gunicorn {importlib.metadata.version('gunicorn')}, "
        f"{' '.join(wrk_version.split()[:2])}\n"
        f"{args.workers} gthread workers, pool max_size {args.max_size} per worker; "
        f"{args.rounds} rounds x {args.seconds} s per variant",
        flush=True,
    )
    results: dict[int, dict[str, dict[str, Any]]] = {}
    every: dict[int, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        workdir = Path(tmp)
        for threads in args.threads:
            connections = args.connections or 2 * args.workers * threads
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
            with sites(args.variants, threads, args, workdir / f"t{threads}") as running:
                script = workdir / f"t{threads}.lua"
                script.write_text(LUA % {"seed": threads, "items": args.items})
                for variant in args.variants:  # warm up: every thread's connection, the pools
                    run_wrk(running[variant], 1, connections, script)
                for r in range(args.rounds):
                    k = r % len(args.variants)
                    for variant in [*args.variants[k:], *args.variants[:k]]:
                        run = run_wrk(running[variant], args.seconds, connections, script)
                        runs[variant].append(run)
                        print(
                            f"T={threads} round {r + 1}/{args.rounds} {variant:12s} "
                            f"{run['rps']:7.0f} req/s  p99 {run['p99_us'] / 1000:6.2f} ms  "
                            f"CPU {run['cpu_us']:4.0f} µs/request  "
                            f"load {os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
            results[threads] = summarise(runs)
            every[threads] = runs
    print(f"\n(wrk: 1 thread, {args.connections or '2 x workers x T'} connections)\n")
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps({"summary": results, "runs": every}, indent=1))
    return 0


if __name__ == "__main__":
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()
    sys.exit(main())
