from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_console__sends_csp_and_refuses_framing(client, alice):
    client.force_login(alice)
    response = client.get("/console/")
    assert response.status_code == 200
    csp = response["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert "frame-ancestors 'none'" in csp
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"


def test_console__login_page_has_the_headers_too(client):
    response = client.get("/console/login/")
    assert "Content-Security-Policy" in response and response["X-Frame-Options"] == "DENY"


def test_console__refuses_non_staff(client, bob):
    client.force_login(bob)
    response = client.get("/console/")
    assert response.status_code == 302 and "/console/login/" in response["Location"]


def test_console__post_without_csrf_token_is_refused(alice):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    response = strict.post("/console/logout/")
    assert response.status_code == 403
