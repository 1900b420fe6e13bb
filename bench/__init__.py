"""The benchmarks: each module a command, run from the repository root (see docs/benchmarks.rst).

``run``
    The side-by-side benchmark of connection strategies (``python bench/run.py``).
``strategies``, ``workloads``, ``report``
    Its parts: each strategy as one entry of ``DATABASES``; the requests,
    the threads that send them and the sampler of server connections; the
    aggregation and the ``latest.rst`` tables (the raw ``latest.json`` stays
    local).
``micro``
    One-thread micro-measurements with pyperf: a request per strategy, a
    borrow+return against another revision, the statistics' statements.
``profile_borrow``
    Where the time of one request goes, per strategy (cProfile).
``instructions``
    What a request costs the client, in instructions.
``release_modes``
    Persistent connections against request- and transaction-scoped release.
``reset_cost``
    What the session reset costs per request.
``connect_failures``
    How long ``migrate`` and ``check`` take to fail on a refusing server.
``failover``
    How soon requests succeed again when a standby is promoted (a primary
    and a standby of ``testproject.pgserver``), against Django's pool and
    no pool; its load driver is what ``tests/test_failover.py`` runs.

PgBouncer, when a strategy needs it, comes from ``testproject.pgbouncer``;
the server from ``testproject.pgserver``.
"""
