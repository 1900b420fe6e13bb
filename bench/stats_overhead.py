"""What the pool statistics cost on the request path.

Two measurements:

1. ``cycle``: Django's own connect/close cycle on the default alias
   (``ensure_connection()`` then ``close()``: one borrow and one return with
   its pipelined reset) against the embedded PostgreSQL server, run by the
   package *with* the statistics (this tree) and *without* them (the
   package at ``--base``, extracted with ``git archive``).  Runs alternate
   between the two, each in a fresh process, and the medians are compared.
   The publishing thread runs in the "with" processes, as in production.
2. ``hooks``: the statements the statistics add to one borrow and one
   return, timed alone with ``timeit``.

Usage::

    python bench/stats_overhead.py [--runs 10] [--cycles 5000] [--base REV]

Needs the project's test dependencies (``bash .ci/setup-venv test``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import timeit
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(cycles: int, batch: int) -> None:
    """Run in a subprocess: time ``cycles`` connect/close cycles, print JSON."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    import django

    django.setup()
    from django.db import connection

    import django_pooled_backend

    for _ in range(200):  # warm up: pool open, reset query built
        connection.ensure_connection()
        connection.close()
    per_cycle = []
    for _ in range(cycles // batch):
        started = time.perf_counter()
        for _ in range(batch):
            connection.ensure_connection()
            connection.close()
        per_cycle.append((time.perf_counter() - started) / batch * 1e6)
    print(
        json.dumps(
            {
                "package": django_pooled_backend.__file__,
                "median_us": statistics.median(per_cycle),
            }
        )
    )


def extract(rev: str, into: Path) -> Path:
    """The package as it was at ``rev``, in ``into``."""
    archive = subprocess.run(
        ["git", "archive", rev, "django_pooled_backend"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_child(pythonpath: Path, cycles: int, batch: int) -> dict[str, float | str]:
    # The variant first, then this tree for testproject.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, __file__, "--child", "--cycles", str(cycles), "--batch", str(batch)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def hooks() -> dict[str, float]:
    """Nanoseconds of the statements the statistics add to a borrow and a return."""
    setup = (
        "import time\n"
        "from django_pooled_backend.stats import PoolCounters\n"
        "class Pool: pass\n"
        "self = Pool(); self.counters = PoolCounters()\n"
    )
    borrow = "started = time.monotonic()\nself.counters.waits.append(time.monotonic() - started)\n"
    give_back = "self.counters.resets += 1\n"
    n = 1_000_000
    return {
        name: min(timeit.repeat(stmt, setup, number=n, repeat=5)) / n * 1e9
        for name, stmt in (("borrow", borrow), ("give_back", give_back))
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python bench/stats_overhead.py")
    parser.add_argument("--runs", type=int, default=10, help="runs of each variant")
    parser.add_argument("--cycles", type=int, default=5000, help="cycles per run")
    parser.add_argument("--batch", type=int, default=500, help="cycles per timed batch")
    parser.add_argument("--base", default=None, help="revision without the statistics")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.cycles, args.batch)
        return 0

    sys.path.insert(0, str(ROOT))
    from testproject import pgserver
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()  # a kill still stops the embedded server this run started
    pgserver.database_url("testproject")  # starts the embedded server if needed
    base = (
        args.base
        or subprocess.run(
            ["git", "merge-base", "HEAD", "main"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    with tempfile.TemporaryDirectory() as tmp:
        without = extract(base, Path(tmp))
        results: dict[str, list[float]] = {"without": [], "with": []}
        for run in range(args.runs):
            # Interleaved, alternating which goes first, so that drift in the
            # machine's load hits both alike.
            order = [("without", without), ("with", ROOT)]
            for name, path in order if run % 2 == 0 else reversed(order):
                out = run_child(path, args.cycles, args.batch)
                expected = str(path / "django_pooled_backend")
                assert str(out["package"]).startswith(expected), out
                results[name].append(float(out["median_us"]))
    med = {name: statistics.median(values) for name, values in results.items()}
    print(f"connect/close cycle (median of {args.runs} runs x {args.cycles} cycles):")
    for name in ("without", "with"):
        values = ", ".join(f"{v:.1f}" for v in results[name])
        best = min(results[name])
        print(f"  {name:7} statistics: median {med[name]:7.2f} us, best {best:7.2f} us")
        print(f"          runs: {values}")
    # Each run of one variant ran right next to one of the other: the
    # median of those paired differences is the least sensitive to drift.
    paired = statistics.median(
        w - wo for w, wo in zip(results["with"], results["without"], strict=True)
    )
    best = min(results["without"])
    print(
        f"  paired difference (median): {paired:+.2f} us; difference of the best runs: "
        f"{min(results['with']) - best:+.2f} us ({(min(results['with']) - best) / best:+.1%}); "
        f"base {base[:10]}"
    )
    cost = hooks()
    print("statements added, alone (best of 5 x 1,000,000):")
    print(f"  borrow: {cost['borrow']:.0f} ns, return: {cost['give_back']:.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
