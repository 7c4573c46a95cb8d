from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from messaging import tokens


class Command(BaseCommand):
    help = "Create USERNAME if missing and print a new API token as the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--admin", action="store_true", help="make the user a superuser")
        parser.add_argument("--name", default="default", help="a name for the token")

    def handle(self, *args: Any, **options: Any) -> None:
        user = tokens.ensure_user(options["username"], admin=options["admin"])
        raw = tokens.create_token(user=user, name=options["name"])
        self.stdout.write(f"Token for {user.username}{' (admin)' if user.is_superuser else ''}:")
        self.stdout.write(raw)
