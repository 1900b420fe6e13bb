"""docs/poolstats.rst shows what ``manage.py poolstats`` prints today.

The console examples were pasted from a real run (``bash .ci/demo`` prints
both).  Their figures are that run's; what these tests hold true is
everything else: the lines between the tables, every table's columns (names,
order, alignment) and the widths the command would give those figures, the
``--server`` view's columns, the Prometheus metric names and the JSON
document's keys.  When the command changes, paste a new run from
``bash .ci/demo``.
"""

from __future__ import annotations

import json
import os
import re
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection

from django_pooled_backend import poolstats

from .test_stats import write_published

DOC = Path(__file__).resolve().parent.parent / "docs" / "poolstats.rst"
CELL = re.compile(r"\S+(?: \S+)*")  # a cell: words separated by single spaces


def console_example(command: str) -> list[str]:
    """The lines the docs show after ``$ python manage.py <command>``."""
    lines = DOC.read_text().splitlines()
    start = lines.index(f"    $ python manage.py {command}")
    block: list[str] = []
    for line in lines[start + 1 :]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    while block and not block[-1]:
        block.pop()
    assert block, f"no output under '$ python manage.py {command}' in {DOC.name}"
    return block


def paragraphs(lines: list[str]) -> list[list[str]]:
    found: list[list[str]] = [[]]
    for line in lines:
        if line:
            found[-1].append(line)
        elif found[-1]:
            found.append([])
    return [p for p in found if p]


def parse_table(lines: list[str]) -> tuple[list[str], list[list[str]], list[set[str]]]:
    """Header names, cells and each column's possible alignments of a table's lines.

    A cell belongs to the column whose header it overlaps: the command pads
    every column to its widest cell, so a cell always overlaps its header
    (both left-aligned at the column's start, or right-aligned at its end)
    and no other.
    """
    header, *rows = lines
    names = [(m.start(), m.end(), m.group()) for m in CELL.finditer(header)]
    cells: list[list[str]] = []
    aligns: list[set[str]] = [{"l", "r"} for _ in names]
    for row in rows:
        out = [""] * len(names)
        for m in CELL.finditer(row):
            hits = [i for i, (s, e, _) in enumerate(names) if m.start() < e and s < m.end()]
            assert len(hits) == 1, f"{m.group()!r} is under no single column in {row!r}"
            i = hits[0]
            out[i] = m.group()
            start, end, _ = names[i]
            if m.start() != start:
                aligns[i].discard("l")
            if m.end() != end:
                aligns[i].discard("r")
        cells.append(out)
    return [n for _, _, n in names], cells, aligns


def check_table(shown: list[str], printed: list[str]) -> None:
    """``shown`` (docs) has ``printed``'s columns and the command's layout for its cells."""
    shown_names, shown_cells, shown_aligns = parse_table(shown)
    printed_names, _, printed_aligns = parse_table(printed)
    assert shown_names == printed_names
    align = ""
    for column, (docs, real) in enumerate(zip(shown_aligns, printed_aligns, strict=True)):
        assert docs & real, f"column {shown_names[column]} is aligned otherwise in the docs"
        align += sorted(docs & real)[0]
    # Laid out again by the command's own function, the docs' lines come back unchanged.
    assert poolstats.table(shown_names, shown_cells, align) == shown


def split_titles(paragraph: list[str], header_start: str) -> tuple[list[str], list[str]]:
    at = next(i for i, line in enumerate(paragraph) if line.startswith(header_start))
    return paragraph[:at], paragraph[at:]


@pytest.fixture
def published(tmp_path: Path, settings: Any) -> Path:
    """Two live processes (this one and pytest's parent): the totals rows show."""
    write_published(tmp_path, os.getpid())
    write_published(tmp_path, os.getppid())
    settings.POOLED_BACKEND_STATS_DIR = str(tmp_path)
    return tmp_path


def test_the_text_example_has_the_command_s_lines_columns_and_layout(published: Path) -> None:
    out = StringIO()
    call_command("poolstats", stdout=out)
    # The sample pools have requests waiting: the docs' run had no problems.
    printed = [p for p in paragraphs(out.getvalue().splitlines()) if p[0] != "Problems:"]
    shown = paragraphs(console_example("poolstats"))
    assert len(shown) == len(printed), "the docs' example has other sections"
    head = re.compile(r"Pools of \d+ processes on \S+ at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
    for lines in (shown[0], printed[0]):
        assert len(lines) == 2, lines
        assert head.fullmatch(lines[0]), lines
        assert re.fullmatch(r"\(snapshots in /\S+\)", lines[1]), lines
    for docs, real in zip(shown[1:], printed[1:], strict=True):
        docs_titles, docs_table = split_titles(docs, "PID ")
        real_titles, real_table = split_titles(real, "PID ")
        assert docs_titles == real_titles
        check_table(docs_table, real_table)
        # One row per process and a total row, as in the command's output.
        assert [row.split()[0] == "total" for row in docs_table[1:]] == [False, False, True]


@pytest.mark.django_db
def test_the_server_example_has_the_command_s_lines_and_columns() -> None:
    with connection.cursor() as cursor:  # this process' pool holds a connection
        cursor.execute("SELECT 1")
    out = StringIO()
    call_command("poolstats", "--server", stdout=out)
    printed = paragraphs(out.getvalue().splitlines())
    shown = paragraphs(console_example("poolstats --server"))
    # A distribution's build adds its own words: "15.18 (Debian 15.18-0+deb12u1)".
    head = re.compile(r"Server \S+:\d+ \(PostgreSQL [\d.]+(?: \([^()]*\))?\), through alias '\w+'")
    limits = re.compile(
        r"max_connections \d+, reserved \d+ \(superuser_reserved_connections \d+, "
        r"reserved_connections \d+\), in use \d+ \(this command's included\), headroom \d+"
    )
    for lines in (shown[0], printed[0]):
        assert len(lines) == 2, lines
        assert head.fullmatch(lines[0]), lines
        assert limits.fullmatch(lines[1]), lines
    check_table(shown[1], printed[1])


def documented(section: str) -> set[str]:
    """The ``names`` written in one section of the page."""
    text = DOC.read_text()
    start = text.index(f"\n{section}\n")
    end = text.index("\n----", start + len(section) + 2 + len(section) + 1)
    body = text[start:end]
    body = body[: body.rindex("\n", 0, len(body))]  # without the next section's title
    return set(re.findall(r"``([a-z_]+)", body))


def test_every_prometheus_metric_is_documented(published: Path) -> None:
    out = StringIO()
    call_command("poolstats", "--prometheus", stdout=out)
    families = set(re.findall(r"^# TYPE django_pooled_backend_(\w+) ", out.getvalue(), re.M))
    assert families
    assert families - documented("Prometheus metrics") == set()


def test_every_key_of_the_json_document_is_documented(published: Path) -> None:
    out = StringIO()
    call_command("poolstats", "--json", stdout=out)
    keys = set(json.loads(out.getvalue()))
    block = DOC.read_text().split("JSON document\n-------------", 1)[1]
    block = block.split("\n    }\n", 1)[0]
    shown = set(re.findall(r'^ {6}"(\w+)":', block, re.M))
    assert keys == shown
