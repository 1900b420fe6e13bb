"""The side-by-side benchmark of connection strategies (``python bench/run.py``).

Modules:

``strategies``
    Each strategy as one entry of ``DATABASES`` (one alias per strategy, all
    on the same database), and how to close its pool between cells.
``pgbouncer``
    Finds (or installs) PgBouncer, starts it on loopback, stops it.
``workloads``
    The requests, the threads that send them, the sampler of server
    connections and the borrow+return microbenchmark.
``report``
    Aggregates repetitions and writes ``bench/results/latest.{md,rst,json}``.
``run``
    The command line.
``profile_borrow``
    Where the time of one request goes, per strategy (cProfile).
"""
