"""Pages of the list answers (ListVms, ListMigrations).

A whole list in one message grew without bound: 140 VMs with the largest specs allowed already
passed gRPC's 16 MiB, and since a VM is never deleted, ListVms failed from then on for good. A
page holds at most `page_size` items (0: no count bound) and at most `max_bytes` of them, so it
always fits; its token is the key (name, id) of its last item, and the next page starts after
that item in the same order. A request without size or token that fits whole gets it all, as
before pages existed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

from coordinator.core.errors import InvalidRequest
from whimbrel.validate import shown

__all__ = ["PAGE_BYTES", "page"]

# Well under gRPC's default 16 MiB a response may carry.
PAGE_BYTES = 4 << 20
# A repeated field's tag and length, per item.
_FRAMING = 8

T = TypeVar("T", bound=Message)


def page(
    items: Sequence[T],
    key: Callable[[T], str],
    kept: Callable[[T], bool],
    size: int,
    token: str,
    max_bytes: int = PAGE_BYTES,
) -> tuple[list[T], str]:
    """The page of the `kept` items after the one whose key is `token` (from the first when
    empty), and the token of the page after it ("" when this is the last). Raises
    InvalidRequest for a negative size or a token that names no item."""
    if size < 0:
        raise InvalidRequest(f"page_size {size} is negative")
    start = 0
    if token:
        start = next((i + 1 for i, item in enumerate(items) if key(item) == token), -1)
        if start < 0:
            raise InvalidRequest(
                f"page_token {shown(token)} names nothing listed: start again without one"
            )
    out: list[T] = []
    used = 0
    for item in items[start:]:
        if not kept(item):
            continue
        cost = item.ByteSize() + _FRAMING
        if (size and len(out) >= size) or (out and used + cost > max_bytes):
            return out, key(out[-1])  # a kept item is left for the next page
        out.append(item)
        used += cost
    return out, ""
