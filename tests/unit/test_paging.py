"""coordinator.paging: pages by count and by bytes, resumed after their last item's key, with
the items a request filters out skipped."""

from __future__ import annotations

import pytest

from coordinator.core.errors import InvalidRequest
from coordinator.paging import page
from whimbrel.v1 import migration_pb2

ITEMS = [migration_pb2.Migration(migration_id=f"m-{i}", vm=f"vm-{i % 2}") for i in range(7)]


def key(m: migration_pb2.Migration) -> str:
    return m.migration_id


def all_pages(size: int, max_bytes: int, kept=lambda m: True) -> list[list[str]]:  # type: ignore[no-untyped-def]
    pages, token = [], ""
    while True:
        items, token = page(ITEMS, key, kept, size, token, max_bytes)
        pages.append([m.migration_id for m in items])
        if not token:
            return pages


def test_pages_by_count_and_by_bytes() -> None:
    assert all_pages(3, 1 << 20) == [["m-0", "m-1", "m-2"], ["m-3", "m-4", "m-5"], ["m-6"]]
    one = ITEMS[0].ByteSize() + 8
    assert all_pages(0, 2 * one) == [["m-0", "m-1"], ["m-2", "m-3"], ["m-4", "m-5"], ["m-6"]]
    # An item larger than the bound still gets a page of its own: nothing is ever skipped.
    assert all_pages(0, 1) == [[m.migration_id] for m in ITEMS]
    assert all_pages(0, 1 << 20) == [[m.migration_id for m in ITEMS]]


def test_a_filter_skips_without_ending_a_page_early() -> None:
    odd = all_pages(2, 1 << 20, lambda m: m.vm == "vm-1")
    assert odd == [["m-1", "m-3"], ["m-5"]]


def test_a_token_naming_nothing_and_a_negative_size_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="names nothing listed"):
        page(ITEMS, key, lambda m: True, 0, "m-99")
    with pytest.raises(InvalidRequest, match="negative"):
        page(ITEMS, key, lambda m: True, -1, "")
