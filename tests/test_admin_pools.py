"""The live pool page and its JSON through Django's test client: who gets them, and what.

The browser tests (test_admin_pools_live.py) show the page drawing real
workers' pools; here each view is asked directly, with snapshot files
written as processes write them.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib import admin
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import path, reverse

from django_pooled_backend import stats, views

from .test_stats import write_published

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "django_pooled_backend"
PAGE = "/admin/pools/"
DATA = "/admin/pools/data.json"
LOGIN = f"/admin/login/?next={PAGE}"

# For the test of an admin without the page's URLs (pytest.mark.urls).
urlpatterns = [path("admin/", admin.site.urls)]


@pytest.fixture
def published(tmp_path: Path, settings: Any) -> Path:
    """Two live processes (this one and pytest's parent), each with one busy pool."""
    write_published(tmp_path, os.getpid())
    write_published(tmp_path, os.getppid())
    settings.POOLED_BACKEND_STATS_DIR = str(tmp_path)
    return tmp_path


def logged_in(django_user_model: Any, *, staff: bool, active: bool = True) -> Client:
    user = django_user_model.objects.create_user(
        "staff" if staff else "visitor", password="x", is_staff=staff, is_active=active
    )
    client = Client()
    client.force_login(user)
    return client


# -- who gets them ---------------------------------------------------------------


def test_urls_are_named_in_their_namespace() -> None:
    assert reverse("django_pooled_backend:pools") == PAGE
    assert reverse("django_pooled_backend:pools_data") == DATA


def test_anonymous_users_are_sent_to_the_admin_login(client: Client) -> None:
    response = client.get(PAGE)
    assert response.status_code == 302
    assert response["Location"] == LOGIN


@pytest.mark.django_db
def test_users_who_are_not_staff_are_sent_to_the_admin_login(django_user_model: Any) -> None:
    response = logged_in(django_user_model, staff=False).get(PAGE)
    assert response.status_code == 302
    assert response["Location"] == LOGIN


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("staff", "active"), [(False, True), (True, False)], ids=["not staff", "inactive staff"]
)
def test_the_json_refuses_users_who_are_not_active_staff(
    django_user_model: Any, published: Path, staff: bool, active: bool
) -> None:
    response = logged_in(django_user_model, staff=staff, active=active).get(DATA)
    assert response.status_code == 403
    assert response.json() == {
        "error": "Log in to the admin site as a staff user to see the connection pools."
    }


def test_the_json_refuses_anonymous_users(client: Client, published: Path) -> None:
    response = client.get(DATA)
    assert response.status_code == 403
    assert response.json() == {
        "error": "Log in to the admin site as a staff user to see the connection pools."
    }


# -- what staff get ----------------------------------------------------------------


@pytest.mark.django_db
def test_staff_get_the_page_in_the_admin_with_its_own_script_and_style(
    admin_client: Client, published: Path
) -> None:
    response = admin_client.get(PAGE)
    assert response.status_code == 200
    assert "django_pooled_backend/pools.html" in [t.name for t in response.templates]
    html = response.content.decode()
    assert "<h1>Connection pools</h1>" in html
    assert 'href="/admin/">Home</a>' in html  # the admin's header and breadcrumbs
    assert f'data-url="{DATA}"' in html
    assert 'data-refresh-ms="1000"' in html
    assert 'data-history-seconds="300"' in html
    assert '<script src="/static/django_pooled_backend/pools.js" defer>' in html
    assert 'href="/static/django_pooled_backend/pools.css"' in html
    assert response["Cache-Control"].startswith("max-age=0")


@pytest.mark.django_db
def test_the_page_says_why_it_stays_empty_when_its_script_is_not_served(
    admin_client: Client, published: Path
) -> None:
    # Plain gunicorn serves no static files: pools.js never runs, and the page
    # must not stay on "Loading the pools..." without a reason.  The script
    # removes this message when it runs (test_admin_pools_live.py).
    html = admin_client.get(PAGE).content.decode()
    message = re.search(r'<p id="pools-script-missing" class="errornote">(.*?)</p>', html)
    assert message is not None
    text = re.sub(r"<[^>]+>", "", message.group(1))
    assert "the static files are not served" in text
    assert "/static/django_pooled_backend/pools.js did not load" in text
    assert "manage.py collectstatic" in text
    assert "manage.py poolstats shows the same figures" in text
    script = (PACKAGE / "static" / "django_pooled_backend" / "pools.js").read_text()
    assert 'getElementById("pools-script-missing")' in script


@pytest.mark.django_db
def test_the_page_loads_nothing_from_another_site(admin_client: Client, published: Path) -> None:
    html = admin_client.get(PAGE).content.decode()
    loaded = re.findall(r'<(?:script|link|img)\b[^>]*?(?:src|href)="([^"]*)"', html)
    assert loaded
    assert all(url.startswith("/") and not url.startswith("//") for url in loaded), loaded
    for name in ("pools.js", "pools.css"):
        text = (PACKAGE / "static" / "django_pooled_backend" / name).read_text()
        # The SVG namespace is a name, not an address the browser fetches.
        addresses = set(re.findall(r"\w+://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not addresses, (name, addresses)
        assert "@import" not in text
        assert "url(" not in text


@pytest.mark.django_db
def test_the_json_is_the_poolstats_json_document(admin_client: Client, published: Path) -> None:
    response = admin_client.get(DATA)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"].startswith("max-age=0")
    out = StringIO()
    call_command("poolstats", "--json", stdout=out)
    expected = json.loads(out.getvalue())
    data = response.json()
    for document in (data, expected):
        del document["time"]
        for process in document["processes"]:
            del process["age_s"]
    assert data == expected
    assert data["version"] == 1
    assert [p["pid"] for p in data["processes"]] == sorted([os.getpid(), os.getppid()])
    assert data["totals"][0]["lent"] == 8
    assert len(data["problems"]) == 4


@pytest.mark.django_db
def test_neither_page_nor_json_shows_credentials(
    admin_client: Client, tmp_path: Path, settings: Any
) -> None:
    # This process' own pool, published where the views read.
    connection.ensure_connection()
    settings.POOLED_BACKEND_STATS_DIR = str(tmp_path)
    stats.Publisher(tmp_path, 1.0).publish()
    password = django_settings.DATABASES["default"]["PASSWORD"]
    assert password
    data = admin_client.get(DATA)
    page = admin_client.get(PAGE)
    assert data.status_code == page.status_code == 200
    (process,) = data.json()["processes"]
    assert [pool["alias"] for pool in process["pools"]] == ["default"]
    assert "password" not in data.content.decode().lower()
    for response in (data, page):
        text = response.content.decode()
        assert password not in text
        assert "postgres://" not in text
        assert "postgresql://" not in text


@pytest.mark.django_db
def test_without_published_statistics_the_page_and_json_say_why(
    admin_client: Client, settings: Any
) -> None:
    settings.POOLED_BACKEND_STATS_DIR = None
    message = "Pool statistics are not published: settings.POOLED_BACKEND_STATS_DIR is None."
    page = admin_client.get(PAGE)
    assert page.status_code == 200
    assert message in page.content.decode()
    assert 'id="pools"' not in page.content.decode()
    data = admin_client.get(DATA)
    assert data.status_code == 503
    assert data.json()["error"].startswith(message)

    settings.POOLED_BACKEND_STATS_DIR = 5
    data = admin_client.get(DATA)
    assert data.status_code == 503
    assert (
        "settings.POOLED_BACKEND_STATS_DIR is 5: it must be a directory path"
        in (data.json()["error"])
    )


def test_the_page_polls_at_the_publishing_interval_but_not_faster_than_half_a_second(
    settings: Any,
) -> None:
    settings.POOLED_BACKEND_STATS_INTERVAL = 2
    assert views.refresh_seconds() == 2.0
    settings.POOLED_BACKEND_STATS_INTERVAL = 0.1
    assert views.refresh_seconds() == 0.5
    settings.POOLED_BACKEND_STATS_INTERVAL = "often"  # system check E005 reports it
    assert views.refresh_seconds() == 1.0


# -- the admin index ---------------------------------------------------------------


@pytest.mark.django_db
def test_the_admin_index_links_to_the_page(admin_client: Client) -> None:
    html = admin_client.get("/admin/").content.decode()
    link = re.search(r'<div class="[^"]*" id="pools-link">.*?</div>', html, re.DOTALL)
    assert link is not None
    assert f'<a href="{PAGE}">Connection pools</a>' in link.group(0)
    assert 'class="app-auth module' in html  # the applications are still listed


@pytest.mark.django_db
@pytest.mark.urls("tests.test_admin_pools")
def test_the_admin_index_has_no_link_when_the_page_is_not_mounted(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin.site, "index_template", "django_pooled_backend/admin_index.html")
    response = admin_client.get("/admin/")
    assert response.status_code == 200
    assert "django_pooled_backend/admin_index.html" in [t.name for t in response.templates]
    html = response.content.decode()
    assert "pools-link" not in html
    assert 'class="app-auth module' in html


# -- the distribution ----------------------------------------------------------------


def test_package_data_ships_every_template_and_static_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["django_pooled_backend"]
    shipped = {p for pattern in patterns for p in PACKAGE.glob(pattern)}
    folders = (PACKAGE / "templates", PACKAGE / "static")
    needed = {p for folder in folders for p in folder.rglob("*") if p.is_file()}
    assert needed
    assert needed <= shipped, sorted(str(p) for p in needed - shipped)
