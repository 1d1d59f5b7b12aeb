"""Deterministic trace and span ids, so a restarted coordinator continues the same trace.

A migration's trace id and root span id derive from its id; phase spans from (migration, phase,
entry time); command spans from the command id. Nothing needs remembering across a restart.
"""

from __future__ import annotations

import hashlib


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def _nonzero(value: int) -> int:
    return value or 1  # an all-zero id is invalid in W3C trace context


def trace_id(migration_id: str) -> int:
    return _nonzero(int.from_bytes(_digest("whimbrel trace", migration_id)[:16], "big"))


def command_trace_id(command_id: str) -> int:
    """The trace of a command outside migrations (start or stop a VM)."""
    return _nonzero(int.from_bytes(_digest("whimbrel command trace", command_id)[:16], "big"))


def root_span_id(migration_id: str) -> int:
    return _nonzero(int.from_bytes(_digest("whimbrel migration", migration_id)[:8], "big"))


def phase_span_id(migration_id: str, phase: str, since_us: int) -> int:
    digest = _digest("whimbrel phase", migration_id, phase, str(since_us))
    return _nonzero(int.from_bytes(digest[:8], "big"))


def command_span_id(command_id: str) -> int:
    return _nonzero(int.from_bytes(_digest("whimbrel command", command_id)[:8], "big"))


def traceparent(trace: int, span: int) -> str:
    """W3C `traceparent` for a sampled span."""
    return f"00-{trace:032x}-{span:016x}-01"
