"""The app part of the package: system checks and management commands."""

from __future__ import annotations

import importlib.util
import os

from django.apps import AppConfig


class PooledBackendConfig(AppConfig):
    name = "django_pooled_backend"
    verbose_name = "Pooled PostgreSQL backend"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and importlib.util.find_spec(
            "prometheus_client"
        ):
            # prometheus_client's multiprocess mode: every process publishes
            # its pools from its first connection on (docs/metrics.rst).
            from . import prometheus  # noqa: F401
