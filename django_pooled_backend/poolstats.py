"""What ``manage.py poolstats`` shows: published snapshots, totals, problems, renderings.

Reading is :func:`django_pooled_backend.stats.read_snapshots`; this module
filters, adds up and renders (text, JSON; Prometheus is
:mod:`django_pooled_backend.prometheus`), and decides what ``--check`` calls
a problem.  The server's own view is in
:mod:`django_pooled_backend.serverview`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from django.core.exceptions import ImproperlyConfigured

from .stats import (
    HOSTNAME,
    METRICS,
    SCHEMA,
    WAIT_WINDOW,
    PoolSnapshot,
    Published,
    configured_directory,
    read_snapshots,
    untrusted,
)

DEFAULT_MAX_WAIT = 5.0
"""``--check`` fails when a request has waited longer than this (seconds)."""

# Figures that add up across processes, in the order they are shown.
GAUGES = tuple(m.key for m in METRICS if m.kind == "gauge")
COUNTERS = tuple(m.key for m in METRICS if m.kind == "counter")


class TotalWait(TypedDict):
    window: int
    mean_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass
class Report:
    """The published snapshots of one project, as seen now."""

    directory: Path | None  # None: this process alone, not read from a directory
    alias: str | None
    time: float
    live: list[Published] = field(default_factory=list)
    stale: list[Published] = field(default_factory=list)

    def rows(self) -> Iterable[tuple[Published, PoolSnapshot]]:
        """(process, pool) for every pool of every live process."""
        for published in self.live:
            for pool in published.snapshot["pools"]:
                yield published, pool


class NotPublished(Exception):
    """Pool statistics are not published; the message says why and what to do."""


def stats_directory() -> Path:
    """The directory the processes publish in, or NotPublished saying why there is none."""
    try:
        directory = configured_directory()
    except ImproperlyConfigured as exc:
        raise NotPublished(str(exc)) from None
    if directory is None:
        raise NotPublished(
            "Pool statistics are not published: settings.POOLED_BACKEND_STATS_DIR is None. "
            "Remove that setting (or set it to a directory) and restart the server processes."
        )
    problem = untrusted(directory)
    if problem is not None:
        raise NotPublished(problem)
    return directory


def load(directory: Path, alias: str | None = None, now: float | None = None) -> Report:
    """The snapshots in ``directory``, keeping only ``alias``'s pools if given."""
    now = time.time() if now is None else now
    report = Report(directory=directory, alias=alias, time=now)
    for published in read_snapshots(directory, now):
        if alias is not None:
            pools = [p for p in published.snapshot["pools"] if p["alias"] == alias]
            published.snapshot["pools"] = pools
        if not published.snapshot["pools"]:
            continue
        (report.stale if published.stale else report.live).append(published)
    return report


def totals(report: Report) -> list[dict[str, Any]]:
    """Per alias, over live processes: sums, and the worst wait and holder."""
    by_alias: dict[str, dict[str, Any]] = {}
    for _published, pool in report.rows():
        total = by_alias.get(pool["alias"])
        if total is None:
            total = by_alias[pool["alias"]] = {
                "alias": pool["alias"],
                "processes": 0,
                **dict.fromkeys(GAUGES, 0),
                **dict.fromkeys(COUNTERS, 0),
                "_wait_sum": 0.0,
                "wait": {"window": 0, "mean_ms": None, "p95_ms": None, "p99_ms": None},
                "oldest_waiter_s": None,
                "oldest_holder_s": None,
            }
        total["processes"] += 1
        for key in (*GAUGES, *COUNTERS):
            # .get(): a snapshot of an older release may lack a newer gauge.
            total[key] += pool.get(key, 0)
        wait = pool["wait"]
        if wait["window"] and wait["mean_ms"] is not None:
            total["_wait_sum"] += wait["mean_ms"] * wait["window"]
            tw = total["wait"]
            tw["window"] += wait["window"]
            for key in ("p95_ms", "p99_ms", "max_ms"):
                tw[key] = _max(tw.get(key), wait[key])  # type: ignore[literal-required]
        total["oldest_waiter_s"] = _max(total["oldest_waiter_s"], pool["oldest_waiter_s"])
        holder = pool["oldest_holder"]
        total["oldest_holder_s"] = _max(
            total["oldest_holder_s"], holder["held_s"] if holder else None
        )
    result = []
    for total in by_alias.values():
        wait_sum = total.pop("_wait_sum")
        tw = total["wait"]
        tw.setdefault("max_ms", None)
        if tw["window"]:
            tw["mean_ms"] = round(wait_sum / tw["window"], 3)
        result.append(total)
    return sorted(result, key=lambda t: str(t["alias"]))


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def problems(report: Report, max_wait: float = DEFAULT_MAX_WAIT) -> list[str]:
    """What ``--check`` fails on: exhausted pools, long waits, silent processes."""
    found = []
    for published, pool in report.rows():
        where = _where(published, pool)
        if pool["waiting"] and pool["lent"] >= pool["max_size"]:
            found.append(
                f"{where}: the pool is exhausted: all {pool['max_size']} connections are lent "
                f"out and {pool['waiting']} requests are waiting."
            )
        oldest = pool["oldest_waiter_s"]
        if oldest is not None and oldest > max_wait:
            found.append(
                f"{where}: a request has waited {oldest:.1f}s for a connection "
                f"(more than {max_wait:g}s)."
            )
    for published in report.stale:
        snap = published.snapshot
        if published.suspicious is not None:
            found.append(
                f"pid {snap['pid']} on {snap['host']}: suspicious pool statistics: "
                f"{published.suspicious}."
            )
            continue
        found.append(
            f"pid {snap['pid']} on {snap['host']}: no fresh pool "
            f"statistics for {published.age:.0f}s (the process may be hung)."
        )
    return found


def _where(published: Published, pool: PoolSnapshot) -> str:
    snap = published.snapshot
    return f"pid {snap['pid']} on {snap['host']}, alias {pool['alias']!r}"


def nothing_published(report: Report) -> str:
    """The plain message for "no process has a pool"."""
    alias = f" for database alias {report.alias!r}" if report.alias else ""
    return (
        f"No running process on {HOSTNAME} publishes pool statistics{alias} "
        f"(looked in {report.directory}). Start the server processes, or make sure they "
        "use the same settings (POOLED_BACKEND_STATS_DIR)."
    )


# -- JSON ----------------------------------------------------------------------


def as_json(report: Report, max_wait: float = DEFAULT_MAX_WAIT) -> dict[str, Any]:
    """The ``--json`` document (schema documented in docs/poolstats.rst)."""
    processes = []
    for published in [*report.live, *report.stale]:
        snap = published.snapshot
        processes.append(
            {
                "pid": snap["pid"],
                "host": snap["host"],
                "program": snap["program"],
                "updated": snap["time"],
                "age_s": round(published.age, 3),
                "stale": published.stale,
                "suspicious": published.suspicious,
                "interval_s": snap["interval"],
                "pools": snap["pools"],
            }
        )
    processes.sort(key=lambda p: (p["host"], p["pid"]))
    return {
        "version": SCHEMA,
        "time": round(report.time, 3),
        "host": HOSTNAME,
        "directory": str(report.directory) if report.directory else None,
        "database": report.alias,
        "wait_window": WAIT_WINDOW,
        "processes": processes,
        "totals": totals(report),
        "problems": problems(report, max_wait),
    }


def render_json(report: Report, max_wait: float = DEFAULT_MAX_WAIT) -> str:
    return json.dumps(as_json(report, max_wait), indent=2) + "\n"


# -- text ------------------------------------------------------------------------


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _age(seconds: float) -> str:
    return f"{seconds:.1f}s ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> list[str]:
    """Aligned columns; ``align`` has one letter per column, ``l`` or ``r``."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(
            cell.ljust(widths[i]) if align[i] == "l" else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in cells
    ]


def _address(server: Any) -> str:
    port = server.get("port")
    return f"{server['host']}:{port}" if port is not None else str(server["host"])


def render_text(report: Report, max_wait: float = DEFAULT_MAX_WAIT) -> str:
    """The human view: pools now, requests, connections, then stale processes and problems."""
    if not report.live and not report.stale:
        return nothing_published(report) + "\n"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report.time))
    hosts = sorted({p.snapshot["host"] for p in report.live})
    alias = f", database alias {report.alias!r}" if report.alias else ""
    lines = [
        f"Pools of {_count(len(report.live), 'process', 'processes')} on "
        f"{', '.join(hosts) or HOSTNAME}{alias} at {when}",
        f"(snapshots in {report.directory})",
        "",
    ]
    rows = list(report.rows())
    all_totals = totals(report)
    show_totals = len(report.live) > 1

    now_rows: list[list[object]] = []
    for p, pool in rows:
        holder = pool["oldest_holder"]
        now_rows.append(
            [
                p.snapshot["pid"],
                p.snapshot["program"],
                pool["alias"],
                _age(p.age),
                pool["size"],
                pool["min_size"],
                pool["max_size"],
                pool["lent"],
                pool.get("pinned", 0),
                pool["idle"],
                pool["waiting"],
                f"{holder['held_s']:.1f}s {holder['thread']} at {holder['where']}"
                if holder
                else "-",
            ]
        )
    if show_totals:
        for t in all_totals:
            now_rows.append(
                [
                    "total",
                    "",
                    t["alias"],
                    "",
                    t["size"],
                    t["min_size"],
                    t["max_size"],
                    t["lent"],
                    t["pinned"],
                    t["idle"],
                    t["waiting"],
                    "-" if t["oldest_holder_s"] is None else f"{t['oldest_holder_s']:.1f}s",
                ]
            )
    headers = ["PID", "PROGRAM", "ALIAS", "UPDATED", "SIZE", "MIN", "MAX", "LENT", "PINNED"]
    lines += table([*headers, "IDLE", "WAITING", "OLDEST HOLDER"], now_rows, "lllrrrrrrrrl")

    server_rows = [
        [p.snapshot["pid"], pool["alias"], _address(server), server["role"], server["connections"]]
        for p, pool in rows
        for server in pool.get("servers", [])
    ]
    # Shown for pools on more than one server or on a standby; a connection
    # whose server is not known yet (busy since it was opened) does not count.
    known = [[s for s in pool.get("servers", []) if s["role"] != "unknown"] for _, pool in rows]
    several = any(len(k) > 1 or any(s["role"] == "standby" for s in k) for k in known)
    if several:
        lines += ["", "Servers (which server each connection is on)"]
        lines += table(["PID", "ALIAS", "SERVER", "ROLE", "CONNECTIONS"], server_rows, "llllr")

    lines += ["", f"Requests (wait: time to get a connection, last {WAIT_WINDOW} borrows, ms)"]
    req_rows: list[list[object]] = []
    for p, pool in rows:
        w = pool["wait"]
        req_rows.append(
            [
                p.snapshot["pid"],
                pool["alias"],
                pool["requests_served"],
                pool["requests_waited"],
                _ms(w["mean_ms"]),
                _ms(w["p95_ms"]),
                _ms(w["p99_ms"]),
                pool["timeouts"],
                pool["rejected"],
            ]
        )
    if show_totals:
        for t in all_totals:
            w = t["wait"]
            req_rows.append(
                [
                    "total",
                    t["alias"],
                    t["requests_served"],
                    t["requests_waited"],
                    _ms(w["mean_ms"]),
                    _ms(w["p95_ms"]),
                    _ms(w["p99_ms"]),
                    t["timeouts"],
                    t["rejected"],
                ]
            )
    lines += table(
        ["PID", "ALIAS", "SERVED", "WAITED", "WAIT MEAN", "P95", "P99", "TIMEOUTS", "REJECTED"],
        req_rows,
        "llrrrrrrr",
    )

    lines += ["", "Connections"]
    conn_rows: list[list[object]] = []
    for p, pool in rows:
        conn_rows.append([p.snapshot["pid"], pool["alias"], *_conn_figures(pool)])
    if show_totals:
        for t in all_totals:
            conn_rows.append(["total", t["alias"], *_conn_figures(t)])
    conn_headers = ["PID", "ALIAS", "OPENED", "CLOSED", "LOST", "ERRORS", "RESETS"]
    lines += table([*conn_headers, "RESET FAILED", "LEAKS", "RECLAIMS"], conn_rows, "llrrrrrrrr")

    if report.stale:
        lines.append("")
        for p in report.stale:
            snap = p.snapshot
            if p.suspicious is not None:
                lines.append(
                    f"Suspicious: pid {snap['pid']} on {snap['host']} ({snap['program']}): "
                    f"{p.suspicious}; its figures are not shown. No process of this project "
                    f"writes such a snapshot: check who can write {report.directory}."
                )
                continue
            lines.append(
                f"Stale: pid {snap['pid']} on {snap['host']} ({snap['program']}) has published "
                f"nothing for {p.age:.1f}s; its figures are not shown."
            )
    found = problems(report, max_wait)
    if found:
        lines += ["", "Problems:"]
        lines += [f"  {problem}" for problem in found]
    return "\n".join(lines) + "\n"


def _conn_figures(pool: PoolSnapshot | dict[str, Any]) -> list[object]:
    return [
        pool["connections_opened"],
        pool["connections_closed"],
        pool["connections_lost"],
        pool["connection_errors"],
        pool["resets"],
        pool["resets_failed"],
        pool["leaks"],
        pool["reclaims"],
    ]
