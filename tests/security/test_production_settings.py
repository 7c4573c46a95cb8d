"""Production refuses development defaults, and `check --deploy` is clean with the documented settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOOD_KEY = "k" * 20 + "Zq8#xV2!mP0$wL5^rT9&yB3*nH6(jF1)" + "s" * 10


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PEGASUS_")}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({}, "PEGASUS_SECRET_KEY"),
        ({"PEGASUS_SECRET_KEY": "short"}, "PEGASUS_SECRET_KEY"),
        ({"PEGASUS_SECRET_KEY": GOOD_KEY, "PEGASUS_ALLOWED_HOSTS": "*"}, "PEGASUS_ALLOWED_HOSTS"),
        ({"PEGASUS_SECRET_KEY": GOOD_KEY, "PEGASUS_ALLOWED_HOSTS": "*.example.com"}, "PEGASUS_ALLOWED_HOSTS"),
    ],
)
def test_production__refuses_development_defaults(env, complaint):
    result = _manage("check", PEGASUS_DEBUG="0", **env)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_production__check_deploy_reports_nothing():
    result = _manage(
        "check", "--deploy", "--fail-level", "WARNING",
        PEGASUS_DEBUG="0", PEGASUS_SECRET_KEY=GOOD_KEY, PEGASUS_ALLOWED_HOSTS="broker.example.com",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
