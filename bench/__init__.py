"""Pegasus benchmarks: `make bench` (full) and `make bench-smoke` (seconds long, for CI)."""

from __future__ import annotations
