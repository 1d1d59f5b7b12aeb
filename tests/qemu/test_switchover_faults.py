"""Issue 13, findings 1-3, with real QEMU: a fault at the exact instant of the switchover that
the chaos drill found costly, pinned by a failpoint. A `NAME=stop` failpoint freezes the hostd
there; the test strikes (SIGKILL of that hostd, or of a QEMU) while it is frozen, then lets it go
on, so the fault lands exactly at that instant whatever the machine's load."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from coordinator.core import Event
from hostd import qemu
from tests.qemu.scenario import PHASE, assert_outcome, qmp_event, start_migration
from tools.cluster import Cluster
from tools.guest import random_ram
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2

pytestmark = pytest.mark.qemu
PRECOPY = common_pb2.MIGRATION_MODE_PRECOPY


def arm(cluster: Cluster, host: str, failpoint: str) -> None:
    """Restart `host`'s hostd with `failpoint` armed (before the VM migrates)."""
    head = cluster.head()
    cluster.processes[host].stop()
    cluster.start_hostd(host, failpoints=failpoint)
    cluster.wait_hosts(host, from_seq=head + 1)


def kill_qemu(cluster: Cluster, host: str) -> None:
    """SIGKILL `host`'s QEMU for vm-1 and wait until it is gone."""
    pid = cluster.qemu_pid(host)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu.alive(pid):
        assert time.monotonic() < deadline, f"QEMU {pid} outlived SIGKILL"
        time.sleep(0.01)


def of_type(cluster: Cluster, payload_type: type) -> list[Event]:
    return [e for e in cluster.events() if isinstance(e.payload, payload_type)]


def test_source_hostd_killed_as_it_continues_the_switchover_completes(cluster: Cluster) -> None:
    """Finding 1, now that hostd continues a pre-copy switchover by itself: the source's hostd
    is SIGKILLed as it is about to send migrate-continue to its source, stopped in
    pre-switchover, and is restarted. The restarted hostd finds the continue still armed and
    sends it (or the coordinator's CONTINUE_SWITCHOVER does, once hostd's is overdue): the
    migration ends COMPLETED with the VM running on host-b, nothing fenced or lost."""
    cluster.define_and_start("vm-1", "host-a")
    arm(cluster, "host-a", "hostd.before-continue-at-pre-switchover=stop")
    head = cluster.head()
    start_migration(cluster, PRECOPY)
    cluster.wait_frozen("host-a")
    cluster.kill_process("host-a")
    cluster.start_hostd("host-a")
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")
    statuses = [
        json.loads(e.payload.data_json).get("status")
        for e in cluster.events()[head:]
        if isinstance(e.payload, events_pb2.QmpEventReceived)
        and e.origin_host == "host-a"
        and e.payload.event == "MIGRATION"
    ]
    # The window was hit: the source waited in pre-switchover across the restart.
    assert statuses[-3:] == ["pre-switchover", "device", "completed"], statuses
    assert of_type(cluster, events_pb2.FencingDecided) == []
    assert of_type(cluster, events_pb2.VmLost) == []


def test_destination_qemu_killed_while_source_stopped_for_switchover(cluster: Cluster) -> None:
    """Finding 2: pre-copy, the source QEMU has just stopped for the switchover (its hostd is
    frozen right after forwarding the STOP) when the destination's QEMU is SIGKILLed. QEMU 7.2
    then fails the migration and resumes the source by itself. The source must never run
    without its lease: it never released it (no LeaseReleased by host-a), the invariant checker
    and `whimbrel-audit verify --final` are clean, and the migration is ROLLED_BACK with the VM
    running on host-a."""
    cluster.define_and_start("vm-1", "host-a")
    arm(cluster, "host-a", "hostd.after-qmp-event.STOP=stop")
    head = cluster.head()
    start_migration(cluster, PRECOPY)
    cluster.wait_frozen("host-a")
    kill_qemu(cluster, "host-b")
    time.sleep(0.3)  # the source QEMU notices and resumes itself while its hostd is frozen
    cluster.processes["host-a"].popen.send_signal(signal.SIGCONT)
    cluster.wait_event(qmp_event("host-a", "RESUME"), from_seq=head)
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, runs_on="host-a")
    released = [e for e in of_type(cluster, events_pb2.LeaseReleased) if e.seq > head]
    assert [e.payload.holder for e in released] == []


def test_destination_qemu_killed_just_before_cont_rolls_back(cluster: Cluster) -> None:
    """Finding 3: the destination's hostd is frozen as it starts the RESUME_VM command (cont not
    yet sent) and its QEMU is SIGKILLed there. The destination never ran (no RESUME from
    host-b), so the complete, paused source is the VM: the migration must be ROLLED_BACK with
    the VM running on host-a, not fenced and lost."""
    cluster.define_and_start("vm-1", "host-a")
    arm(cluster, "host-b", "hostd.before-execute.resume-vm=stop")
    head = cluster.head()
    start_migration(cluster, PRECOPY)
    cluster.wait_frozen("host-b")
    kill_qemu(cluster, "host-b")
    cluster.processes["host-b"].popen.send_signal(signal.SIGCONT)
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, runs_on="host-a")
    resumed_b = [e for e in cluster.events() if e.seq > head and qmp_event("host-b", "RESUME")(e)]
    assert resumed_b == []
    assert of_type(cluster, events_pb2.VmLost) == []


def test_destination_qemu_killed_before_its_lease_rolls_back(cluster: Cluster) -> None:
    """Finding 3, earlier: the destination's hostd is frozen as it starts ACQUIRE_LEASE (both
    QEMUs completed, the source released its lease, no cont intent yet) and its QEMU is
    SIGKILLed there. The complete, paused source is the VM: ROLLED_BACK, the VM running on
    host-a again (holding the lease), nothing lost."""
    cluster.define_and_start("vm-1", "host-a")
    arm(cluster, "host-b", "hostd.before-execute.acquire-lease=stop")
    start_migration(cluster, PRECOPY)
    cluster.wait_frozen("host-b")
    kill_qemu(cluster, "host-b")
    cluster.processes["host-b"].popen.send_signal(signal.SIGCONT)
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, runs_on="host-a")
    assert of_type(cluster, events_pb2.VmLost) == []


def test_source_qemu_killed_after_the_destination_loaded_everything_completes(
    cluster: Cluster,
) -> None:
    """The source's hostd is frozen at its QEMU's `device` status (so it never records the
    source's completed); once the destination reported completed, the source QEMU and then
    its hostd are SIGKILLed and the hostd restarted. The lease is still the dead source's,
    and nothing on host-a will release it by itself: the destination holds the whole VM, so
    the migration must end COMPLETED with the VM running on host-b, nothing fenced or lost."""
    cluster.define_and_start("vm-1", "host-a")
    arm(cluster, "host-a", "hostd.after-qmp-event.MIGRATION.device=stop")
    head = cluster.head()
    start_migration(cluster, PRECOPY)
    cluster.wait_frozen("host-a")
    cluster.wait_event(
        lambda e: qmp_event("host-b", "MIGRATION")(e) and '"completed"' in e.payload.data_json,
        from_seq=head,
    )
    kill_qemu(cluster, "host-a")
    cluster.kill_process("host-a")
    cluster.start_hostd("host-a")
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")
    completed_a = [
        e for e in cluster.events()
        if e.seq > head and qmp_event("host-a", "MIGRATION")(e)
        and '"completed"' in e.payload.data_json
    ]  # fmt: skip
    assert completed_a == []  # the window was hit: host-a never reported completed
    assert of_type(cluster, events_pb2.FencingDecided) == []
    assert of_type(cluster, events_pb2.VmLost) == []


HANGING_ENABLE = """#!/bin/sh
echo "$1 $2 $WHIMBREL_HOST $(date +%s%N)" >> "{log}"
if [ "$1" = enable ] && [ "$WHIMBREL_HOST" = host-b ]; then sleep 600; fi
"""


def test_a_destination_network_hook_that_hangs_rolls_back(cluster: Cluster) -> None:
    """The destination's enable hook never returns, with the source stopped for the
    switchover. Unbounded, the command and the guest's pause would last for good; hostd kills
    the hook past --network-timeout and the enable fails, so the migration rolls back with the
    VM running on host-a again, its pause bounded."""
    cluster.define_and_start("vm-1", "host-a")
    (cluster.root / "hook.sh").write_text(HANGING_ENABLE.format(log=cluster.hook_log))
    cluster.hostd_args["host-b"] = ["--network-timeout", "1"]
    head = cluster.head()
    cluster.processes["host-b"].stop()
    cluster.start_hostd("host-b")
    cluster.wait_hosts("host-b", from_seq=head + 1)
    start_migration(cluster, PRECOPY)
    final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, runs_on="host-a")
    assert "did not finish in 1 s: killed" in final.reason, final.reason
    events = cluster.events()[head:]
    stop = next(e for e in events if qmp_event("host-a", "STOP")(e))
    resume = next(e for e in events if qmp_event("host-a", "RESUME")(e) and e.seq > stop.seq)
    assert resume.time_us - stop.time_us < 10_000_000  # the hook's second, not 600


def test_a_stream_that_stops_moving_rolls_back(cluster: Cluster, tmp_path: Path) -> None:
    """The destination's QEMU is frozen (SIGSTOP) during pre-copy: it stops reading, the
    stream fills and the source's QEMU sends nothing more, with neither progress nor an error
    to report. hostd's periodic samples show no byte sent for the policy's progress timeout,
    and the migration rolls back: the source, which never stopped, keeps the VM."""
    cluster.define_and_start("vm-1", "host-a", ram_file=random_ram(tmp_path / "ram", 64))
    head = cluster.head()
    policy = events_pb2.MigrationPolicy(
        parameters=events_pb2.MigrationParameters(max_bandwidth=8 << 20), progress_timeout_s=3
    )
    request = migration_pb2.StartMigrationRequest(
        vm="vm-1", destination="host-b", mode=PRECOPY, policy=policy, migration_id="m-1"
    )
    cluster.migrations.StartMigration(request)
    cluster.wait_event(qmp_event("host-a", "MIGRATION_PASS"), from_seq=head)
    frozen = cluster.qemu_pid("host-b")
    os.kill(frozen, signal.SIGSTOP)
    try:
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, runs_on="host-a")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert final.reason.startswith("no progress: the source sent nothing for"), final.reason
    stops = [e for e in cluster.events()[head:] if qmp_event("host-a", "STOP")(e)]
    assert stops == []  # the guest ran throughout


def test_a_switchover_that_never_completes_rolls_back(cluster: Cluster) -> None:
    """The destination's QEMU is frozen (SIGSTOP) just as the source stops for the switchover:
    the source sends its last state into a peer that never reads nor answers on the return
    path, and stays in "device", the guest paused, with no sample to tell (QEMU may not even
    answer QMP then). By the coordinator's clock the stop outlasts the policy's progress
    timeout: the migration rolls back, and the source, which never gave up its lease, runs
    the VM again."""
    cluster.define_and_start("vm-1", "host-a")
    arm(cluster, "host-a", "hostd.after-qmp-event.MIGRATION.pre-switchover=stop")
    head = cluster.head()
    policy = events_pb2.MigrationPolicy(progress_timeout_s=3)
    request = migration_pb2.StartMigrationRequest(
        vm="vm-1", destination="host-b", mode=PRECOPY, policy=policy, migration_id="m-1"
    )
    cluster.migrations.StartMigration(request)
    cluster.wait_frozen("host-a")
    frozen = cluster.qemu_pid("host-b")
    os.kill(frozen, signal.SIGSTOP)
    cluster.processes["host-a"].popen.send_signal(signal.SIGCONT)  # it continues the switch
    try:
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, runs_on="host-a")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert "stopped for the switchover" in final.reason, final.reason
    released = [e for e in of_type(cluster, events_pb2.LeaseReleased) if e.seq > head]
    assert [e.payload.holder for e in released] == []
