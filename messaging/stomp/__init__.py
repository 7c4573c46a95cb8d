"""STOMP 1.0, 1.1 and 1.2 over WebSocket at /ws/stomp/ (docs/stomp.md)."""

from __future__ import annotations
