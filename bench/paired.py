"""Paired benchmark: the same threads alternate between connection strategies in short windows.

One command, from the repository root (after ``bash .ci/setup-venv "test,bench"``)::

    .venv/bin/python bench/paired.py                          # light request, T=1,4,16,64
    .venv/bin/python bench/paired.py --workload io            # I/O-heavy, T=64, max_size 8
    .venv/bin/python bench/paired.py --threads 4 --rounds 5 --seconds 0.1   # a smoke run

ONE process, one ``DATABASES`` alias per variant, all on the same database
(configured here with ``settings.configure()``, not ``testproject.settings``):

* ``persistent``: Django's stock ENGINE, ``CONN_MAX_AGE = None``: one server
  connection per thread, kept (the reference);
* ``pooled``: this ENGINE, default options, ``max_size`` 10;
* ``django_pool``: Django's own pool (stock ENGINE, ``OPTIONS["pool"]``,
  ``min_size`` 1, ``max_size`` 10);
* ``transaction``: this ENGINE, ``max_size`` 8, ``release = "transaction"``
  (the variant of the I/O-heavy workload);
* ``pooled_reset_auto``, ``pooled_reset_never``: ``pooled`` with ``reset``
  ``"auto"`` or ``"never"`` (diagnostics: the cost of the default reset,
  ``"always"``, one ``DISCARD ALL`` per return).

For each T, T threads are started once and run requests in a loop for the
whole measurement.  A coordinator switches every thread to one variant at a
time: a short settling window (requests of the previous variant still in
flight finish, the new variant's pool warms), then the measured window, in
which the requests of that variant that *complete* are counted and their
latencies kept.  A round gives each variant one window, the order rotating
from round to round; a variant's ratio to ``persistent`` is computed per
round, and the report gives the median over rounds with its interquartile
range.  A burst of load from elsewhere on a shared machine then hits every
variant alike, which separate runs never guarantee.

Workloads (a request is what Django's WSGI handler does around a view:
``request_started``, which runs ``close_old_connections``, the view,
``request_finished``):

* ``light``: one indexed SELECT (``shop_item`` by primary key) through
  ``connections[alias].cursor()``;
* ``io``: the I/O-heavy request of ``bench/workloads.py`` (a get by primary
  key, 20 ms of waiting on something that is not the database, a get).

Columns: *req/s* (median over rounds), *ratio* (median of the per-round
ratios of req/s to persistent's, with the middle half of them), *CPU
µs/req* (CPU time of the whole process during the window, all threads,
divided by the requests completed in it; median over rounds) and *ΔCPU*
(median of the per-round differences to persistent's), *thread CPU* and
*Δthread* (the same for the CPU time of the requesting threads alone,
``time.thread_time()`` around each request: without the pools' own
threads and the coordinator), *p50/p99 ms*
(latency of every measured request of the variant, all rounds merged),
*per thread* (fewest-most requests completed by one thread over all measured
windows of the variant: every thread must progress), *errors*.

The server is ``DATABASE_URL`` if set, else the embedded PostgreSQL of
``testproject.pgserver`` (database ``testproject``; started here and
stopped at exit if it was not running).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# Importing django.db reads no setting: settings.configure() comes later.
from django.db import connections

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder comes first on sys.path: put the root there.
if sys.path[0] == str(ROOT / "bench"):
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

POOL_MAX = 10
IO_POOL_MAX = 8
APPLICATION_NAME = "bench-paired {}"


def variant_settings(base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``DATABASES`` entry of every variant, on the database described by ``base``."""

    def entry(name: str, engine: str, conn_max_age: int | None, **options: Any) -> dict[str, Any]:
        return {
            **base,
            "ENGINE": engine,
            "CONN_MAX_AGE": conn_max_age,
            "OPTIONS": {"application_name": APPLICATION_NAME.format(name), **options},
        }

    stock, ours = "django.db.backends.postgresql", "django_pooled_backend"
    return {
        "persistent": entry("persistent", stock, None),
        "pooled": entry("pooled", ours, 0, pool={"max_size": POOL_MAX}),
        "django_pool": entry("django_pool", stock, 0, pool={"min_size": 1, "max_size": POOL_MAX}),
        "transaction": entry(
            "transaction", ours, 0, pool={"max_size": IO_POOL_MAX, "release": "transaction"}
        ),
        # Diagnostics, not in the defaults: what the default session reset costs.
        "pooled_reset_auto": entry(
            "pooled_reset_auto", ours, 0, pool={"max_size": POOL_MAX, "reset": "auto"}
        ),
        "pooled_reset_never": entry(
            "pooled_reset_never", ours, 0, pool={"max_size": POOL_MAX, "reset": "never"}
        ),
    }


VARIANTS = (
    "persistent",
    "pooled",
    "django_pool",
    "transaction",
    "pooled_reset_auto",
    "pooled_reset_never",
)
REFERENCE = "persistent"
DEFAULTS = {
    "light": {"variants": "persistent,pooled,django_pool", "threads": "1,4,16,64"},
    "io": {"variants": "persistent,transaction", "threads": "64"},
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/paired.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workload", choices=sorted(DEFAULTS), default="light")
    parser.add_argument(
        "--threads", help="comma-separated T values (light: 1,4,16,64; io: 64)", default=None
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, from {', '.join(VARIANTS)} (light: "
        f"{DEFAULTS['light']['variants']}; io: {DEFAULTS['io']['variants']}); "
        f"{REFERENCE} is always included",
    )
    parser.add_argument("--seconds", type=float, default=0.3, help="measured window (0.3 s)")
    parser.add_argument(
        "--settle", type=float, default=0.1, help="unmeasured time after each switch (0.1 s)"
    )
    parser.add_argument("--rounds", type=int, default=30, help="rounds per T (30)")
    parser.add_argument("--items", type=int, default=1000, help="rows in shop_item (1000)")
    parser.add_argument(
        "--io-wait",
        type=float,
        default=None,
        help="seconds of waiting in the io request (bench/workloads.py's IO_WAIT, 0.02); "
        "0.1 keeps 64 threads of one process below one CPU core",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every window here")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.workload]
    args.threads = [int(t) for t in (args.threads or defaults["threads"]).split(",")]
    chosen = [v for v in (args.variants or defaults["variants"]).split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = [REFERENCE] + [v for v in dict.fromkeys(chosen) if v != REFERENCE]
    if args.rounds < 1 or args.seconds <= 0 or args.settle < 0:
        parser.error("--rounds must be at least 1, --seconds above 0, --settle at least 0")
    return args


def database_settings() -> dict[str, Any]:
    """NAME, USER, PASSWORD, HOST, PORT of ``DATABASE_URL`` (or of the embedded server)."""
    from testproject import pgserver

    url = urlsplit(pgserver.database_url("testproject"))
    return {
        "NAME": unquote(url.path.lstrip("/")),
        "USER": unquote(url.username or ""),
        "PASSWORD": unquote(url.password or ""),
        "HOST": url.hostname or "",
        "PORT": str(url.port or ""),
    }


def configure(variants: Sequence[str]) -> None:
    """Django settings of this process: one alias per variant, and ``default`` for setup."""
    from django.conf import settings

    base = database_settings()
    every = variant_settings(base)
    databases = {"default": {**base, "ENGINE": "django.db.backends.postgresql"}}
    databases.update((name, every[name]) for name in variants)
    settings.configure(
        DATABASES=databases,
        INSTALLED_APPS=["django_pooled_backend", "testproject.shop"],
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        USE_TZ=True,
        TIME_ZONE="UTC",
    )
    import django

    django.setup()


def prepare_data(items: int) -> None:
    """The shop tables, with rows 1..``items`` in ``shop_item``."""
    from django.core.management import call_command

    from testproject.shop.models import Item

    call_command("migrate", verbosity=0, interactive=False)
    if Item.objects.filter(pk__lte=items).count() != items:
        Item.objects.all().delete()
        Item.objects.bulk_create(Item(id=i, name=f"item {i}") for i in range(1, items + 1))
    connections.close_all()


def view_light(alias: str, pk: int) -> None:
    """One indexed SELECT through the wrapper's cursor."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT name FROM shop_item WHERE id = %s", [pk])
        cursor.fetchone()


def workload_view(workload: str, io_wait: float | None) -> Callable[[str, int], None]:
    """The view of ``workload``; for ``io``, with ``io_wait`` seconds of waiting if given."""
    if workload == "io":
        from bench import workloads

        if io_wait is not None:
            # view_io reads its module's IO_WAIT at every call.
            workloads.IO_WAIT = io_wait
        return workloads.view_io
    return view_light


@dataclass
class Window:
    """One variant's turn: what the threads did while it was measured."""

    variant: str
    round: int
    threads: int
    counts: list[int]
    # CPU time of each thread in its counted requests (time.thread_time()).
    thread_cpu: list[float]
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.counts)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu / self.requests if self.requests else float("nan")

    @property
    def thread_cpu_us(self) -> float:
        return 1e6 * sum(self.thread_cpu) / self.requests if self.requests else float("nan")


@dataclass(frozen=True)
class Turn:
    """What the coordinator tells the threads: the variant, its window, whether it counts."""

    variant: str
    window: Window | None
    measuring: bool


class Pairing:
    """T threads that run whichever variant the coordinator names, in alternating windows.

    ``make_op(n)`` is called in thread ``n`` once, before its first request,
    and returns the function that thread calls with a variant's name for
    each request; ``at_exit``, if given, runs in each thread at its end.
    """

    def __init__(
        self,
        threads: int,
        make_op: Callable[[int], Callable[[str], None]],
        at_exit: Callable[[], None] | None = None,
        reference: str = REFERENCE,
    ) -> None:
        self.threads, self.make_op, self.at_exit = threads, make_op, at_exit
        self.turn = Turn(reference, None, False)
        self.stop = threading.Event()
        self.first_error: str | None = None
        self.workers = [
            threading.Thread(target=self.work, args=(n,), name=f"paired-{n}", daemon=True)
            for n in range(threads)
        ]

    def work(self, n: int) -> None:
        try:
            op = self.make_op(n)
            while not self.stop.is_set():
                turn = self.turn
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    op(turn.variant)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    if turn.window is not None:
                        turn.window.errors += 1
                    if self.first_error is None:
                        self.first_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    time.sleep(0.01)
                    continue
                c1, t1 = time.thread_time(), time.perf_counter()
                # Counted if it completes while its own variant is measured.
                now = self.turn
                if now.measuring and now.window is turn.window and now.window is not None:
                    now.window.counts[n] += 1
                    now.window.thread_cpu[n] += c1 - c0
                    now.window.latencies.append(t1 - t0)
        finally:
            if self.at_exit is not None:
                self.at_exit()

    def window(self, variant: str, round_: int, seconds: float, settle: float) -> Window:
        """Switch every thread to ``variant``, let it settle, measure ``seconds``."""
        window = Window(variant, round_, self.threads, [0] * self.threads, [0.0] * self.threads)
        self.turn = Turn(variant, window, False)
        time.sleep(settle)
        cpu0, t0 = time.process_time(), time.perf_counter()
        self.turn = Turn(variant, window, True)
        time.sleep(seconds)
        self.turn = Turn(variant, window, False)
        window.seconds = time.perf_counter() - t0
        window.cpu = time.process_time() - cpu0
        return window

    def run(
        self, variants: Sequence[str], rounds: int, seconds: float, settle: float
    ) -> list[Window]:
        """One warm-up window per variant, then ``rounds`` rounds, the order rotating."""
        for t in self.workers:
            t.start()
        windows: list[Window] = []
        try:
            for variant in variants:
                self.window(variant, -1, seconds, settle)
            for r in range(rounds):
                k = r % len(variants)
                for variant in [*variants[k:], *variants[:k]]:
                    windows.append(self.window(variant, r, seconds, settle))
        finally:
            self.stop.set()
            for t in self.workers:
                t.join(60)
        return windows


def django_request_op(
    view: Callable[[str, int], None], items: int, seed: int
) -> Callable[[int], Callable[[str], None]]:
    """``make_op`` for :class:`Pairing`: a Django request of ``view`` on a random row."""
    from bench.workloads import request

    def make_op(n: int) -> Callable[[str], None]:
        rng = random.Random(seed * 1000 + n)

        def op(alias: str) -> None:
            request(view, alias, rng.randint(1, items))

        return op

    return make_op


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of an ordered sequence, nearest rank."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarise(
    windows: Sequence[Window], variants: Sequence[str], reference: str = REFERENCE
) -> dict[str, dict[str, Any]]:
    """Per variant: medians over rounds, per-round ratios and differences to ``reference``."""
    nan = float("nan")
    by_round: dict[int, dict[str, Window]] = {}
    for w in windows:
        by_round.setdefault(w.round, {})[w.variant] = w
    result: dict[str, dict[str, Any]] = {}
    for variant in variants:
        mine = [w for w in windows if w.variant == variant]
        pairs = [(r[variant], r[reference]) for r in by_round.values() if variant in r]
        ratios = [a.rps / b.rps for a, b in pairs if b.rps]
        cpu_diffs = [a.cpu_us - b.cpu_us for a, b in pairs if a.requests and b.requests]
        thread_diffs = [
            a.thread_cpu_us - b.thread_cpu_us for a, b in pairs if a.requests and b.requests
        ]
        counted = [w for w in mine if w.requests]
        latencies = sorted(x for w in mine for x in w.latencies)
        per_thread = [sum(w.counts[n] for w in mine) for n in range(mine[0].threads)]
        q1, q3 = quartiles(ratios)
        result[variant] = {
            "rps": statistics.median(w.rps for w in mine),
            "ratio": statistics.median(ratios) if ratios else nan,
            "ratio_q1": q1,
            "ratio_q3": q3,
            "cpu_us": statistics.median(w.cpu_us for w in counted) if counted else nan,
            "cpu_us_diff": statistics.median(cpu_diffs) if cpu_diffs else nan,
            "thread_cpu_us": statistics.median(w.thread_cpu_us for w in counted)
            if counted
            else nan,
            "thread_cpu_us_diff": statistics.median(thread_diffs) if thread_diffs else nan,
            "p50_ms": 1000 * percentile(latencies, 0.50),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "thread_min": min(per_thread),
            "thread_max": max(per_thread),
            "errors": sum(w.errors for w in mine),
            "rounds": len(mine),
        }
    return result


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join(lines)


def report(results: dict[int, dict[str, dict[str, Any]]], reference: str = REFERENCE) -> str:
    """The markdown table of :func:`summarise`'s results, one row per T and variant."""
    header = (
        "T",
        "variant",
        "req/s",
        "ratio [IQR]",
        "CPU µs/req",
        "ΔCPU µs",
        "thread CPU µs",
        "Δthread µs",
        "p50 ms",
        "p99 ms",
        "per thread",
        "errors",
    )
    rows = []
    for threads, by_variant in results.items():
        for variant, s in by_variant.items():
            is_reference = variant == reference
            rows.append(
                (
                    str(threads),
                    variant,
                    f"{s['rps']:.0f}",
                    "1"
                    if is_reference
                    else f"{s['ratio']:.3f} [{s['ratio_q1']:.2f}-{s['ratio_q3']:.2f}]",
                    f"{s['cpu_us']:.0f}",
                    "0" if is_reference else f"{s['cpu_us_diff']:+.1f}",
                    f"{s['thread_cpu_us']:.0f}",
                    "0" if is_reference else f"{s['thread_cpu_us_diff']:+.1f}",
                    f"{s['p50_ms']:.2f}",
                    f"{s['p99_ms']:.2f}",
                    f"{s['thread_min']}-{s['thread_max']}",
                    str(s["errors"]),
                )
            )
    return table(header, rows)


def workloads_io_wait(args: argparse.Namespace) -> float:
    from bench import workloads

    return workloads.IO_WAIT if args.io_wait is None else float(args.io_wait)


def versions() -> str:
    import platform

    import django
    import psycopg
    import psycopg_pool

    import django_pooled_backend

    return (
        f"Python {platform.python_version()}, Django {django.get_version()}, "
        f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), "
        f"psycopg_pool {psycopg_pool.__version__}, "
        f"django_pooled_backend {django_pooled_backend.__version__}, "
        f"PostgreSQL {psycopg.pq.version_pretty(psycopg.pq.version())} client"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure(args.variants)
    prepare_data(args.items)
    import os

    from django.db import connection

    view = workload_view(args.workload, args.io_wait)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    windows: dict[int, list[Window]] = {}
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        row = cursor.fetchone()
    server_version = row[0] if row else "?"
    connection.close()
    print(
        f"bench/paired.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
        f"{versions()}; server PostgreSQL {server_version}\n"
        f"workload {args.workload}"
        + (f" ({1000 * workloads_io_wait(args):g} ms waiting)" if args.workload == "io" else "")
        + f"; {args.rounds} rounds x {args.seconds:g} s measured "
        f"(+{args.settle:g} s settling) per variant",
        flush=True,
    )
    for threads in args.threads:
        started = time.monotonic()
        make_op = django_request_op(view, args.items, args.seed + threads)
        pairing = Pairing(threads, make_op, at_exit=connections.close_all)
        windows[threads] = pairing.run(args.variants, args.rounds, args.seconds, args.settle)
        results[threads] = summarise(windows[threads], args.variants)
        load = os.getloadavg()[0]
        print(
            f"T={threads}: {time.monotonic() - started:.0f} s, load {load:.1f}"
            + (f"; first error: {pairing.first_error}" if pairing.first_error else ""),
            flush=True,
        )
    print()
    print(report(results))
    stalled = [
        f"T={t} {v}" for t, by in results.items() for v, s in by.items() if s["thread_min"] == 0
    ]
    if stalled:
        print(f"\nA thread made no progress in: {', '.join(stalled)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "argv": list(sys.argv[1:] if argv is None else argv),
                    "versions": versions(),
                    "summary": {str(t): r for t, r in results.items()},
                    "windows": {
                        str(t): [
                            {
                                "variant": w.variant,
                                "round": w.round,
                                "requests": w.requests,
                                "seconds": w.seconds,
                                "cpu": w.cpu,
                                "errors": w.errors,
                            }
                            for w in ws
                        ]
                        for t, ws in windows.items()
                    },
                },
                indent=1,
            )
        )
    return 1 if stalled else 0


if __name__ == "__main__":
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()  # a kill still stops what the run started
    sys.exit(main())
