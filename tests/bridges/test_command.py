"""`manage.py run_bridges`: the same supervisor in the foreground, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from messaging.bridges import services
from messaging.bridges.models import BridgeState

from .test_two_servers import ROOT, _source_database_url


class _Target(BaseHTTPRequestHandler):
    """The publish endpoint of a target server, reduced to what a bridge needs."""

    bodies: list[str] = []

    def do_POST(self) -> None:
        messages = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"]
        type(self).bodies += [m["body"] for m in messages]
        answer = json.dumps({"messages": [{"id": str(n), "duplicate": False} for n in range(len(messages))]})
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.django_db(transaction=True)
def test_run_bridges__forwards_until_sigterm(queue_factory, publish, settings, tmp_path: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Target)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target_url = f"http://127.0.0.1:{server.server_address[1]}"
    settings.PEGASUS_BRIDGES = {**settings.PEGASUS_BRIDGES, "TARGETS": [target_url]}
    queue = queue_factory(name="outbox")
    bridge = services.create_bridge(name="cmd", source_name="outbox", target_url=target_url, target_name="inbox",
                                    target_token="pgs_t")  # fmt: skip
    publish(queue, "a", "b", "c")
    env = {**os.environ, "DATABASE_URL": _source_database_url(), "PYTHONPATH": str(ROOT),
           "PEGASUS_BRIDGE_TARGETS": target_url}  # fmt: skip
    log = (tmp_path / "run_bridges.log").open("wb")
    command = subprocess.Popen([sys.executable, "manage.py", "run_bridges"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(_Target.bodies) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        while BridgeState.objects.get(pk=bridge.pk).forwarded_count < 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # the ack and the count follow the target's answer
        command.send_signal(signal.SIGTERM)
        assert command.wait(30) == 0
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
        server.shutdown()
        log.close()
    assert _Target.bodies == ["a", "b", "c"]
    assert BridgeState.objects.get(pk=bridge.pk).forwarded_count == 3
