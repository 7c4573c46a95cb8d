"""Run the bridges of this database in the foreground (an alternative to running them inside
the server processes; set PEGASUS_BRIDGES_RUNNER=off for those then)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from messaging.bridges.runner import Supervisor


class Command(BaseCommand):
    help = "Forward every enabled bridge that no other process is forwarding; stops on SIGINT/SIGTERM."

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        self.stdout.write("Forwarding bridges; Ctrl-C stops.")
        Supervisor(stop).run_forever()
