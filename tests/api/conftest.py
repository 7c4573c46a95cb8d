"""REST test helpers: an HTTP client per persona (alice admin, bob member, anonymous)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client


class Api:
    """A Django test client for /api/v1 that sends JSON and a bearer token."""

    def __init__(self, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = Client(headers=headers)

    def _url(self, path: str) -> str:
        return "/api/v1" + path

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(self._url(path), params)

    def delete(self, path: str) -> Any:
        return self.client.delete(self._url(path))

    def post(self, path: str, json: Any = None, *, raw: str | bytes | None = None) -> Any:
        if raw is not None:
            return self.client.post(self._url(path), raw, content_type="application/json")
        if json is None:
            return self.client.post(self._url(path), b"", content_type="application/json")
        return self.client.post(self._url(path), json, content_type="application/json")


@pytest.fixture
def api_for(token_for: Callable[[Any], str]) -> Callable[[Any], Api]:
    return lambda user: Api(token_for(user) if user is not None else None)


@pytest.fixture
def admin_api(alice: Any, api_for: Callable[[Any], Api]) -> Api:
    return api_for(alice)


@pytest.fixture
def user_api(bob: Any, grant: Callable[..., Any], api_for: Callable[[Any], Api]) -> Api:
    """bob, who may send to and consume from everything (and do nothing else)."""
    grant(bob, "#", "send", "consume")
    return api_for(bob)


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    return str(body["error"]["code"])


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    """The personas have passwords; PBKDF2 would spend most of each test hashing them."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
