"""What a request costs the client, in instructions: a measure the machine's noise cannot move.

Usage::

    .venv/bin/python bench/instructions.py
    .venv/bin/python bench/instructions.py --strategies persistent,pooled --requests 2000

Timings on a shared two-core machine move by tens of microseconds from one
run to the next, more than a pool adds to a request.  Instructions do not:
``valgrind --tool=callgrind`` counts those the client process executes,
the same for the same code, whatever else the machine does.  For each
strategy, workload (a) (request_started, an ORM get by primary key,
request_finished) runs in a fresh process under callgrind twice, with
``--base`` and with ``--base + --requests`` requests: the difference,
divided by ``--requests``, is the cost of one request, without start-up.

What this leaves out, on purpose or not:

* the server's work, and the time spent waiting for it (the same for every
  strategy but no pooling, which pays a connection per request);
* the kernel's work (system calls: one non-blocking ``recv()`` per borrow here);
* the cost of an instruction, which cache misses make vary: a pool's code
  run between two requests evicts some of Django's;
* time-driven background work: under callgrind a process runs about fifty
  times slower, so the statistics publisher and the housekeeping thread
  would run fifty times as often per request.  They are slowed down here
  (``POOLED_BACKEND_STATS_INTERVAL`` and the housekeeping interval set to
  an hour); ``bench/stats_overhead.py`` measures the publisher's real cost.

Needs Debian's ``valgrind``.  Each run takes 20 to 60 seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run, strategies  # noqa: E402
from testproject import pgserver  # noqa: E402

COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/instructions.py", description=__doc__)
    parser.add_argument("--strategies", default="persistent,django-pool,pooled,pooled-no-reset")
    parser.add_argument("--base", type=int, default=200, help="requests of the shorter run")
    parser.add_argument("--requests", type=int, default=1000, help="extra requests of the longer")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--child", nargs=2, metavar=("STRATEGY", "N"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(name: str, n: int) -> None:
    """Runs under callgrind: ``n`` requests of workload (a) on strategy ``name``."""
    import environ

    db = environ.Env.db_url_config(pgserver.database_url("bench"))
    run.configure_django(db, [strategies.BY_NAME[name]], None)
    from django.conf import settings

    from bench import workloads
    from django_pooled_backend import registry

    settings.POOLED_BACKEND_STATS_INTERVAL = 3600
    registry.HOUSEKEEPING_INTERVAL = 3600
    for i in range(n):
        workloads.request(workloads.view_read, name, 1 + i % 1000)


def count(name: str, n: int) -> int:
    """Instructions the whole child process executed for ``n`` requests."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            name,
            str(n),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        timeout=1800,
    )
    found = COLLECTED.search(result.stderr)
    if result.returncode != 0 or found is None:
        sys.exit(
            f"the run of {name} ({n} requests) under callgrind failed:\n{result.stderr[-2000:]}"
        )
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind).")
    import environ

    db = environ.Env.db_url_config(pgserver.database_url("bench"))
    names = args.strategies.split(",")
    for name in names:
        if name not in strategies.BY_NAME:
            sys.exit(f"unknown strategy {name!r}: choose from {', '.join(strategies.BY_NAME)}")
    if strategies.REFERENCE not in names:
        names.insert(0, strategies.REFERENCE)
    run.configure_django(db, [strategies.BY_NAME[n] for n in names], None)
    run.prepare_table(args.items)

    per_request: dict[str, float] = {}
    for name in names:
        short = count(name, args.base)
        long = count(name, args.base + args.requests)
        per_request[name] = (long - short) / args.requests
        print(f"{name:<20} {per_request[name]:12,.0f} instructions per request", flush=True)
    reference = per_request[strategies.REFERENCE]
    print(f"\nworkload (a), {args.requests} requests; against {strategies.REFERENCE}:")
    for name in names:
        extra = per_request[name] - reference
        print(
            f"{name:<20} {extra:+12,.0f} instructions per request "
            f"({per_request[name] / reference:.3f}x)"
        )
    return 0


if __name__ == "__main__":
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()  # a kill still stops what the run started
    sys.exit(main())
