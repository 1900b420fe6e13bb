"""tests/django_suite/run.py reads runtests.py's output right (no server, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.django_suite.run import (
    Outcome,
    now_passing,
    parse_output,
    read_known,
    regressions,
    report,
)

FAILED_RUN = """\
Testing against Django installed in '/x/django' with up to 2 processes
Found 324 test(s).
Creating test database for alias 'default'...
System check identified no issues (0 silenced).
..s..F..E..
======================================================================
ERROR: test_ignores (test_utils.tests.AssertNumQueriesUponConnectionTests.test_ignores)
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/x/tests/test_utils/tests.py", line 268, in test_ignores
    list(Car.objects.all())
AttributeError: 'NoneType' object has no attribute 'cursor'

======================================================================
FAIL: test_thread_local (backends.tests.ThreadTests.test_thread_local)
The default connection (i.e. django.db.connection) is different for
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/x/tests/backends/tests.py", line 795, in test_thread_local
    self.assertEqual(
AssertionError: 1 != 3

======================================================================
ERROR: test_chained (backends.tests.Chained.test_chained)
----------------------------------------------------------------------
Traceback (most recent call last):
  File "/x/a.py", line 1, in f
    raise KeyError("k")
KeyError: 'k'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/x/a.py", line 3, in f
    raise ValueError("v")
ValueError: v
second line of the message

----------------------------------------------------------------------
Ran 324 tests in 11.111s

FAILED (failures=1, errors=2, skipped=93, expected failures=2)
Destroying test database for alias 'default'...
"""

OK_RUN = """\
Found 82 test(s).
..........
----------------------------------------------------------------------
Ran 82 tests in 0.373s

OK (skipped=3)
"""


def test_the_summary_counts_are_read() -> None:
    outcome = parse_output(FAILED_RUN)
    assert outcome.ran == 324
    assert (outcome.failures, outcome.errors, outcome.skipped) == (1, 2, 93)
    assert outcome.expected_failures == 2
    assert outcome.passed == 324 - 1 - 2 - 93 - 2


def test_failing_tests_are_named_with_the_first_line_of_their_last_exception() -> None:
    failed = parse_output(FAILED_RUN).failed
    assert failed == {
        "ERROR: test_ignores (test_utils.tests.AssertNumQueriesUponConnectionTests"
        ".test_ignores)": "AttributeError: 'NoneType' object has no attribute 'cursor'",
        # A docstring line under the header is not the traceback.
        "FAIL: test_thread_local (backends.tests.ThreadTests.test_thread_local)": (
            "AssertionError: 1 != 3"
        ),
        "ERROR: test_chained (backends.tests.Chained.test_chained)": "ValueError: v",
    }


def test_an_ok_run_and_a_run_without_summary() -> None:
    outcome = parse_output(OK_RUN)
    assert (outcome.ran, outcome.skipped, outcome.passed, outcome.failed) == (82, 3, 79, {})
    crashed = parse_output("Traceback (most recent call last):\nSystemExit: 2\n")
    assert crashed.ran is None
    assert crashed.cell().startswith("no summary")


def outcome(text: str, returncode: int, leftover: list[str] | None = None) -> Outcome:
    result = parse_output(text)
    result.returncode = returncode
    result.leftover = leftover or []
    return result


def test_only_what_ours_does_worse_than_stock_counts() -> None:
    same = regressions({"stock": outcome(FAILED_RUN, 1), "request": outcome(FAILED_RUN, 1)})
    assert same == []
    worse = [
        str(problem)
        for problem in regressions(
            {
                "stock": outcome(OK_RUN, 0),
                "request": outcome(FAILED_RUN, 1),
                "transaction": outcome(OK_RUN, 0, leftover=["test_django_suite_transaction"]),
            }
        )
    ]
    assert worse[0] == "ours request: rc 1, stock rc 0"
    assert worse[2] == (
        "ours request: FAIL: test_thread_local (backends.tests.ThreadTests.test_thread_local): "
        "AssertionError: 1 != 3"
    )
    assert worse[-1] == (
        "ours transaction: left test databases behind: test_django_suite_transaction"
    )
    assert len(worse) == 1 + 3 + 1


def test_a_database_stock_leaves_behind_too_is_not_ours_to_answer_for() -> None:
    crashed = "Traceback (most recent call last):\nNotSupportedError: no uuid-ossp\n"
    results = {
        "stock": outcome(crashed, 1, leftover=["test_django_suite_stock"]),
        "request": outcome(crashed, 1, leftover=["test_django_suite_request"]),
    }
    assert regressions(results) == []
    del results["stock"]
    assert [str(p) for p in regressions(results)] == [
        "ours request: left test databases behind: test_django_suite_request"
    ]


def test_known_failures_excuse_themselves_and_the_exit_status_they_cause() -> None:
    results = {"stock": outcome(OK_RUN, 0), "request": outcome(FAILED_RUN, 1)}
    ids = [
        "test_utils.tests.AssertNumQueriesUponConnectionTests.test_ignores",
        "backends.tests.ThreadTests.test_thread_local",
        "backends.tests.Chained.test_chained",
    ]
    all_known = frozenset(("request", test) for test in ids)
    assert all(problem.known for problem in regressions(results, all_known))
    # One failure not listed: it counts, and so does the exit status.
    some_known = frozenset(("request", test) for test in ids[1:])
    unknown = [str(p) for p in regressions(results, some_known) if not p.known]
    assert unknown == [
        "ours request: rc 1, stock rc 0",
        "ours request: ERROR: test_ignores (test_utils.tests.AssertNumQueriesUponConnectionTests"
        ".test_ignores): AttributeError: 'NoneType' object has no attribute 'cursor'",
    ]


def test_known_failures_that_pass_are_reported() -> None:
    results = {"backends": {"request": outcome(OK_RUN, 0)}}
    known = frozenset({("request", "backends.tests.ThreadTests.test_thread_local")})
    assert now_passing(results, known) == ["request backends.tests.ThreadTests.test_thread_local"]
    assert now_passing({}, known) == []


def test_the_known_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "known.txt"
    path.write_text("# why\ntransaction test_utils.tests.A.test_b  # because\n\n")
    assert read_known(path) == {("transaction", "test_utils.tests.A.test_b")}
    path.write_text("ours test_utils.tests.A.test_b\n")
    with pytest.raises(SystemExit, match=r"expected 'ENGINE DOTTED\.TEST\.ID'"):
        read_known(path)


def test_the_table_in_markdown_and_rst() -> None:
    results = {"basic": {"stock": outcome(OK_RUN, 0), "request": outcome(OK_RUN, 0)}}
    markdown = list(report(results, ["stock", "request"], "md"))
    assert "| module | stock | ours request |" in markdown
    assert "| basic | 79/0/0, rc 0, leftover db no, 0 s | 79/0/0, rc 0, leftover db no, 0 s |" in (
        markdown
    )
    rst = list(report(results, ["stock", "request"], "rst"))
    assert rst[2].startswith("=====")
    assert rst[3].split()[:3] == ["module", "stock", "ours"]
    assert rst[-1] == "No module does worse with django_pooled_backend than with the stock backend."
