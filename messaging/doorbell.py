"""In-process wake-ups for waiting consumers (REST long polls, WebSocket pushers).

The database is the truth; the doorbell only says "look again". `ring()` may be called from any
thread (on_commit callbacks run in sync worker threads); waiters are asyncio futures woken on
their own loop. A ring nobody hears is harmless: waiters also re-check on a timer.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Iterable


class Doorbell:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, set[asyncio.Future[None]]] = defaultdict(set)

    def ring(self, queue_ids: Iterable[int]) -> None:
        with self._lock:
            futures = [f for qid in queue_ids for f in self._waiters.pop(qid, ())]
        for future in futures:
            loop = future.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future)

    async def wait(self, queue_ids: Iterable[int], timeout: float) -> bool:
        """Wait until one of these queues is rung or `timeout` passes; True if rung."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ids = list(queue_ids)
        with self._lock:
            for qid in ids:
                self._waiters[qid].add(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            with self._lock:
                for qid in ids:
                    waiting = self._waiters.get(qid)
                    if waiting is not None:
                        waiting.discard(future)
                        if not waiting:
                            del self._waiters[qid]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


doorbell = Doorbell()
