from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from messaging import tokens


class Command(BaseCommand):
    help = "Development only: create an admin (generated password) if none exists; print the login and a new token."

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError("dev_setup runs only with PEGASUS_DEBUG=1.")
        user_model = get_user_model()
        admin = user_model.objects.filter(is_superuser=True).order_by("pk").first()
        self.stdout.write("Console:   http://127.0.0.1:8000/console/")
        if admin is None:
            password = secrets.token_urlsafe(12)
            admin = user_model.objects.create_superuser(username="admin", email="", password=password)
            self.stdout.write(f"Login:     admin / {password}")
        else:
            self.stdout.write(f"Login:     {admin.get_username()} / (the password printed when it was created)")
        # Only token hashes are stored, so each run prints a fresh token.
        self.stdout.write(f"API token: {tokens.create_token(user=admin, name='make-run')}")
