"""In-process wake-ups for waiting consumers (REST long polls, WebSocket pushers).

The database is the truth; the doorbell only says "look again". `ring()` may be called from any
thread (on_commit callbacks run in sync worker threads); waiters are asyncio futures woken on
their own loop. A ring nobody hears is harmless: waiters also re-check on a timer.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Collection, Iterable
from typing import Any


class Doorbell:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, set[asyncio.Future[None]]] = defaultdict(set)
        self._listeners: dict[int, set[Listener]] = defaultdict(set)

    def ring(self, queue_ids: Iterable[int], *, skip: Collection[Listener] = ()) -> None:
        """Wake everyone waiting on these queues (but the listeners in `skip`)."""
        with self._lock:
            ids = list(queue_ids)
            futures = [f for qid in ids for f in self._waiters.pop(qid, ())]
            listeners = [li for qid in ids for li in self._listeners.get(qid, ()) if li not in skip]
        for future in futures:
            loop = future.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future)
        for listener in listeners:
            listener._ring()

    def listen(self, queue_ids: Iterable[int]) -> Listener:
        """A standing waiter for these queues (a WebSocket pusher): cheaper than a `wait` per
        look, and it hears every ring between `clear()` and `wait()`. Close it when done."""
        listener = Listener(self, list(queue_ids), asyncio.get_running_loop())
        with self._lock:
            for qid in listener.queue_ids:
                self._listeners[qid].add(listener)
        return listener

    def _forget(self, listener: Listener) -> None:
        with self._lock:
            for qid in listener.queue_ids:
                listening = self._listeners.get(qid)
                if listening is not None:
                    listening.discard(listener)
                    if not listening:
                        del self._listeners[qid]

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


class Listener:
    """Rung (from any thread) since the last `clear()`? Used as: clear, look, wait if nothing."""

    def __init__(self, bell: Doorbell, queue_ids: list[int], loop: asyncio.AbstractEventLoop) -> None:
        self.queue_ids = queue_ids
        self._bell = bell
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None  # the wait in progress, on the loop
        self._rung = False  # set by any thread; a wake-up is scheduled only on its first ring

    def _ring(self) -> None:
        if not self._rung:
            self._rung = True
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)

    def clear(self) -> None:
        """Forget earlier rings: call before looking at the database. (A wake-up already on its
        way may still arrive: at worst one look too many, never one too few.)"""
        self._rung = False

    @property
    def rung(self) -> bool:
        """Rung since the last clear()?"""
        return self._rung

    async def wait(self, timeout: float, unless: asyncio.Future[Any] | None = None) -> bool:
        """Until rung since the last clear() (True), `timeout` passes or `unless` is done (False).

        One future and a timer, no task: a pusher waits once per message it is handed, and a
        task racing the hand-off with asyncio.wait cost two tasks and a handful of loop callbacks
        each time (docs/performance.md, item 30)."""
        if self._rung:
            return True
        if unless is not None and unless.done():
            return False
        woken: asyncio.Future[None] = self._loop.create_future()

        def wake(_: object = None) -> None:
            _resolve(woken)

        self._waiter = woken
        timer = self._loop.call_later(timeout, wake)
        if unless is not None:
            unless.add_done_callback(wake)
        try:
            await woken
        finally:
            self._waiter = None
            timer.cancel()
            if unless is not None:
                unless.remove_done_callback(wake)
        return self._rung

    def close(self) -> None:
        self._bell._forget(self)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


doorbell = Doorbell()
