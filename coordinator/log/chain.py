"""The hash chain: canonical bytes of a stored event, its hash, and verification.

hash(n) = SHA-256(hash(n-1) || canonical(n)), hash(0) = 32 zero bytes, where canonical(n) is
  seq, epoch (u64 BE), time_us (i64 BE), then stream, type, origin_host (each u32 BE length +
  UTF-8), origin_generation, origin_seq (u64 BE), then the payload (u32 BE length + bytes).
docs/log-format.md says the same for auditors who re-implement it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.log.canonical import SEQ_EPOCH, body_bytes, canonical
from coordinator.log.records import StoredEvent

__all__ = ["ZERO_HASH", "body_bytes", "canonical", "chain_hash", "event_hash", "link"]

ZERO_HASH = bytes(32)


def link(prev_hash: bytes, seq: int, epoch: int, body: bytes) -> bytes:
    """The chain hash of an event given its body: SHA-256(prev || seq || epoch || body)."""
    return hashlib.sha256(prev_hash + SEQ_EPOCH.pack(seq, epoch) + body).digest()


def chain_hash(prev_hash: bytes, canonical_bytes: bytes) -> bytes:
    return hashlib.sha256(prev_hash + canonical_bytes).digest()


def event_hash(prev_hash: bytes, e: StoredEvent) -> bytes:
    return link(prev_hash, e.seq, e.epoch, body_bytes(e))


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    events_checked: int
    head_seq: int
    head_hash: bytes
    first_bad_seq: int = 0
    problem: str = ""


def verify_chain(
    events: Iterable[StoredEvent], expect_seq: int = 0, expect_hash: bytes = b""
) -> VerifyResult:
    """Check seq continuity, prev_hash links and every hash; optionally an anchored head."""
    prev_seq, prev_hash, checked, anchor_seen = 0, ZERO_HASH, 0, not expect_seq

    def bad(seq: int, problem: str) -> VerifyResult:
        return VerifyResult(False, checked, prev_seq, prev_hash, seq, problem)

    for e in events:
        if e.seq != prev_seq + 1:
            return bad(prev_seq + 1, f"seq gap: expected {prev_seq + 1}, found {e.seq}")
        if e.prev_hash != prev_hash:
            return bad(e.seq, "prev_hash does not match the previous event's hash")
        digest = event_hash(prev_hash, e)
        if digest != e.hash:
            return bad(e.seq, "hash does not match the event's contents")
        if e.seq == expect_seq:
            if digest != expect_hash:
                return bad(e.seq, "the log does not extend the anchored head")
            anchor_seen = True
        prev_seq, prev_hash, checked = e.seq, digest, checked + 1
    if not anchor_seen:
        return bad(expect_seq, f"the anchored head seq {expect_seq} is missing (log truncated)")
    return VerifyResult(True, checked, prev_seq, prev_hash)
