"""The live pool page in a real browser, against real gunicorn workers under load.

One gunicorn (2 workers x 4 threads, pools of at most 3 connections)
serves the migrated testproject; headless Chromium (Debian's ``chromium``
and ``chromium-driver``, driven by Selenium) logs in to the admin and
reads the page, which must show what ``manage.py poolstats --json``,
run right after, reports.  The page's screenshot is
saved in ``test-artifacts/``.

Without Chromium these tests are skipped, except under CI (``CI`` set),
where they fail: a browser test that silently does not run proves nothing.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import time
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from django_pooled_backend import stats
from testproject.launch import ROOT, wait_for

from .conftest import only_request_mode
from .live import Load, Server, in_parallel, join, serve, warm_both_workers
from .test_stats import SAMPLE_POOL

DB = "dpb_admin_pools"
MAX_SIZE = 3
HELD = 2  # slow requests held while comparing: at most 2 per worker, 1 connection to spare
HOLD_MS = 30_000  # long enough to compare a few times on a busy machine
STAFF = ("ops", "ops-throwaway-password")
NOT_STAFF = ("visitor", "visitor-throwaway-password")
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOT = ARTIFACTS / "admin-pools.png"
PAGE = "/admin/pools/"
DATA = "/admin/pools/data.json"

pytestmark = pytest.mark.slow

# What the page shows, read in one go in the page (so that no poll lands halfway).
READ_PAGE = """
const rows = [];
for (const tr of document.querySelectorAll("section.pools-alias tr[data-pid]")) {
  if (tr.closest("table").classList.contains("pools-counters")) continue;
  const cells = {};
  for (const td of tr.querySelectorAll("[data-field]")) cells[td.dataset.field] = td.innerText;
  rows.push({alias: tr.closest("section").dataset.alias, pid: tr.dataset.pid, cells: cells});
}
const status = document.getElementById("pools-status");
return {time: status.dataset.time || null, status: status.innerText, rows: rows};
"""

SHOWN = ("lent", "idle", "free", "size", "min_size", "max_size", "waiting", "p95_ms")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def browser_missing(reason: str) -> None:
    if in_ci():
        pytest.fail(
            f"{reason}: CI must run the browser tests (.ci/run installs the Debian packages "
            "chromium and chromium-driver when it runs as root).",
            pytrace=False,
        )
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium through chromedriver, with a new empty profile."""
    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        browser_missing(
            "Chromium or ChromeDriver is not installed (apt-get install chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser_missing("selenium is not installed (it is in the 'test' extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(chromedriver)))
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("admin-pools")
    with serve(DB, directory, max_size=MAX_SIZE, interval=0.5, migrate=True) as server:
        for (name, password), staff in ((STAFF, True), (NOT_STAFF, False)):
            done = server.manage("ensure_user", name, password, *(["--staff"] if staff else []))
            assert done.returncode == 0, done.stderr
        yield server


def log_in(driver: Any, server: Server, user: tuple[str, str], next_page: str = PAGE) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{server.url}/admin/login/?next={next_page}")
    driver.find_element(By.NAME, "username").send_keys(user[0])
    driver.find_element(By.NAME, "password").send_keys(user[1])
    submit = driver.find_element(By.CSS_SELECTOR, "#login-form [type=submit]")
    submit.click()
    # Wait for the next page (or the login form again, with its error) to
    # replace this one: on a busy machine it may take a while.
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def replaced(_: Any) -> bool:
        try:
            submit.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            # What ChromeDriver sometimes says instead of "stale element"
            # about an element of a page that has just been replaced.
            if "does not belong to the document" in str(exc):
                return True
            raise
        return False

    WebDriverWait(driver, 60).until(replaced)
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def shown_rows(page: dict[str, Any]) -> dict[tuple[str, str], dict[str, str]]:
    return {
        (row["alias"], row["pid"]): {key: row["cells"][key] for key in SHOWN}
        for row in page["rows"]
    }


def to_fixed_1(value: float) -> str:
    """JavaScript's ``value.toFixed(1)``, as the page shows numbers.

    Python's ``f"{value:.1f}"`` rounds an exact tie to even (18.25 gives
    "18.2"); ``toFixed`` rounds it up ("18.3").  Both round the exact value
    of the double, which ``Decimal(value)`` is.
    """
    return str(Decimal(value).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def expected_rows(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, str]]:
    """What the page must show for a ``poolstats --json`` document."""

    def cells(pool: dict[str, Any]) -> dict[str, str]:
        used = max(pool["size"], pool["lent"] + pool["idle"])
        p95 = pool["wait"]["p95_ms"]
        figures = {key: pool[key] for key in SHOWN if key in pool}
        figures["free"] = max(pool["max_size"] - used, 0)
        figures["p95_ms"] = "-" if p95 is None else to_fixed_1(p95)
        return {key: str(value) for key, value in figures.items()}

    rows = {
        (pool["alias"], str(process["pid"])): cells(pool)
        for process in document["processes"]
        if not process["stale"]
        for pool in process["pools"]
    }
    if len([p for p in document["processes"] if not p["stale"]]) > 1:
        for total in document["totals"]:
            rows[(total["alias"], "total")] = cells(total)
    return rows


@only_request_mode
def test_staff_see_every_worker_pool_as_poolstats_reports_it(browser: Any, server: Server) -> None:
    workers = warm_both_workers(server)
    assert len(workers) == 2
    log_in(browser, server, STAFF)
    assert browser.current_url == server.url + PAGE
    assert browser.title.startswith("Connection pools")

    # Some load while the page polls, so that the charts have a history.
    with Load(server.port, 12, ["/whoami/", "/slow/?ms=40", "/whoami/", "/slow/?ms=5"]):
        wait_for(
            lambda: (
                len(browser.find_elements("css selector", "svg[data-chart=util] polyline")) >= 2
            ),
            timeout=60,
            what="the utilisation chart to draw a line per worker",
        )
        # The script ran: its message for when it does not is gone.
        assert not browser.find_elements("id", "pools-script-missing")
        time.sleep(8)  # the load goes on: a few seconds of history to draw
        wait_for(lambda: server.total("lent") > 0, what="connections lent under load")
    server.idle()

    threads, _ = in_parallel(server.port, [f"/slow/?ms={HOLD_MS}"] * HELD)
    try:
        with evidence(browser, "admin-pools"):
            wait_for(lambda: server.total("lent") == HELD, timeout=60, what="held connections")
            # The page polls on its own, every 0.5 s; a poll borrows a
            # connection too (the admin's session and user) and adds a wait to
            # the p95, and a snapshot taken during one shows it.  So the page
            # and poolstats agree only when no poll came between their two
            # reads: poolstats runs in this process (call_command, no start-up
            # to wait for) right after the page is read, and the two are
            # compared again until a look sees no poll in between.
            result = server.poolstats("--json")  # and from another process, it works too
            assert result.returncode == 0, result.stderr
            assert {p["pid"] for p in json.loads(result.stdout)["processes"]} >= workers
            for _ in range(40):
                wait_for(
                    lambda: _page_total(browser, "lent") == str(HELD),
                    timeout=30,
                    what="the page to show the held connections",
                )
                page = browser.execute_script(READ_PAGE)
                document = json.loads(server.call("--json"))
                shown, expected = shown_rows(page), expected_rows(document)
                if shown == expected:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(
                    f"the page never showed what poolstats --json did; last look: page {shown}, "
                    f"poolstats {expected}"
                )

            assert {pid for _alias, pid in shown} == {str(pid) for pid in workers} | {"total"}
            # Which server the connections are on, and its role.
            # Read in one script: the page redraws twice a second.
            on = wait_for(
                lambda: browser.execute_script(
                    "const e = document.querySelector('[data-alias=default] .pools-servers');"
                    "return e && e.textContent;"
                ),
                what="the servers beside the alias",
            )
            address = "{host}:{port}".format(
                **psycopg.conninfo.conninfo_to_dict(server.env["DATABASE_URL"])
            )
            assert f"{address} primary " in on, on
            assert shown[("default", "total")]["lent"] == str(HELD)
            assert shown[("default", "total")]["max_size"] == str(2 * MAX_SIZE)
            assert "2 processes on" in page["status"]

            holders = browser.execute_script(
                "return Array.from(document.querySelectorAll('[data-field=oldest_holder]'), "
                "td => td.innerText)"
            )
            assert any(
                "testproject/shop/views.py:" in h and h.endswith(" in slow") for h in holders
            )

            # Everything the page loaded came from the server itself.
            resources = browser.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name)"
            )
            assert any(r.endswith("/pools.js") for r in resources)
            assert any(r.endswith("/pools.css") for r in resources)
            assert all(r.startswith(server.url + "/") for r in resources), resources
            assert server.password not in browser.page_source

            save_screenshot(browser, SCREENSHOT)
            assert SCREENSHOT.stat().st_size > 10_000
    finally:
        join(threads)


@contextlib.contextmanager
def evidence(browser: Any, name: str) -> Iterator[None]:
    """On failure, keep what the browser showed in test-artifacts/ (NAME-failed.png, .html)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            save_screenshot(browser, ARTIFACTS / f"{name}-failed.png")
            (ARTIFACTS / f"{name}-failed.html").write_text(browser.page_source)
        raise


def save_screenshot(browser: Any, path: Path) -> None:
    """The whole page, not only the window, as PNG (Chromium's DevTools protocol)."""
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def texts(browser: Any, selector: str) -> list[str]:
    """The text of every element ``selector`` matches, read in one go in the page.

    The page redraws its tables after every poll: an element found by
    WebDriver and read in a second call may be gone by then (stale).
    """
    found = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText);",
        selector,
    )
    return [str(text) for text in found]


def _page_total(browser: Any, field: str) -> str | None:
    value = browser.execute_script(
        "const td = document.querySelector(`tr[data-pid=total] [data-field=${arguments[0]}]`);"
        "return td ? td.innerText : null;",
        field,
    )
    return None if value is None else str(value)


def test_waiters_problems_and_stale_processes_are_shown(browser: Any, server: Server) -> None:
    # A process of another host (its liveness cannot be checked from here,
    # only the age of its snapshot): all 4 connections lent, 2 waiting for
    # 7.5 s.  It stops publishing, so it turns stale after 3 s.
    snapshot = stats.snapshot_process([], interval=0.5)
    snapshot.update(pid=4242, host="web-2", time=time.time(), start_time=None)
    snapshot["pools"] = [dict(SAMPLE_POOL)]  # type: ignore[list-item]
    path = stats.write_snapshot(server.directory, snapshot)
    try:
        with evidence(browser, "admin-pools-problems"):
            log_in(browser, server, STAFF)
            waiting = wait_for(
                lambda: texts(browser, "tr[data-pid='4242'] [data-field=waiting].pools-alert"),
                what="the waiters of the other host's pool",
            )
            assert waiting == ["2"]
            problems = "\n".join(texts(browser, "#pools-problems"))
            assert (
                "pid 4242 on web-2, alias 'default': the pool is exhausted: all 4 connections"
                in (problems)
            )
            assert "a request has waited 7.5s for a connection (more than 5s)" in problems
            save_screenshot(browser, ARTIFACTS / "admin-pools-problems.png")
            stale = wait_for(
                lambda: "".join(texts(browser, "#pools-stale")),
                timeout=60,
                what="the other host's snapshot to turn stale",
            )
            assert stale.startswith("Stale: pid 4242 on web-2 (")
            assert not texts(browser, "tr[data-pid='4242']")
    finally:
        path.unlink()


def test_admin_index_links_to_the_page(browser: Any, server: Server) -> None:
    log_in(browser, server, STAFF, next_page="/admin/")
    # The admin index may still be loading on a busy machine.
    links = wait_for(
        lambda: browser.find_elements("css selector", "#pools-link a[href='/admin/pools/']"),
        what="the link on the admin index",
    )
    links[0].click()
    wait_for(lambda: browser.current_url == server.url + PAGE, what="the pool page")


def test_without_its_script_the_page_says_why_it_stays_empty(browser: Any, server: Server) -> None:
    # As behind plain gunicorn, which serves no static files: pools.js fails to
    # load (log_in() waits until the page has loaded, deferred scripts included).
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/pools.js"]})
    try:
        log_in(browser, server, STAFF)
        assert browser.current_url == server.url + PAGE
        message = browser.find_element("id", "pools-script-missing")
        assert message.is_displayed()
        assert "the static files are not served" in message.text
        assert "/static/django_pooled_backend/pools.js did not load" in message.text
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
    # Served again, the script runs and removes it.
    browser.get(server.url + PAGE)
    wait_for(
        lambda: not browser.find_elements("id", "pools-script-missing"),
        what="the script to remove the message",
    )


def test_a_user_who_is_not_staff_is_refused(browser: Any, server: Server) -> None:
    log_in(browser, server, NOT_STAFF)
    # The admin's login form refuses accounts that are not staff.
    assert browser.current_url.startswith(f"{server.url}/admin/login/")
    assert "staff account" in browser.find_element("css selector", ".errornote").text
    browser.get(server.url + PAGE)
    assert browser.current_url == f"{server.url}/admin/login/?next={PAGE}"
    assert not browser.find_elements("css selector", "#pools")
    # The page's JSON, asked for by this browser (whose login was refused).
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => done(r.status), e => done(String(e)));",
        DATA,
    )
    assert status == 403


def test_the_json_refuses_anonymous_users(server: Server) -> None:
    for path, status in ((DATA, 403), (PAGE, 302)):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == status, body[:300]
        if status == 302:
            assert response.getheader("Location") == f"/admin/login/?next={PAGE}"
        else:
            assert json.loads(body) == {
                "error": "Log in to the admin site as a staff user to see the connection pools."
            }


def test_numbers_are_rounded_as_the_page_rounds_them() -> None:
    # Values the page showed in CI, and the neighbours of a tie.
    assert [to_fixed_1(v) for v in (18.25, 18.249, 14.05, 0.0, 3.0)] == [
        "18.3",
        "18.2",
        "14.1",
        "0.0",
        "3.0",
    ]
