"""The live pool page of the Django admin, and the JSON document it polls.

Both views show what ``manage.py poolstats`` shows, read the same way
(:func:`django_pooled_backend.poolstats.load`); the JSON view returns the
``poolstats --json`` document itself.  Mount them under the admin, before
``admin.site.urls``, with :mod:`django_pooled_backend.urls`.

Only active staff users get them, as for the rest of the admin site: the
page sends everybody else to the admin's login page, the JSON answers 403.
The history the page's charts draw is kept by the browser, from one poll
to the next: the processes publish only their present state.
"""

from __future__ import annotations

from django.contrib import admin
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.cache import never_cache

from . import poolstats, stats

HISTORY_SECONDS = 300
"""How far back the page's charts go (the browser keeps the points)."""

MIN_REFRESH = 0.5
"""The page polls at the publishing interval, but not more often than this (seconds)."""


def refresh_seconds() -> float:
    """How often the page asks for new figures: the publishing interval, at least 0.5 s."""
    try:
        interval = stats.configured_interval()
    except ImproperlyConfigured:
        interval = stats.DEFAULT_INTERVAL  # system check E005 reports the setting
    return max(interval, MIN_REFRESH)


def pools(request: HttpRequest) -> HttpResponse:
    """The page: bars, waiters and charts, drawn by ``pools.js`` from :func:`pools_data`.

    Wrap it in ``admin.site.admin_view()`` (:mod:`django_pooled_backend.urls`
    does): that is what keeps it to staff users.
    """
    try:
        poolstats.stats_directory()
        error = ""
    except poolstats.NotPublished as exc:
        error = str(exc)
    context = {
        **admin.site.each_context(request),
        "title": "Connection pools",
        "data_url": reverse("django_pooled_backend:pools_data"),
        "refresh_ms": round(refresh_seconds() * 1000),
        "history_seconds": HISTORY_SECONDS,
        "history_minutes": HISTORY_SECONDS // 60,
        "wait_window": stats.WAIT_WINDOW,
        "error": error,
    }
    return TemplateResponse(request, "django_pooled_backend/pools.html", context)


@never_cache
def pools_data(request: HttpRequest) -> JsonResponse:
    """The ``poolstats --json`` document, for active staff users only (403 otherwise)."""
    if not admin.site.has_permission(request):
        return JsonResponse(
            {"error": "Log in to the admin site as a staff user to see the connection pools."},
            status=403,
        )
    try:
        directory = poolstats.stats_directory()
    except poolstats.NotPublished as exc:
        return JsonResponse({"error": str(exc)}, status=503)
    return JsonResponse(poolstats.as_json(poolstats.load(directory)))
