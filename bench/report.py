"""Aggregate the repetitions and write ``latest.rst`` (the tables) and ``latest.json``.

``latest.rst`` is committed and included in the docs; ``latest.json``, every
repetition of every cell, stays local (``.gitignore``).

Ratios and overheads are computed within each repetition (every strategy
against persistent connections measured minutes apart at most, in the same
noise), and their median over repetitions is reported.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from .strategies import REFERENCE


def machine(server_version: str, pgbouncer_version: str | None) -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import psycopg

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    libpq = psycopg.pq.version()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "django": version("django"),
        "psycopg": f"{version('psycopg')} ({psycopg.pq.__impl__}, libpq "
        f"{libpq // 10000}.{libpq % 10000})",
        "psycopg_pool": version("psycopg-pool"),
        "postgresql": server_version,
        "pgbouncer": pgbouncer_version or "not run",
        "django-db-connection-pool": version("django-db-connection-pool"),
        "sqlalchemy": version("sqlalchemy"),
        "django-pg-real-pool": version("django-pg-real-pool"),
    }


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(finite) if finite else float("nan")


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (workload, threads, strategy) over the repetitions."""
    ref: dict[tuple[Any, ...], dict[str, Any]] = {
        (c["rep"], c["workload"], c["threads"]): c for c in cells if c["strategy"] == REFERENCE
    }
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["workload"], c["threads"], c["strategy"]), []).append(c)
    summaries = []
    for (workload, threads, strategy), reps in groups.items():
        ratios, overheads = [], []
        for c in reps:
            r = ref.get((c["rep"], workload, threads))
            if r and r["rps"]:
                ratios.append(c["rps"] / r["rps"])
                if c["mean_ms"] is not None and r["mean_ms"] is not None:
                    overheads.append(1000 * (c["mean_ms"] - r["mean_ms"]))
        rps = [c["rps"] for c in reps]
        errors = sum(c["errors"] for c in reps)
        # psycopg_pool's counters, warm-up included (absent for the others).
        waits = [w for c in reps if (w := c.get("borrow_waits")) and w["borrows"]]
        summaries.append(
            {
                "workload": workload,
                "threads": threads,
                "strategy": strategy,
                "reps": len(reps),
                "rps_median": _median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "ratio_median": _median(ratios),
                "ratios": ratios,
                "overhead_us_median": _median(overheads),
                "p50_ms": _median(c["p50_ms"] for c in reps),
                "p99_ms": _median(c["p99_ms"] for c in reps),
                "peak_server_connections": max(c["peak_server_connections"] for c in reps),
                "errors": errors,
                "first_error": next((c["first_error"] for c in reps if c["first_error"]), None),
                "threads_progressed_min": min(c["threads_progressed"] for c in reps),
                "queued_pct": _median(100 * w["queued"] / w["borrows"] for w in waits),
                "queued_wait_ms": _median(w["wait_ms"] / w["queued"] for w in waits if w["queued"]),
            }
        )
    return summaries


# -- rendering -------------------------------------------------------------


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


def _num(value: float, fmt: str = "{:.0f}") -> str:
    return "—" if value is None or math.isnan(value) else fmt.format(value)


def _waited(summary: dict[str, Any]) -> str:
    pct = summary.get("queued_pct")
    if pct is None or math.isnan(pct):
        return "—"
    wait = summary.get("queued_wait_ms")
    if wait is None or math.isnan(wait):
        return f"{pct:.0f}%"
    return f"{pct:.0f}% ({wait:.1f} ms)"


def tables(
    summaries: list[dict[str, Any]],
    strategies: list[str],
    workloads: dict[str, str],
) -> tuple[list[Table], list[str]]:
    """The report's tables, and the first error message of each failing cell."""
    by_key = {(s["workload"], s["threads"], s["strategy"]): s for s in summaries}
    threads = sorted({s["threads"] for s in summaries})
    result: list[Table] = []
    notes: list[str] = []
    for key, description in workloads.items():
        rows = []
        for strategy in strategies:
            row = [strategy]
            for t in threads:
                s = by_key.get((key, t, strategy))
                row.append(
                    "—"
                    if s is None
                    else f"{_num(s['ratio_median'], '{:.2f}')} ({_num(s['rps_median'])}/s)"
                )
            rows.append(row)
        result.append(
            Table(
                f"({key}) {description}: throughput ratio to persistent (requests/s)",
                ["strategy", *[f"T={t}" for t in threads]],
                rows,
            )
        )
    for key, description in workloads.items():
        rows = []
        for strategy in strategies:
            for t in threads:
                s = by_key.get((key, t, strategy))
                if s is None:
                    continue
                if s["errors"]:
                    notes.append(f"({key}) {strategy} T={t}: {s['first_error']}")
                rows.append(
                    [
                        strategy,
                        str(t),
                        f"{_num(s['rps_median'])} ({_num(s['rps_min'])}-{_num(s['rps_max'])})",
                        _num(s["ratio_median"], "{:.2f}"),
                        _num(s["overhead_us_median"], "{:+.0f}") if t == 1 else "",
                        _num(s["p50_ms"], "{:.2f}"),
                        _num(s["p99_ms"], "{:.2f}"),
                        str(s["peak_server_connections"]),
                        str(s["errors"]),
                        f"{s['threads_progressed_min']}/{t}",
                        _waited(s),
                    ]
                )
        result.append(
            Table(
                f"({key}) {description}: details",
                [
                    "strategy",
                    "T",
                    "req/s median (min-max)",
                    "ratio",
                    "overhead µs",
                    "p50 ms",
                    "p99 ms",
                    "peak server conns",
                    "errors",
                    "threads progressed",
                    "borrows that waited (mean wait)",
                ],
                rows,
            )
        )
    return result, notes


def _rst_cell(text: str) -> str:
    # Table cells here are numbers, names and dashes: escape what RST reads
    # as markup all the same.
    for char in ("\\", "*", "`", "|", "_"):
        text = text.replace(char, "\\" + char)
    return text or "\\"


def render_rst(info: dict[str, str], run: dict[str, Any], ts: list[Table], notes: list[str]) -> str:
    lines = [
        ".. Generated by bench/run.py: do not edit, run the benchmark again.",
        "",
        "Measured on",
        "^^^^^^^^^^^",
        "",
    ]
    lines += [f"- **{k}**: {_rst_cell(v)}" for k, v in info.items()]
    # A command line as typed (Sphinx would make "--" a dash in text).
    lines += [
        f"- **{k}**: ``{v}``" if k == "command" else f"- **{k}**: {_rst_cell(str(v))}"
        for k, v in run.items()
    ]
    for t in ts:
        lines += ["", t.title, "^" * len(t.title), "", ".. list-table::", "   :header-rows: 1", ""]
        for row in [t.header, *t.rows]:
            first, *rest = row
            lines.append(f"   * - {_rst_cell(first)}")
            lines += [f"     - {_rst_cell(c)}" for c in rest]
    if notes:
        title = "First error of each failing cell"
        lines += ["", title, "^" * len(title), "", "::", ""]
        lines += [f"    {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _no_nan(value: Any) -> Any:
    """JSON has no NaN: a measurement that does not exist is null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def write(
    directory: Path,
    info: dict[str, str],
    run: dict[str, Any],
    cells: list[dict[str, Any]],
    strategies: list[str],
    workloads: dict[str, str],
) -> dict[str, Path]:
    """Write the table (committed) and the raw figures (not) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    summaries = aggregate(cells)
    ts, notes = tables(summaries, strategies, workloads)
    paths = {"json": directory / "latest.json", "rst": directory / "latest.rst"}
    data = {"machine": info, "run": run, "summary": summaries, "cells": cells}
    paths["json"].write_text(json.dumps(_no_nan(data), indent=1, default=str) + "\n")
    paths["rst"].write_text(render_rst(info, run, ts, notes))
    return paths
