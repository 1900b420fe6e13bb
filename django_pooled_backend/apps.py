"""The app part of the package: system checks and management commands."""

from __future__ import annotations

from django.apps import AppConfig


class PooledBackendConfig(AppConfig):
    name = "django_pooled_backend"
    verbose_name = "Pooled PostgreSQL backend"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks
