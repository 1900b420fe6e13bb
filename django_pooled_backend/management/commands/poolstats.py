"""``manage.py poolstats``: the live pools of this project's running processes."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_pooled_backend import poolstats, serverview
from django_pooled_backend.checks import ENGINE, pooled_aliases

CLEAR_SCREEN = "\x1b[H\x1b[2J"


def prometheus_render() -> Callable[[poolstats.Report], str]:
    """:func:`django_pooled_backend.prometheus.render`, or a CommandError saying what to install."""
    try:
        from django_pooled_backend.prometheus import render
    except ImportError:
        raise CommandError(
            '--prometheus needs prometheus_client: pip install "django-pooled-backend[prometheus]".'
        ) from None
    return render


class Command(BaseCommand):
    help = (
        "Show the connection pools of this project's running processes on this host "
        "(every gunicorn or Celery worker), or with --server the database server's view."
    )
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", metavar="ALIAS", help="Only this database alias.")
        parser.add_argument("--json", action="store_true", help="Print a JSON document.")
        parser.add_argument(
            "--prometheus", action="store_true", help="Print the Prometheus text format."
        )
        parser.add_argument(
            "--watch",
            type=watch_seconds,
            metavar="SECONDS",
            help=f"Refresh every SECONDS (more than 0, at most {MAX_WATCH:g}) until Ctrl-C.",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="Exit with status 1 if a pool is exhausted, a request waits longer than "
            "--max-wait, or a process stopped publishing.",
        )
        parser.add_argument(
            "--max-wait",
            type=max_wait_seconds,
            metavar="SECONDS",
            help="With --check: the longest acceptable wait "
            f"(default {poolstats.DEFAULT_MAX_WAIT:g}).",
        )
        parser.add_argument(
            "--server",
            action="store_true",
            help="Show the server's connections (pg_stat_activity), per host, process and alias.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        alias: str | None = options["database"]
        validate_flags(options)
        if alias is not None:
            validate_alias(alias)
        max_wait = options["max_wait"]
        max_wait = poolstats.DEFAULT_MAX_WAIT if max_wait is None else max_wait
        directory = None if options["server"] else stats_directory()

        def render() -> str:
            if directory is None:
                return self.server_view(alias, as_json=options["json"])
            return poolstats.render_text(poolstats.load(directory, alias), max_wait)

        if options["watch"] is not None:
            self.watch(render, options["watch"])
        elif directory is None:
            self.stdout.write(render(), ending="")
        else:
            report = poolstats.load(directory, alias)
            if options["json"]:
                self.stdout.write(poolstats.render_json(report, max_wait), ending="")
            elif options["prometheus"]:
                self.stdout.write(prometheus_render()(report), ending="")
            else:
                self.stdout.write(poolstats.render_text(report, max_wait), ending="")
            if options["check"]:
                check(report, max_wait)

    def watch(self, render: Callable[[], str], seconds: float) -> None:
        """Print ``render()`` every ``seconds`` until Ctrl-C."""
        try:
            while True:
                text = render()
                if self.stdout.isatty():
                    self.stdout.write(CLEAR_SCREEN, ending="")
                self.stdout.write(text, ending="")
                self.stdout.write(f"(every {seconds:g}s; Ctrl-C to stop)\n")
                self.stdout.flush()
                time.sleep(seconds)
        except KeyboardInterrupt:
            return

    def server_view(self, alias: str | None, as_json: bool) -> str:
        aliases = [alias] if alias is not None else pooled_aliases()
        if not aliases:
            raise CommandError(
                f"No alias in settings.DATABASES uses ENGINE {ENGINE!r}: there is no pooled "
                "database server to look at."
            )
        try:
            views = serverview.collect(aliases)
        except serverview.Unreachable as exc:
            raise CommandError(str(exc)) from exc
        return serverview.render_json(views) if as_json else serverview.render_text(views)


def check(report: poolstats.Report, max_wait: float) -> None:
    """``--check``: raise CommandError (exit status 1) naming the first problem."""
    if not report.live and not report.stale:
        raise CommandError(poolstats.nothing_published(report))
    found = poolstats.problems(report, max_wait)
    if found:
        count = f"{len(found)} problem{'s' if len(found) > 1 else ''}"
        raise CommandError(f"poolstats --check found {count}; the first: {found[0]}")


def validate_flags(options: dict[str, Any]) -> None:
    """Refuse flags that contradict each other, with a one-line CommandError."""
    if options["json"] and options["prometheus"]:
        raise CommandError("--json and --prometheus cannot be used together: choose one format.")
    if options["watch"] is not None:
        for flag in ("json", "prometheus", "check"):
            if options[flag]:
                raise CommandError(
                    f"--watch refreshes the text view; it cannot be combined with --{flag}."
                )
    if options["max_wait"] is not None and not options["check"]:
        raise CommandError("--max-wait only applies with --check.")
    if options["server"]:
        for flag in ("prometheus", "check"):
            if options[flag]:
                raise CommandError(
                    f"--server shows the server's connections as text or --json; it cannot be "
                    f"combined with --{flag}."
                )


MAX_WATCH = 3600.0
"""The longest ``--watch`` interval: beyond, ``time.sleep()`` overflows or nothing is watched."""


def watch_seconds(text: str) -> float:
    """``--watch``: a finite number of seconds, more than 0 and at most an hour."""
    value = _seconds(text, "--watch")
    if not 0 < value <= MAX_WATCH:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds more than 0 and at most {MAX_WATCH:g}; "
            "use for example --watch 2."
        )
    return value


def max_wait_seconds(text: str) -> float:
    """``--max-wait``: a finite number of seconds, 0 or more."""
    value = _seconds(text, "--max-wait")
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds of 0 or more; use for example --max-wait 5."
        )
    return value


def _seconds(text: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite number of seconds; use for example {flag} 2."
        )
    return value


def validate_alias(alias: str) -> None:
    """Refuse an alias that is not in DATABASES or has no pool of ours."""
    if alias not in settings.DATABASES:
        known = ", ".join(repr(a) for a in settings.DATABASES) or "none"
        raise CommandError(
            f"The database alias {alias!r} is not in settings.DATABASES (its aliases: {known})."
        )
    config = settings.DATABASES[alias]
    engine = config.get("ENGINE")
    if engine != ENGINE:
        raise CommandError(
            f"The database alias {alias!r} uses ENGINE {engine!r}, not {ENGINE!r}: it has no "
            "pool to show."
        )
    if (config.get("OPTIONS") or {}).get("pool", True) in (False, None):
        raise CommandError(
            f"The database alias {alias!r} sets OPTIONS['pool'] to False: it has no pool to "
            "show. Remove that option to pool its connections."
        )


def stats_directory() -> Path:
    """The directory the processes publish in, or a CommandError saying why there is none."""
    try:
        return poolstats.stats_directory()
    except poolstats.NotPublished as exc:
        raise CommandError(str(exc)) from None
