"""Bridges: forward a local queue or durable subscription to a queue or topic of another
Pegasus server, store and forward, once and only once across an unreliable link (docs/bridges.md).

Modules: models (Bridge, BridgeState), conf (settings, allowed targets), services (create,
update, delete, status), link (the outbound HTTP call), bridge (the forwarding loop), locks (one
runner per bridge), runner (where it runs), admin, api.
"""
