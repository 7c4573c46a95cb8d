"""API tokens: random, shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Q

from messaging import clock
from messaging.models import ApiToken

TOKEN_PREFIX = "pgs_"


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()


def create_token(*, user: Any, name: str = "default", expires_at: datetime | None = None) -> str:
    """Create a token for `user` and return it; this is the only time it can be seen."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    ApiToken.objects.create(user=user, name=name, key_hash=hash_token(raw), prefix=raw[:10], expires_at=expires_at)
    return raw


def authenticate(raw: str | None) -> Any | None:
    """The active user of a valid, unexpired, unrevoked token, or None."""
    if not raw or len(raw) > 200:
        return None
    now = clock.now()
    token = (
        ApiToken.objects.select_related("user")
        .filter(key_hash=hash_token(raw), revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .first()
    )
    if token is None or not token.user.is_active:
        return None
    return token.user


def ensure_user(username: str, *, admin: bool = False) -> Any:
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(username=username)
    if admin and not (user.is_superuser and user.is_staff):
        user.is_superuser = True
        user.is_staff = True
        user.save(update_fields=["is_superuser", "is_staff"])
    return user
