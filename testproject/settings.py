"""Settings of the testproject: a small real Django project on the pooled ENGINE.

The database comes from ``DATABASE_URL`` (read with django-environ), and
importing these settings starts nothing: the test suite (its plugin
``tests/database_server.py``), the demo and ``bench/`` start the embedded
PostgreSQL server of ``testproject/pgserver.py`` when ``DATABASE_URL`` is not
set, and set it.  For ``manage.py`` by hand::

    export DATABASE_URL=$(python -m testproject.pgserver url --database testproject)

Pool options can be tuned from the environment for the demo and bench/.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import environ

import django_pooled_backend.environ as environ_scheme  # registers postgres+pool://

BASE_DIR = Path(__file__).resolve().parent
env = environ.Env()

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="testproject-not-secret")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_pooled_backend",
    "testproject.shop",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "testproject.urls"
WSGI_APPLICATION = "testproject.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

_pool = {
    "min_size": env.int("POOL_MIN_SIZE", default=1),
    "max_size": env.int("POOL_MAX_SIZE", default=10),
    "timeout": env.float("POOL_TIMEOUT", default=10.0),
    "max_idle_lent": env.float("POOL_MAX_IDLE_LENT", default=5.0),
    # POOL_RELEASE=transaction runs the project (and the test suite) with
    # transaction-scoped release.
    "release": env.str("POOL_RELEASE", default="request"),
}
# Without DATABASE_URL, a host that cannot resolve and says why.
_url = env.str("DATABASE_URL", default="postgres://DATABASE_URL-is-not-set.invalid/testproject")
# TESTPROJECT_ENGINE lets bench/ run the same project on Django's stock
# backend, with TESTPROJECT_DJANGO_POOL=1 on its own pool.
_engine = env.str("TESTPROJECT_ENGINE", default="django_pooled_backend")
if _engine == "django_pooled_backend":
    # The URL scheme of django_pooled_backend.environ: pool options in the
    # query string, validated when the URL is read.
    if not _url.startswith(environ_scheme.SCHEMES):
        _url = "postgres+pool" + _url[_url.index("://") :]
        _url += ("&" if "?" in _url else "?") + urlencode(
            {f"pool_{key}": value for key, value in _pool.items()}
        )
    _default = env.db_url_config(_url)
else:
    _default = env.db_url_config(_url, engine=_engine)
    if env.bool("TESTPROJECT_DJANGO_POOL", default=False):
        # Django's own pool, with the options it shares with ours.
        _default.setdefault("OPTIONS", {})["pool"] = {
            key: _pool[key] for key in ("min_size", "max_size", "timeout")
        }
DATABASES = {"default": _default}

# Where the processes publish their pool statistics for `manage.py poolstats`
# (default: a per-user temporary directory scoped to this project); the tests
# give each gunicorn they start a directory of its own.
if env.str("POOLSTATS_DIR", default=""):
    POOLED_BACKEND_STATS_DIR = env.str("POOLSTATS_DIR")
POOLED_BACKEND_STATS_INTERVAL = env.float("POOLSTATS_INTERVAL", default=1.0)


DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_pooled_backend": {
            "handlers": ["console"],
            "level": env.str("POOL_LOG_LEVEL", default="WARNING"),
        },
        # Server errors with their traceback on stderr (the demo and the
        # tests' gunicorn), not only to the (absent) admins by mail.
        "django.request": {"handlers": ["console"], "level": "ERROR"},
    },
}
