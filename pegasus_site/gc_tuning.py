"""The garbage collector's settings for a server process (pegasus_site/asgi.py calls this)."""

from __future__ import annotations

import gc

# Allocations (less deallocations) between two young collections: Python's default is 700, and a
# 100-message publish or receive allocates thousands of short-lived objects.
YOUNG_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Keep the cyclic garbage collector off what lives as long as the process.

    Start-up leaves ~150,000 objects (Django, the apps, the URL conf, the schemas) that are never
    garbage, and every full collection walked them all: 75 ms with the GIL held, 18 times in an
    8-second non-durable publish stage, a sixth of its time (docs/performance.md). Frozen, they
    are never walked again: a full collection then took 8 ms. Cycles among them that become
    garbage later are never freed; start-up makes next to none."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)
