"""Crash scenarios with real QEMU, real processes, kill -9 and failpoints. Each ends with the VM
running on exactly one host (or recorded lost for a reason the scenario made unavoidable), no
migration left open, the log verified as final and invariants 1-8 holding.

The scenario x outcome matrix is the parametrization below."""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from tests.qemu.scenario import PHASE, assert_outcome, qmp_event, start_migration
from tools.cluster import Cluster
from whimbrel.v1 import common_pb2, events_pb2

pytestmark = pytest.mark.qemu
PRECOPY, POSTCOPY = common_pb2.MIGRATION_MODE_PRECOPY, common_pb2.MIGRATION_MODE_POSTCOPY
MODES = {"precopy": PRECOPY, "postcopy": POSTCOPY}
BOUNDARIES = ["preparing", "transferring", "switchover", "handoff", "finishing"]


@pytest.mark.parametrize("phase", BOUNDARIES)
@pytest.mark.parametrize("mode", MODES)
def test_coordinator_dies_entering_each_phase(cluster: Cluster, mode: str, phase: str) -> None:
    """The coordinator exits the instant the phase's first decisions are durable (commands not
    sent). The restarted one awaits both hellos, re-sends, and the migration completes."""
    cluster.define_and_start("vm-1", "host-a")
    address, head = cluster.address, cluster.head()
    cluster.processes["coordinator"].stop()
    cluster.start_coordinator(listen=address, failpoints=f"coordinator.entered-{phase}")
    cluster.wait_hosts("host-a", "host-b", from_seq=head + 1)
    try:
        start_migration(cluster, MODES[mode])
    except grpc.RpcError as err:
        # Entering "preparing" is the request itself: it was committed, then the coordinator
        # died before answering. The client cannot tell, and retrying the same migration id
        # would get ALREADY_EXISTS.
        assert phase == "preparing" and err.code() == grpc.StatusCode.UNAVAILABLE
    assert cluster.processes["coordinator"].popen.wait(60) == 97
    cluster.processes["coordinator"].stop()
    cluster.start_coordinator(listen=address)
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")
    recovery = [e.type for e in cluster.events() if e.type.startswith("Recovery")]
    assert recovery == ["RecoveryStarted", "RecoveryFinished"]


# (host, failpoint) -> outcome and where the VM ends. A command interrupted by a hostd crash is
# reported failed, never run again: before the point of no return that means rolling back;
# after it the coordinator retries forward.
HOSTD_CRASHES = {
    "destination-before-prepare": ("host-b", "hostd.before-execute.prepare-incoming",
                                   PHASE.MIGRATION_PHASE_ROLLED_BACK, "host-a"),
    "source-before-start": ("host-a", "hostd.before-execute.start-migration",
                            PHASE.MIGRATION_PHASE_ROLLED_BACK, "host-a"),
    # The source completed its switchover; its hostd dies before releasing the lease by
    # itself. The restarted one re-attaches, and the coordinator's release command (sent once
    # hostd's own report is overdue) lets the handoff go on.
    "source-before-release-at-switchover": ("host-a", "hostd.before-release-at-switchover",
                                            PHASE.MIGRATION_PHASE_COMPLETED, "host-b"),
    "destination-before-enable-network": ("host-b", "hostd.before-execute.enable-network",
                                          PHASE.MIGRATION_PHASE_ROLLED_BACK, "host-a"),
    # The source stopped in pre-switchover; its hostd dies before it continues the switch by
    # itself. The restarted one finds the continue still armed and sends it.
    "source-before-continue-at-pre-switchover": ("host-a",
                                                 "hostd.before-continue-at-pre-switchover",
                                                 PHASE.MIGRATION_PHASE_COMPLETED, "host-b"),
    "destination-before-acquire": ("host-b", "hostd.before-execute.acquire-lease",
                                   PHASE.MIGRATION_PHASE_ROLLED_BACK, "host-a"),
    "destination-before-cont": ("host-b", "hostd.before-execute.resume-vm",
                                PHASE.MIGRATION_PHASE_COMPLETED, "host-b"),
    "destination-after-cont": ("host-b", "hostd.after-execute.resume-vm",
                               PHASE.MIGRATION_PHASE_COMPLETED, "host-b"),
    "destination-before-announce": ("host-b", "hostd.before-execute.announce",
                                    PHASE.MIGRATION_PHASE_COMPLETED, "host-b"),
    "source-before-destroy": ("host-a", "hostd.before-execute.destroy-vm",
                              PHASE.MIGRATION_PHASE_COMPLETED, "host-b"),
}  # fmt: skip


@pytest.mark.parametrize("scenario", HOSTD_CRASHES)
def test_hostd_dies_at_each_step(cluster: Cluster, scenario: str) -> None:
    host, failpoint, outcome, runs_on = HOSTD_CRASHES[scenario]
    cluster.define_and_start("vm-1", "host-a")
    head = cluster.head()
    cluster.processes[host].stop()
    cluster.start_hostd(host, failpoints=failpoint)
    cluster.wait_hosts(host, from_seq=head + 1)
    start_migration(cluster, PRECOPY)
    assert cluster.processes[host].popen.wait(60) == 97
    cluster.processes[host].stop()
    cluster.start_hostd(host)  # generation 3: re-attaches to its QEMU
    assert_outcome(cluster, outcome, runs_on)


def qemu_pid(cluster: Cluster, host: str) -> int:
    return int((cluster.root / host / "vms" / "vm-1" / "qemu.pid").read_text())


# (mode, the moment, whose QEMU) -> outcome and where the VM ends (None: lost, unavoidably).
QEMU_KILLS = {
    "precopy-transferring-destination": (PRECOPY, "host-a", "MIGRATION_PASS", "host-b",
                                         PHASE.MIGRATION_PHASE_ROLLED_BACK, "host-a"),
    "precopy-transferring-source": (PRECOPY, "host-a", "MIGRATION_PASS", "host-a",
                                    PHASE.MIGRATION_PHASE_FENCED, None),
    "postcopy-resumed-destination": (POSTCOPY, "host-b", "RESUME", "host-b",
                                     PHASE.MIGRATION_PHASE_FENCED, None),
    "postcopy-resumed-source": (POSTCOPY, "host-b", "RESUME", "host-a",
                                PHASE.MIGRATION_PHASE_FENCED, None),
}  # fmt: skip


@pytest.mark.parametrize("scenario", QEMU_KILLS)
def test_qemu_killed(cluster: Cluster, scenario: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tools.guest import random_ram

    mode, host_seen, event, victim, outcome, runs_on = QEMU_KILLS[scenario]
    ram = random_ram(tmp_path / "ram.bin", 64)
    cluster.define_and_start("vm-1", "host-a", ram_file=ram)
    head = cluster.head()
    # Slow enough that the kill lands in the middle: pre-copy never converges at 1 MiB/s, and
    # post-copy pulls 64 MiB at 10 MiB/s after the destination resumed.
    start_migration(cluster, mode, max_bandwidth=1 << 20, max_postcopy_bandwidth=10 << 20)
    cluster.wait_event(qmp_event(host_seen, event), from_seq=head)
    os.kill(qemu_pid(cluster, victim), signal.SIGKILL)
    final = assert_outcome(cluster, outcome, runs_on)
    # Whichever the coordinator hears first decides: the victim's exit, or (pre-copy) the
    # source's own migration failing because its peer vanished. Both name the cause.
    assert "QEMU exited" in final.reason or "migration failed in QEMU" in final.reason, final.reason


def test_lost_vm_cold_starts_from_its_disk_when_its_policy_says_so(
    cluster: Cluster, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """The source dies mid post-copy: the VM is lost (fenced), and with LOST_VM_ACTION_COLD_START
    it boots again from its disk on the destination, which holds the lease."""
    from tools.guest import random_ram

    ram = random_ram(tmp_path / "ram.bin", 64)
    cluster.define_and_start("vm-1", "host-a", ram_file=ram,
                             on_lost=common_pb2.LOST_VM_ACTION_COLD_START)  # fmt: skip
    head = cluster.head()
    start_migration(cluster, POSTCOPY, max_bandwidth=1 << 20, max_postcopy_bandwidth=10 << 20)
    cluster.wait_event(qmp_event("host-b", "RESUME"), from_seq=head)
    os.kill(qemu_pid(cluster, "host-a"), signal.SIGKILL)
    assert cluster.watch("m-1").phase == PHASE.MIGRATION_PHASE_FENCED
    cold = cluster.wait_event(
        lambda e: isinstance(e.payload, events_pb2.CommandSucceeded)
        and e.payload.kind == events_pb2.COMMAND_KIND_START_VM and e.origin_host == "host-b",
        from_seq=head,
    )  # fmt: skip
    assert cold.payload.result.pid != 0
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_FENCED, runs_on="host-b")


def test_destination_host_missing_after_a_restart_rolls_back_then_its_copy_is_destroyed(
    cluster: Cluster, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Coordinator and destination hostd both die during pre-copy; only the coordinator comes
    back. After --host-wait the destination is missing: the recovery table rolls back (the
    source keeps the VM). When the destination host returns, its paused copy is destroyed."""
    from tools.guest import random_ram

    ram = random_ram(tmp_path / "ram.bin", 64)
    cluster.define_and_start("vm-1", "host-a", ram_file=ram)
    head = cluster.head()
    start_migration(cluster, PRECOPY, max_bandwidth=1 << 20)
    cluster.wait_event(qmp_event("host-a", "MIGRATION_PASS"), from_seq=head)
    address = cluster.address
    cluster.processes["host-b"].stop(signal.SIGKILL)
    cluster.processes["coordinator"].stop(signal.SIGKILL)
    cluster.coordinator_args = ["--host-wait", "1"]
    cluster.start_coordinator(listen=address)
    final = cluster.watch("m-1")
    assert final.phase == PHASE.MIGRATION_PHASE_ROLLED_BACK, final.reason
    assert "destination host-b did not return" in final.reason
    finished = [e for e in cluster.events() if isinstance(e.payload, events_pb2.RecoveryFinished)]
    assert [list(e.payload.missing_hosts) for e in finished] == [["host-b"]]
    head = cluster.head()
    cluster.start_hostd("host-b")
    cluster.wait_event(
        lambda e: isinstance(e.payload, events_pb2.QemuExited) and e.origin_host == "host-b",
        from_seq=head,
    )
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, runs_on="host-a")


def test_sigstopped_coordinator_is_replaced_and_fences_itself_when_it_wakes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP the coordinator past the point of no return; a standby starts on the same log
    (higher epoch), the hosts fail over to it (keepalive notices the hung one) and it completes
    the migration. SIGCONT the first: its next write is refused and it stops itself (exit 3)."""
    import socket

    import grpc

    from tools.guest import random_ram
    from whimbrel.v1 import vm_pb2, vm_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        standby = f"127.0.0.1:{s.getsockname()[1]}"
    cluster = Cluster(tmp_path)
    try:
        cluster.root.mkdir(parents=True, exist_ok=True)
        cluster.start_coordinator()
        first_address = cluster.address
        for host in ("host-a", "host-b"):
            cluster.hostd_args[host] = ["--coordinator", f"{first_address},{standby}"]
            cluster.start_hostd(host)
        cluster.wait_hosts("host-a", "host-b")
        cluster.define_and_start("vm-1", "host-a", ram_file=random_ram(tmp_path / "ram", 64))
        head = cluster.head()
        start_migration(cluster, POSTCOPY, max_bandwidth=1 << 20, max_postcopy_bandwidth=8 << 20)
        cluster.wait_event(qmp_event("host-b", "RESUME"), from_seq=head)
        first = cluster.processes["stale-coordinator"] = cluster.processes.pop("coordinator")
        first.popen.send_signal(signal.SIGSTOP)
        woken = []

        def wake_first() -> None:
            # Stopped inside a write transaction, the first one holds the log's lock: the
            # standby waits for it, and its new epoch fences the first once it lets go.
            first.popen.send_signal(signal.SIGCONT)
            woken.append(True)

        cluster.start_coordinator(listen=standby, on_waiting=wake_first)
        assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")
        if not woken:
            first.popen.send_signal(signal.SIGCONT)
        if first.popen.poll() is None:  # still up: its next write is refused, and it stops
            with cluster.open_channel(first_address) as channel:
                spec = vm_pb2.DefineVmRequest(spec=cluster_spec("vm-2"))
                try:
                    vm_pb2_grpc.VmServiceStub(channel).DefineVm(spec, timeout=10)
                    raise AssertionError("a stale coordinator accepted a write")
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert first.popen.wait(30) == 3
        names = [e.payload.spec.name for e in cluster.events()
                 if isinstance(e.payload, events_pb2.VmDefined)]  # fmt: skip
        assert names == ["vm-1"]  # nothing of the stale one reached the log
        # It stops cleanly: host streams that end under it are not servicer crashes.
        stale_log = (cluster.root / "coordinator.log").read_text()
        assert "Unexpected [StaleEpoch]" not in stale_log
    finally:
        cluster.teardown()


def cluster_spec(name: str):  # type: ignore[no-untyped-def]
    return common_pb2.VmSpec(name=name, memory_mib=64, vcpus=1)
