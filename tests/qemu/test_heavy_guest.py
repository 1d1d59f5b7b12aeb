"""A 1 GiB Linux guest dirtying memory faster than pre-copy can send it, migrated in auto mode
with the cluster's default policy: pre-copy cannot converge, so the migration must end by
switching to post-copy, and complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import linux_guest
from tools.bench import guest_big

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

# "Several hundred MiB/s": the load the issue asks auto mode to survive, as QEMU measured it.
HEAVY_MIB_S = 300


def test_auto_mode_finishes_a_heavily_dirtying_guest_in_postcopy(
    guest: linux_guest.Guest, tmp_path: Path
) -> None:
    guest_dirty_rate = guest_big.guest_dirty_rate(tmp_path)
    assert guest_dirty_rate >= HEAVY_MIB_S
    report = guest_big.migrate_big_guest(tmp_path)
    print(f"\nguest dirty rate {guest_dirty_rate} MiB/s, {report}")
    assert report["phase"] == "MIGRATION_PHASE_COMPLETED", report
    assert report["postcopy"] is True, report
    assert report["postcopy_reason"], report
