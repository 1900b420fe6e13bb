"""The raw hand-off: T threads sharing 10 psycopg connections, against T dedicated ones.

One command, from the repository root (after ``bash .ci/setup-venv "test,bench"``)::

    .venv/bin/python bench/handoff.py                     # T=16,64, 30 rounds: about 2 minutes
    .venv/bin/python bench/handoff.py --threads 4 --rounds 3 --seconds 0.1   # a smoke run

No Django: raw psycopg 3, autocommit connections, one indexed SELECT
(``bench_handoff`` by primary key) per borrow.  Variants, all in ONE process,
alternating in short windows as in ``bench/paired.py`` (same coordinator,
same columns):

* ``dedicated``: every thread has a connection of its own (the reference);
* ``psycopg_pool``: ``psycopg_pool.ConnectionPool`` (``min_size`` =
  ``max_size`` = 10), ``getconn()`` / ``putconn()``;
* ``simplequeue``: ``queue.SimpleQueue`` holding the 10 connections: a
  returned connection goes to whoever calls ``get()`` first, the returning
  thread included (barging, unfair);
* ``fifo``: a minimal strict FIFO: idle connections in a list, waiters in a
  deque, one reusable ``_thread.allocate_lock`` per waiting thread, the
  returned connection handed to the oldest waiter directly (no Condition);
* ``handoff``: the project's hand-off, ``django_pooled_backend.handoff.Handoff``
  (skipped, with a message, while it does not exist).

Every shared variant has 10 connections of its own, so that a connection
still out when the windows switch goes back where it came from.  *per
thread* shows the fairness: the fewest and the most borrows one thread
completed over all the variant's measured windows.

The server is ``DATABASE_URL`` if set, else the embedded PostgreSQL of
``testproject.pgserver`` (database ``testproject``).
"""

from __future__ import annotations

import _thread
import argparse
import importlib
import json
import os
import queue
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg

ROOT = Path(__file__).resolve().parent.parent
if sys.path[0] == str(ROOT / "bench"):
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.paired import Pairing, Window, report, summarise  # noqa: E402

SHARED = 10
REFERENCE = "dedicated"
VARIANTS = ("dedicated", "psycopg_pool", "simplequeue", "fifo", "handoff")
QUERY = "SELECT name FROM bench_handoff WHERE id = %s"


class Bag(Protocol):
    """What a shared variant offers the threads: borrow a connection, give it back."""

    def get(self) -> psycopg.Connection[Any]: ...

    def put(self, conn: psycopg.Connection[Any]) -> None: ...


class QueueBag:
    """``queue.SimpleQueue``: whoever calls ``get()`` first wins (barging)."""

    def __init__(self, conns: Sequence[psycopg.Connection[Any]]) -> None:
        self.queue: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        for conn in conns:
            self.queue.put(conn)

    def get(self) -> psycopg.Connection[Any]:
        return self.queue.get()

    def put(self, conn: psycopg.Connection[Any]) -> None:
        self.queue.put(conn)


class _Waiter:
    __slots__ = ("item", "lock")

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self.item: psycopg.Connection[Any] | None = None


class FifoBag:
    """Strict FIFO: a returned connection goes to the oldest waiter, never to a newcomer.

    Each thread reuses one C lock of its own: held while it waits, released
    by the thread that hands it a connection.
    """

    def __init__(self, conns: Sequence[psycopg.Connection[Any]]) -> None:
        self.mutex = _thread.allocate_lock()
        self.idle = list(conns)
        self.waiters: deque[_Waiter] = deque()
        self.local = threading.local()

    def get(self) -> psycopg.Connection[Any]:
        with self.mutex:
            # An idle connection means nobody waits: put() serves waiters first.
            if self.idle:
                return self.idle.pop()
            waiter: _Waiter | None = getattr(self.local, "waiter", None)
            if waiter is None:
                waiter = self.local.waiter = _Waiter()
            waiter.lock.acquire()
            self.waiters.append(waiter)
        waiter.lock.acquire()  # until put() releases it, with waiter.item set
        waiter.lock.release()
        item, waiter.item = waiter.item, None
        assert item is not None
        return item

    def put(self, conn: psycopg.Connection[Any]) -> None:
        with self.mutex:
            if not self.waiters:
                self.idle.append(conn)
                return
            waiter = self.waiters.popleft()
        waiter.item = conn
        waiter.lock.release()


class PsycopgPoolBag:
    """``psycopg_pool.ConnectionPool.getconn()`` / ``putconn()``."""

    def __init__(self, conninfo: str) -> None:
        from psycopg_pool import ConnectionPool

        self.pool: ConnectionPool[Any] = ConnectionPool(
            conninfo,
            min_size=SHARED,
            max_size=SHARED,
            kwargs={"autocommit": True, "application_name": "bench-handoff psycopg_pool"},
            open=True,
        )
        self.pool.wait(30)

    def get(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self.pool.getconn()
        return conn

    def put(self, conn: psycopg.Connection[Any]) -> None:
        self.pool.putconn(conn)

    def close(self) -> None:
        self.pool.close()


def project_handoff(conns: Sequence[psycopg.Connection[Any]]) -> Bag | str:
    """A bag on the project's ``Handoff`` holding ``conns``, or why there is none.

    The one place that knows ``Handoff``'s interface: ``Handoff(capacity)``;
    ``take(timeout)`` returns an idle item, or ``None``, a permit to fetch
    one while fewer than ``capacity`` are out; ``give(item)`` hands an item
    to the longest waiting borrower, or keeps it idle.  The bag takes every
    permit first, then gives every connection: all of them are out of the
    source, so that ``take()`` always returns a connection.
    """
    try:
        module = importlib.import_module("django_pooled_backend.handoff")
    except ImportError as exc:
        return f"django_pooled_backend.handoff is not importable ({exc})"
    handoff_class = getattr(module, "Handoff", None)
    if handoff_class is None:
        return "django_pooled_backend.handoff has no Handoff class"
    handoff = handoff_class(len(conns))
    if any(handoff.take(None) is not None for _ in conns):
        return "Handoff.take() lent an item before any was given: its interface changed"
    for conn in conns:
        handoff.give(conn)

    class HandoffBag:
        def get(self) -> psycopg.Connection[Any]:
            conn: psycopg.Connection[Any] = handoff.take(None)
            return conn

        def put(self, conn: psycopg.Connection[Any]) -> None:
            handoff.give(conn)

    return HandoffBag()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/handoff.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", default="16,64", help="comma-separated T values (16,64)")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}; {REFERENCE} is always included",
    )
    parser.add_argument("--seconds", type=float, default=0.3, help="measured window (0.3 s)")
    parser.add_argument(
        "--settle", type=float, default=0.1, help="unmeasured time after each switch (0.1 s)"
    )
    parser.add_argument("--rounds", type=int, default=30, help="rounds per T (30)")
    parser.add_argument("--items", type=int, default=1000, help="rows in bench_handoff (1000)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = [REFERENCE] + [v for v in dict.fromkeys(chosen) if v != REFERENCE]
    return args


def conninfo() -> str:
    from testproject import pgserver

    return pgserver.database_url("testproject")


def prepare_data(info: str, items: int) -> str:
    """The table, with rows 1..``items``; returns the server's version."""
    with psycopg.connect(info, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_handoff (id integer PRIMARY KEY, name text)")
        row = conn.execute("SELECT count(*) FROM bench_handoff WHERE id <= %s", [items]).fetchone()
        if not row or row[0] != items:
            conn.execute("TRUNCATE bench_handoff")
            conn.execute(
                "INSERT INTO bench_handoff SELECT i, 'item ' || i FROM generate_series(1, %s) i",
                [items],
            )
        conn.execute("ANALYZE bench_handoff")
        version = conn.execute("SHOW server_version").fetchone()
    return str(version[0]) if version else "?"


def connect(info: str, name: str) -> psycopg.Connection[Any]:
    return psycopg.connect(info, autocommit=True, application_name=f"bench-handoff {name}")


def run_threads(
    info: str, threads: int, args: argparse.Namespace
) -> tuple[list[str], list[Window], str | None]:
    """Every variant's connections, then the alternating windows at ``threads``.

    Returns the variants run, their windows, and the first error, if any.
    """
    bags: dict[str, Bag] = {}
    owned: list[psycopg.Connection[Any]] = []
    pool_bag: PsycopgPoolBag | None = None
    variants = list(args.variants)
    for name in variants[1:]:
        if name == "psycopg_pool":
            bags[name] = pool_bag = PsycopgPoolBag(info)
            continue
        conns = [connect(info, name) for _ in range(SHARED)]
        owned += conns
        if name == "simplequeue":
            bags[name] = QueueBag(conns)
        elif name == "fifo":
            bags[name] = FifoBag(conns)
        else:
            made = project_handoff(conns)
            if isinstance(made, str):
                print(f"handoff skipped: {made}", flush=True)
                variants.remove(name)
            else:
                bags[name] = made
    dedicated = [connect(info, REFERENCE) for _ in range(threads)]
    owned += dedicated

    def make_op(n: int) -> Callable[[str], None]:
        rng = random.Random(args.seed * 1000 + n)
        mine = dedicated[n]
        items = args.items

        def op(variant: str) -> None:
            pk = rng.randint(1, items)
            if variant == REFERENCE:
                mine.execute(QUERY, [pk]).fetchone()
                return
            bag = bags[variant]
            conn = bag.get()
            try:
                conn.execute(QUERY, [pk]).fetchone()
            finally:
                bag.put(conn)

        return op

    pairing = Pairing(threads, make_op, reference=REFERENCE)
    try:
        windows = pairing.run(variants, args.rounds, args.seconds, args.settle)
    finally:
        if pool_bag is not None:
            pool_bag.close()
        for conn in owned:
            conn.close()
    return variants, windows, pairing.first_error


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = conninfo()
    server_version = prepare_data(info, args.items)
    import platform

    import psycopg_pool

    print(
        f"bench/handoff.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}, psycopg {psycopg.__version__} "
        f"({psycopg.pq.__impl__}), psycopg_pool {psycopg_pool.__version__}; "
        f"server PostgreSQL {server_version}\n"
        f"{SHARED} shared connections; {args.rounds} rounds x {args.seconds:g} s measured "
        f"(+{args.settle:g} s settling) per variant",
        flush=True,
    )
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for threads in args.threads:
        started = time.monotonic()
        variants, windows, first_error = run_threads(info, threads, args)
        results[threads] = summarise(windows, variants, REFERENCE)
        print(
            f"T={threads}: {time.monotonic() - started:.0f} s, load {os.getloadavg()[0]:.1f}"
            + (f"; first error: {first_error}" if first_error else ""),
            flush=True,
        )
    print()
    print(report(results, REFERENCE))
    if args.json:
        args.json.write_text(json.dumps({str(t): r for t, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()
    sys.exit(main())
