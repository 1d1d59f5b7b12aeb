"""The guest outage bench (`make bench BENCH=guest.outage`) runs end to end, briefly."""

from __future__ import annotations

import pytest

from tests import netns
from tools import linux_guest
from tools.bench import guest_outage
from tools.bench.switchover import RUNS_ENV

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def test_two_postcopy_migrations_per_side_keep_every_connection(
    guest: linux_guest.Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With WHIMBREL_BENCH_RUNS=2, both sides migrate the Linux guest twice: the JSON reports
    p50, p99 and max of each side's outage with its fields, and no connection was lost, no
    counter rewound or stalled."""
    netns.require_root()
    monkeypatch.setenv(RUNS_ENV, "2")
    results = guest_outage.bench("postcopy")
    assert [r["bench"] for r in results] == [
        f"guest.outage.postcopy.{name}_ms" for name in ("p50", "p99", "max")
    ]
    sides = {"whimbrel", "direct"}
    for result in results:
        assert isinstance(result["value"], float) and isinstance(result["baseline"], float)
        assert result["ratio"] == round(result["value"] / result["baseline"], 3)
        assert result["samples"] == {"whimbrel": 2, "direct": 2}
        assert result["connections_lost"] == {"whimbrel": 0, "direct": 0}
        assert result["rewinds"] == {"whimbrel": 0, "direct": 0}
        assert result["counter_stalls"] == {"whimbrel": 0, "direct": 0}
        assert result["pause_rejected"] == {"whimbrel": 0, "direct": 0}
        for field in ("pause_ms", "scheduling"):
            assert isinstance(result[field], dict) and set(result[field]) == sides
