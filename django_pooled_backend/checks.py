"""System checks (``manage.py check``), ids ``django_pooled_backend.E0xx``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from .options import parse_pool_options

ENGINE = "django_pooled_backend"


def pooled_aliases() -> list[str]:
    """The aliases in DATABASES that use this ENGINE."""
    return [alias for alias, config in settings.DATABASES.items() if config.get("ENGINE") == ENGINE]


@checks.register()
def check_pool_options(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Every pooled alias has valid pool options and no persistent connections."""
    errors: list[checks.CheckMessage] = []
    for alias in pooled_aliases():
        config = settings.DATABASES[alias]
        raw = (config.get("OPTIONS") or {}).get("pool", True)
        if raw is False or raw is None:
            continue
        try:
            parse_pool_options(alias, raw)
        except ImproperlyConfigured as exc:
            errors.append(
                checks.Error(
                    str(exc),
                    hint="See the 'Configuration' page of the django-pooled-backend docs.",
                    id="django_pooled_backend.E001",
                )
            )
        max_age = config.get("CONN_MAX_AGE", 0)
        if max_age != 0:
            errors.append(
                checks.Error(
                    f"DATABASES[{alias!r}]['CONN_MAX_AGE'] is {max_age!r}; the pool keeps "
                    "server connections open itself.",
                    hint="Set CONN_MAX_AGE to 0 (the default), or set OPTIONS['pool'] to "
                    "False to use persistent connections instead of the pool.",
                    id="django_pooled_backend.E002",
                )
            )
    return errors


@checks.register()
def check_stats_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """POOLED_BACKEND_STATS_DIR and POOLED_BACKEND_STATS_INTERVAL have usable values."""
    from .stats import configured_directory, configured_interval

    errors: list[checks.CheckMessage] = []
    for read in (configured_directory, configured_interval):
        try:
            read()
        except ImproperlyConfigured as exc:
            errors.append(
                checks.Error(
                    str(exc),
                    hint="See the 'poolstats' page of the django-pooled-backend docs.",
                    id="django_pooled_backend.E003",
                )
            )
    return errors
