"""STOMP over WebSocket with @stomp/stompjs 7 under Node (tests/js/stompjs_test.mjs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from messaging import broker

pytestmark = pytest.mark.django_db(transaction=True)
JS = Path(__file__).resolve().parents[1] / "js"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """npm ci once (CI does it before the suite; this covers a fresh checkout)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the stompjs tests (apt-get install nodejs npm)")
    if not (JS / "node_modules" / "@stomp" / "stompjs").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS, check=True, timeout=300)
    return JS / "node_modules"


def run(scenario: str, server: Any, token: str) -> None:
    env = {**os.environ, "PEGASUS_WS": server.ws, "PEGASUS_USER": "alice", "PEGASUS_TOKEN": token}
    done = subprocess.run(
        ["node", "stompjs_test.mjs", scenario], cwd=JS, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("scenario", "queues", "topics"),
    [
        ("send_receive_ack", ["js-orders"], []),
        ("nack_redelivers", ["js-nack"], []),
        ("prefetch_respected", ["js-prefetch"], []),
        ("durable_collects_while_away", [], ["js-news"]),
        ("transaction_commit_and_abort", ["js-tx"], []),
    ],
)
def test_stompjs(
    node_modules: Path, server: Any, admin_token: str, scenario: str, queues: list[str], topics: list[str]
) -> None:
    for name in queues:
        broker.create_queue(name=name)
    for name in topics:
        broker.create_topic(name=name)
    run(scenario, server, admin_token)
