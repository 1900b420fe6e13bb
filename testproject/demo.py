"""The README's demo: the testproject under gunicorn, under load, and what the pools did.

As soon as the site answers, it prints the address of the live pool page of
the Django admin and a throwaway staff login; the load runs ``--seconds``
(8 by default), then the summary is printed.  The site then stays up, under
the same load, so that the page can be looked at: until Ctrl-C when stdin is
a terminal, for ``--stay SECONDS`` if given, and not at all otherwise (CI,
tests: ``bash .ci/demo`` ends by itself).

Run it with ``bash .ci/demo`` (which sets up the virtualenv first) or, in
an environment that has the project installed, ``python -m testproject.demo``.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time

import psycopg

from testproject import launch, pgserver


def manage(*args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=launch.ROOT, check=True)


def poolstats(*args: str) -> str:
    """``manage.py poolstats`` in a process of its own, as an operator would run it."""
    result = launch.manage("poolstats", *args, timeout=60)
    return result.stdout + result.stderr


class Load:
    """Client threads sending a mix of reads, writes and slow requests."""

    def __init__(
        self, port: int, clients: int, seconds: float, items: int, *, record: bool = True
    ) -> None:
        self.port, self.clients, self.seconds, self.items = port, clients, seconds, items
        # A load that runs until Ctrl-C does not keep every latency.
        self.record = record
        self.latencies: list[float] = []
        # Keeps the clients going past ``seconds`` until it is set.
        self.hold = threading.Event()
        self.hold.set()
        # Ends the clients at once (Ctrl-C, SIGTERM): gunicorn then stops
        # without requests to finish.
        self.stop = threading.Event()
        self.elapsed = 0.0
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()

    def client(self, n: int) -> None:
        rng = random.Random(n)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        deadline = time.monotonic() + self.seconds
        sent = 0
        while not self.stop.is_set() and (time.monotonic() < deadline or not self.hold.is_set()):
            sent += 1
            if sent % 20 == 0:
                # A keep-alive connection stays with the worker that accepted
                # it: reconnect now and then, as browsers do, so that every
                # worker gets its share.
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            pick = rng.random()
            pk = rng.randint(1, self.items)
            if pick < 0.80:
                path = f"/items/{pk}/"
            elif pick < 0.95:
                path = f"/items/{pk}/order/"
            else:
                path = "/slow/?ms=100"
            started = time.perf_counter()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
                key = f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as exc:
                ok, key = False, type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            elapsed = time.perf_counter() - started
            with self.lock:
                if ok:
                    if self.record:
                        self.latencies.append(elapsed)
                else:
                    self.errors[key] = self.errors.get(key, 0) + 1
        conn.close()

    def run(self) -> None:
        started = time.monotonic()
        # Daemons: a demo stopped by Ctrl-C or SIGTERM does not wait for them.
        threads = [
            threading.Thread(target=self.client, args=(n,), daemon=True)
            for n in range(self.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.elapsed = time.monotonic() - started


def server_connections(dsn: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT application_name, state, count(*) FROM pg_stat_activity "
            "WHERE application_name LIKE 'django_pooled_backend %%' "
            "GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()


def indent(text: str) -> str:
    return "\n".join(f"   {line}" if line else "" for line in text.rstrip().splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testproject.demo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="how long the load runs (default 8)"
    )
    parser.add_argument(
        "--stay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="after the summary, keep the site up under load for SECONDS (default: until "
        "Ctrl-C when stdin is a terminal, 0 otherwise)",
    )
    parser.add_argument("--max-size", type=int, default=4)
    args = parser.parse_args(argv)
    if args.stay is None:
        args.stay = math.inf if sys.stdin.isatty() else 0.0
    # Each line as it is printed, also into a pipe (tee, a test reading it).
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    password = secrets.token_urlsafe(9)

    url = pgserver.database_url("testproject")
    dsn = psycopg.conninfo.make_conninfo(url.replace("postgres://", "postgresql://", 1))
    host = psycopg.conninfo.conninfo_to_dict(dsn).get("host")
    print(f"== PostgreSQL on {host} (embedded unless DATABASE_URL is set)")
    print("== migrate and seed")
    manage("migrate", "--noinput", "-v", "0")
    # "--": a password may start with "-" (token_urlsafe draws from "-" and "_" too).
    manage("ensure_user", "--staff", "--", "demo", password)
    items = 100
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE shop_order, shop_item RESTART IDENTITY")
        conn.execute(
            "INSERT INTO shop_item (name, quantity, created) "
            "SELECT 'item ' || i, 0, now() FROM generate_series(1, %s) i",
            [items],
        )

    env = {**os.environ, "POOL_MAX_SIZE": str(args.max_size), "POOL_MIN_SIZE": "1"}
    gunicorn = launch.start_site(env, workers=args.workers, threads=args.threads)
    port = gunicorn.port
    print(
        f"== gunicorn: {args.workers} workers x {args.threads} threads on 127.0.0.1:{port}, "
        f"pool max_size {args.max_size} per worker"
    )
    loads: list[Load] = []
    try:
        gunicorn.wait()
        # The live pool page as soon as it answers (a login first), so that
        # a newcomer can open it while the load runs.
        page = f"{gunicorn.url}/admin/pools/"
        gunicorn.wait("/admin/pools/", ok=(200, 302))
        print(f"== the live pools in the Django admin: {page}")
        print(f"   log in as demo, password {password} (a throwaway staff user of this demo)")
        if math.isinf(args.stay):
            print(f"   the load runs {args.seconds:g}s, then the site stays up until Ctrl-C")
        elif args.stay > 0:
            print(f"   the load runs {args.seconds:g}s, then the site stays up {args.stay:g}s")
        else:
            print(
                f"   the load runs {args.seconds:g}s, then the demo ends (--stay SECONDS "
                "keeps the site up; in a terminal it stays up until Ctrl-C)"
            )
        mix = "80% reads, 15% writes, 5% slow"
        print(f"== load: {args.clients} clients for at least {args.seconds:g}s ({mix})")
        load = Load(port, args.clients, args.seconds, items)
        loads.append(load)
        sampler_stop = threading.Event()
        peak: dict[str, int] = {}

        def sample() -> None:
            while not sampler_stop.is_set():
                for app, _state, count in server_connections(dsn):
                    peak[app] = max(peak.get(app, 0), count)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # An operator's look from another shell while the load runs (the
        # load goes on until both commands have answered).
        seen: dict[str, str] = {}
        load.hold.clear()

        def look() -> None:
            try:
                time.sleep(args.seconds * 0.3)
                seen["pools"] = poolstats()
                seen["server"] = poolstats("--server")
            finally:
                load.hold.set()

        looker = threading.Thread(target=look, daemon=True)
        looker.start()
        load.run()
        looker.join()
        sampler_stop.set()
        sampler.join()
        lat = sorted(load.latencies)
        done = len(lat)
        print(
            f"   requests: {done} ok in {load.elapsed:.1f}s ({done / load.elapsed:.0f}/s), "
            f"errors: {load.errors or 'none'}"
        )
        if lat:
            p50 = statistics.median(lat) * 1000
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
            print(f"   latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        print("== server connections per worker pool (pg_stat_activity), peak during the load:")
        for app, count in sorted(peak.items()):
            print(f"   {app}: {count} (max_size {args.max_size})")
        print("   now:")
        for app, state, count in server_connections(dsn):
            print(f"   {app}: {count} {state}")
        print("== python manage.py poolstats, run from another process during the load:")
        print(indent(seen.get("pools", "(did not run)")))
        print("== python manage.py poolstats --server, at the same moment:")
        print(indent(seen.get("server", "(did not run)")))
        if args.stay > 0:
            stay(port, args, items, page)
    finally:
        for load in loads:
            load.stop.set()
        if gunicorn.stop(timeout=15):
            # Never left running (it also holds the demo's output open).
            print("== gunicorn did not stop within 15s of SIGTERM: killed", file=sys.stderr)
    return 0


def stay(port: int, args: argparse.Namespace, items: int, page: str) -> None:
    """Keep the site up under the same load for ``args.stay`` seconds, or until Ctrl-C."""
    until = "until Ctrl-C" if math.isinf(args.stay) else f"for {args.stay:g}s"
    load = Load(port, args.clients, args.stay, items, record=False)
    runner = threading.Thread(target=load.run, daemon=True)
    try:
        runner.start()
        print(f"== the site stays up under the same load {until}: {page}")
        # In short waits: Ctrl-C delivered to another thread (the kernel
        # picks any) only interrupts the main thread's next wake-up.
        while runner.is_alive():
            runner.join(0.2)
    except KeyboardInterrupt:
        print("== stopped")
    finally:
        load.stop.set()
        # Its clients are daemons, each ending after its request in flight.
        runner.join(5)


if __name__ == "__main__":
    from testproject.shutdown import exit_on_sigterm

    exit_on_sigterm()  # a kill still stops what the run started
    # Ctrl-C ends the demo even when it was started with SIGINT ignored (a
    # shell's background job, some CI runners): Python then installs no
    # handler of its own, and Ctrl-C would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
