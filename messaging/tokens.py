"""API tokens: random, shown once, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
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
    return issue_token(user=user, name=name, expires_at=expires_at)[1]


def issue_token(*, user: Any, name: str = "default", expires_at: datetime | None = None) -> tuple[ApiToken, str]:
    """Create a token; return its row and the raw token (shown once, stored only hashed)."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken.objects.create(
        user=user, name=name, key_hash=hash_token(raw), prefix=raw[:10], expires_at=expires_at
    )
    return row, raw


def authenticate(raw: str | None) -> Any | None:
    """The active user of a valid, unexpired, unrevoked token, or None."""
    token = authenticate_token(raw)
    if token is None:
        return None
    token.user.api_token_id = token.pk  # type: ignore[attr-defined]  # for per-token limits (token_key)
    return token.user


# Authenticated tokens are remembered for this long per process, so a busy client costs no
# query per request. A revocation made in this process takes effect at once (revoke() forgets
# every entry); one made by another process, or a user deactivated meanwhile, within this many
# seconds, as for live connections (session.TokenWatch). Expiry is checked on every use.
CACHE_SECONDS = float(os.environ.get("PEGASUS_TOKEN_CACHE_SECONDS", "1"))
_cache: dict[str, tuple[float, Any, datetime | None]] = {}  # raw token -> (fetched, user, expires_at)
_cache_lock = threading.Lock()


def cached_user(raw: str | None) -> Any | None:
    """The user of a token authenticated less than CACHE_SECONDS ago (and not expired since),
    or None: then call authenticate_and_remember (it queries the database)."""
    if not raw or CACHE_SECONDS <= 0:
        return None
    entry = _cache.get(raw)
    if entry is None:
        return None
    fetched, user, expires_at = entry
    if time.monotonic() - fetched > CACHE_SECONDS or (expires_at is not None and expires_at <= clock.now()):
        return None
    return user


def authenticate_and_remember(raw: str | None) -> Any | None:
    """authenticate(), remembering a success for CACHE_SECONDS (failures are not remembered,
    so a token created a moment ago works at once)."""
    token = authenticate_token(raw)
    if token is None:
        return None
    user = token.user
    user.api_token_id = token.pk  # type: ignore[attr-defined]  # for per-token limits (token_key)
    if CACHE_SECONDS > 0 and raw:
        with _cache_lock:
            if len(_cache) > 10_000:  # many distinct tokens: start again rather than grow
                _cache.clear()
            _cache[raw] = (time.monotonic(), user, token.expires_at)
    return user


def forget_cached() -> None:
    with _cache_lock:
        _cache.clear()


def forget_on_change(**kwargs: Any) -> None:
    """Signal receiver (messaging/apps.py): a token or user was saved or deleted."""
    forget_cached()


def token_key(user: Any) -> str:
    """The key per-token limits are kept under: the token the user authenticated with."""
    return f"token:{getattr(user, 'api_token_id', None) or f'user-{user.pk}'}"


def ensure_user(username: str, *, admin: bool = False) -> Any:
    user_model = get_user_model()
    user, _ = user_model.objects.get_or_create(username=username)
    if admin and not (user.is_superuser and user.is_staff):
        user.is_superuser = True
        user.is_staff = True
        user.save(update_fields=["is_superuser", "is_staff"])
    return user


def revoke(*, token_ids: list[int]) -> int:
    """Revoke tokens: refused from now on; live connections using them close within seconds."""
    forget_cached()
    return ApiToken.objects.filter(pk__in=token_ids, revoked_at__isnull=True).update(revoked_at=clock.now())


def is_active(token_id: int) -> bool:
    """Is this token still good (not revoked, not expired)? Live connections re-check this."""
    now = clock.now()
    return (
        ApiToken.objects.filter(pk=token_id, revoked_at__isnull=True, user__is_active=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .exists()
    )


def active_ids(token_ids: set[int]) -> set[int]:
    """Which of these tokens are still good (live connections re-check theirs with this)."""
    now = clock.now()
    return set(
        ApiToken.objects.filter(pk__in=token_ids, revoked_at__isnull=True, user__is_active=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .values_list("pk", flat=True)
    )


def authenticate_token(raw: str | None) -> ApiToken | None:
    """The valid token row (with its user) for a raw token, or None."""
    if not raw or len(raw) > 200:
        return None
    now = clock.now()
    token = (
        ApiToken.objects.select_related("user")
        .filter(key_hash=hash_token(raw), revoked_at__isnull=True, user__is_active=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .first()
    )
    return token
