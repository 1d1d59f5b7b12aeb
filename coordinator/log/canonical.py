"""Canonical bytes of an event's envelope and payload, the input of its chain hash.

Shared by the records (which compute an event's body when it is made) and the chain (which links
and verifies), so neither imports the other for it. The layout is in `coordinator.log.chain`'s
docstring and docs/log-format.md.
"""

from __future__ import annotations

import functools
import struct
from typing import Protocol


class Envelope(Protocol):
    """What the canonical bytes cover, beside seq and epoch."""

    @property
    def time_us(self) -> int: ...
    @property
    def stream(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def origin_host(self) -> str: ...
    @property
    def origin_generation(self) -> int: ...
    @property
    def origin_seq(self) -> int: ...
    @property
    def payload(self) -> bytes: ...


_HEAD = struct.Struct(">QQq")
_ORIGIN = struct.Struct(">QQ")
_LEN = struct.Struct(">I")


def canonical(
    seq: int,
    epoch: int,
    time_us: int,
    stream: str,
    type_: str,
    origin_host: str,
    origin_generation: int,
    origin_seq: int,
    payload: bytes,
) -> bytes:
    s, t, o = stream.encode(), type_.encode(), origin_host.encode()
    return b"".join(
        (
            _HEAD.pack(seq, epoch, time_us),
            _LEN.pack(len(s)),
            s,
            _LEN.pack(len(t)),
            t,
            _LEN.pack(len(o)),
            o,
            _ORIGIN.pack(origin_generation, origin_seq),
            _LEN.pack(len(payload)),
            payload,
        )
    )


SEQ_EPOCH = struct.Struct(">QQ")
_TIME = struct.Struct(">q")
_ORIGIN_AND_LEN = struct.Struct(">QQI")


@functools.lru_cache(maxsize=8192)
def _names(stream: str, type_: str, origin_host: str) -> bytes:
    """The length-prefixed stream, type and origin host: few distinct ones, each made often."""
    s, t, o = stream.encode(), type_.encode(), origin_host.encode()
    return b"".join((_LEN.pack(len(s)), s, _LEN.pack(len(t)), t, _LEN.pack(len(o)), o))


def body_bytes(e: Envelope) -> bytes:
    """The canonical bytes after seq and epoch (known before the writer assigns those):
    `canonical(...)` without its first 16 bytes, made here without the slice."""
    payload = e.payload
    return b"".join(
        (
            _TIME.pack(e.time_us),
            _names(e.stream, e.type, e.origin_host),
            _ORIGIN_AND_LEN.pack(e.origin_generation, e.origin_seq, len(payload)),
            payload,
        )
    )
