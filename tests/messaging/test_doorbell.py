"""messaging.doorbell: a pusher's standing Listener, waited on once per message it is handed.

No database: the doorbell lives in process memory.
"""

from __future__ import annotations

import asyncio
import threading
import time

from messaging.doorbell import Doorbell


async def test_wait__a_ring_before_the_wait_answers_at_once() -> None:
    bell = Doorbell()
    listener = bell.listen([1])
    bell.ring([1])
    assert await asyncio.wait_for(listener.wait(30), 1) is True
    listener.close()


async def test_wait__a_ring_from_another_thread_wakes_it() -> None:
    bell = Doorbell()
    listener = bell.listen([1])
    threading.Timer(0.05, bell.ring, args=([1],)).start()
    started = time.monotonic()
    assert await listener.wait(30) is True
    assert time.monotonic() - started < 5
    listener.close()


async def test_wait__a_ring_of_another_queue_does_not() -> None:
    bell = Doorbell()
    listener = bell.listen([1])
    bell.ring([2])
    assert await listener.wait(0.05) is False
    listener.close()


async def test_wait__times_out_unrung() -> None:
    bell = Doorbell()
    listener = bell.listen([1])
    started = time.monotonic()
    assert await listener.wait(0.05) is False
    assert time.monotonic() - started >= 0.04
    listener.close()


async def test_wait__ends_when_unless_is_done_and_leaves_no_callback_on_it() -> None:
    bell = Doorbell()
    listener = bell.listen([1])
    handed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.05, handed.set_result, "messages")
    started = time.monotonic()
    assert await listener.wait(30, unless=handed) is False
    assert time.monotonic() - started < 5
    already: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    already.set_result("messages")
    assert await listener.wait(30, unless=already) is False
    pending: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    assert await listener.wait(0.01, unless=pending) is False
    pending.set_result("late")  # the finished wait's callback is gone: nothing runs for it
    await asyncio.sleep(0)
    listener.close()


async def test_wait__runs_no_task_of_its_own() -> None:
    """A pusher waits once per message: the wait is a future and a timer, not tasks."""
    bell = Doorbell()
    listener = bell.listen([1])
    waiting = asyncio.ensure_future(listener.wait(30))
    await asyncio.sleep(0.01)
    assert asyncio.all_tasks() == {asyncio.current_task(), waiting}
    bell.ring([1])
    assert await asyncio.wait_for(waiting, 1) is True
    listener.close()


async def test_wait__cancelled_leaves_the_listener_usable() -> None:
    bell = Doorbell()
    listener = bell.listen([1])
    waiting = asyncio.ensure_future(listener.wait(30))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    listener.clear()
    threading.Timer(0.02, bell.ring, args=([1],)).start()
    assert await asyncio.wait_for(listener.wait(30), 5) is True
    listener.close()


async def test_clear__forgets_an_earlier_ring() -> None:
    bell = Doorbell()
    listener = bell.listen([1])
    bell.ring([1])
    await asyncio.sleep(0.01)  # the wake-up it scheduled has run
    listener.clear()
    assert listener.rung is False
    assert await listener.wait(0.05) is False
    listener.close()
