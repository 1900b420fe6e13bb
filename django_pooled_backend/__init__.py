"""A Django database ENGINE for PostgreSQL with process-wide connection pooling.

Set ``ENGINE = "django_pooled_backend"`` and add ``"django_pooled_backend"``
to ``INSTALLED_APPS``.  See the documentation for the pool options.
"""

__version__ = "0.1.0.dev0"
