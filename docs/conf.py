"""Sphinx configuration (built with warnings as errors: sphinx-build -W)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "django-pooled-backend"
author = "django-pooled-backend developers"
copyright = "2026, django-pooled-backend developers"
release = "0.1.0.dev0"

extensions = ["sphinx.ext.intersphinx"]
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
html_theme = "furo"
html_title = "django-pooled-backend"
exclude_patterns = ["_build"]
nitpicky = True
