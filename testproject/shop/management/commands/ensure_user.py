"""``manage.py ensure_user NAME PASSWORD [--staff]``: a user for the demo and the browser tests."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Create the user NAME, or reset its password and flags; --staff makes it a superuser."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("password")
        parser.add_argument("--staff", action="store_true", help="Staff and superuser.")

    def handle(self, *args: Any, **options: Any) -> None:
        user, _ = get_user_model().objects.get_or_create(username=options["name"])
        user.set_password(options["password"])
        user.is_staff = user.is_superuser = options["staff"]
        user.is_active = True
        user.save()
