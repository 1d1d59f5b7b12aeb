"""Convergence policies with real QEMU, through whimbrelctl: an operator's bandwidth change and
force-complete finish migrations that would not, and a policy's completion timeout rolls one
back, each change recorded with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.qemu.conftest import Cluster
from tests.qemu.scenario import assert_outcome, qmp_event, start_migration
from tests.qemu.test_ctl import ctl
from whimbrel.v1 import common_pb2, events_pb2

pytestmark = pytest.mark.qemu
PHASE = common_pb2.MigrationPhase
PRECOPY = common_pb2.MIGRATION_MODE_PRECOPY


def tunings(cluster: Cluster) -> list[events_pb2.MigrationTuned]:
    return [e.payload for e in cluster.events() if e.type == "MigrationTuned"]


def test_a_bandwidth_raised_by_the_operator_lets_a_slow_migration_finish(
    cluster: Cluster, tmp_path: Path
) -> None:
    from tools.guest import random_ram

    ram = random_ram(tmp_path / "ram.bin", 64)
    cluster.define_and_start("vm-1", "host-a", ram_file=ram)
    head = cluster.head()
    start_migration(cluster, PRECOPY, max_bandwidth=1 << 20)  # 64 MiB at 1 MiB/s: a minute
    cluster.wait_event(qmp_event("host-a", "MIGRATION_PASS"), from_seq=head)
    raised = ctl(cluster, "migration", "set", "m-1", "--bandwidth", str(1 << 30),
                 "--reason", "maintenance window opened")  # fmt: skip
    assert raised.returncode == 0, raised.stderr
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, "host-b")
    (tuned,) = tunings(cluster)
    assert (tuned.by, tuned.reason, tuned.parameters.max_bandwidth) == (
        "operator",
        "maintenance window opened",
        1 << 30,
    )
    assert tuned.requested_by == "spiffe://whimbrel/user/admin"


def test_force_complete_sets_the_largest_downtime_on_the_source(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Mid pre-copy (64 MiB of random RAM at 16 MiB/s, downtime limit 1 ms), force-complete
    records the change and the source's QEMU takes downtime-limit 2000 ms; the migration then
    completes. (When QEMU completes is its own business: under TCG a starved guest may converge
    anyway; the decision itself is covered in tests/unit/test_convergence.py.)"""
    from tools.guest import random_ram

    ram = random_ram(tmp_path / "ram.bin", 64)
    cluster.define_and_start("vm-1", "host-a", ram_file=ram)
    head = cluster.head()
    start_migration(cluster, PRECOPY, max_bandwidth=16 << 20, downtime_limit_ms=1)
    cluster.wait_event(qmp_event("host-a", "MIGRATION_PASS"), from_seq=head)
    forced = ctl(cluster, "migration", "complete", "m-1")
    assert forced.returncode == 0, forced.stderr
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, "host-b")
    (tuned,) = tunings(cluster)
    assert tuned.reason == "force-complete: downtime limit 1 -> 2000 ms"
    events = cluster.events()
    set_parameters = events_pb2.COMMAND_KIND_SET_MIGRATION_PARAMETERS
    (issued,) = [e.payload for e in events
                 if e.type == "CommandIssued" and e.payload.kind == set_parameters]  # fmt: skip
    assert issued.host_id == "host-a" and issued.args.parameters.downtime_limit_ms == 2000
    assert any(
        e.type == "CommandSucceeded" and e.payload.command_id == issued.command_id for e in events
    )


def test_a_policy_completion_timeout_rolls_back_with_its_reason(
    cluster: Cluster, tmp_path: Path
) -> None:
    """64 MiB of random RAM at 8 MiB/s needs 8 s; the policy allows 2 s (per GiB, a GiB at
    least), then aborts: the guest goes on on the source."""
    from tools.guest import random_ram

    defined = ctl(cluster, "policy", "define", "tight", "--timeout-per-gib", "2",
                  "--on-stall", "abort", "--bandwidth", str(8 << 20))  # fmt: skip
    assert defined.returncode == 0, defined.stderr
    assert "timeout=2s/GiB" in defined.stdout
    ram = random_ram(tmp_path / "ram.bin", 64)
    cluster.define_and_start("vm-1", "host-a", ram_file=ram)
    waited = ctl(cluster, "migrate", "vm-1", "--to", "host-b", "--policy", "tight",
                 "--id", "m-1", "--wait")  # fmt: skip
    assert waited.returncode == 4, waited.stdout + waited.stderr  # not completed
    final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, "host-a")
    assert final.reason.startswith("policy: completion timeout: pre-copy ran "), final.reason
    assert final.policy.name == "tight"


def test_a_postcopy_bandwidth_raised_in_post_copy_lets_the_guest_catch_up(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A post-copy bandwidth set far too low (64 MiB of random RAM at 64 KiB/s: 17 minutes of
    a guest waiting on its pages) cannot be aborted out of once the destination runs; the
    operator raises it and the migration completes. The pre-copy bandwidth is refused then:
    it no longer applies."""
    from tools.guest import random_ram

    ram = random_ram(tmp_path / "ram.bin", 64)
    cluster.define_and_start("vm-1", "host-a", ram_file=ram)
    head = cluster.head()
    start_migration(cluster, common_pb2.MIGRATION_MODE_POSTCOPY, max_postcopy_bandwidth=64 << 10)
    cluster.wait_event(qmp_event("host-b", "RESUME"), from_seq=head)
    refused = ctl(cluster, "migration", "set", "m-1", "--bandwidth", str(1 << 30))
    assert refused.returncode == 1 and "in post-copy" in refused.stderr, refused.stderr
    raised = ctl(cluster, "migration", "set", "m-1", "--postcopy-bandwidth", str(1 << 30),
                 "--reason", "typo in the policy")  # fmt: skip
    assert raised.returncode == 0, raised.stderr
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, "host-b")
    (tuned,) = tunings(cluster)
    assert tuned.parameters.max_postcopy_bandwidth == 1 << 30
    assert tuned.reason == "typo in the policy"
