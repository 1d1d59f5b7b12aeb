"""Two hosts drained at once in a fleet of real hostd processes (VMs on qmpsim, forked by its
fork server), under tight migration limits: every VM leaves the drained hosts, none lands on
a cordoned host, no host gets more than it offers, and no limit is ever exceeded (the audit's
invariant 11 and an independent recount agree). The CI-sized `scale.drain.1000vms`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.audit.cli import main as audit_main
from tools.bench import drain_report
from tools.cluster import Cluster
from tools.fleet import (
    Fleet,
    ForkServer,
    drain,
    fleet_cluster,
    set_limits,
    start_vms,
    wait_finished,
)
from whimbrel.v1 import common_pb2, host_pb2, host_pb2_grpc, vm_pb2

pytestmark = pytest.mark.slow

# Ten VMs of 64 MiB use 640 MiB of a host; the four hosts left take five more each (960 MiB),
# so placement has to respect the capacity, not only find a host.
FLEET = Fleet(hosts=6, vms_per_host=10, capacity_memory_mib=1024, capacity_vcpus=16)
DRAINED = ("host-00", "host-01")
LIMITS = common_pb2.MigrationLimits(cluster=3, per_host_outbound=1, per_host_inbound=1)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    forks = ForkServer(tmp_path).start()
    c = fleet_cluster(tmp_path / "cluster", FLEET, forks=forks)
    try:
        yield c.start(*FLEET.host_ids)
    finally:
        c.teardown()
        forks.stop()


def test_two_hosts_drained_at_once_under_tight_limits(cluster: Cluster) -> None:
    """Draining host-00 and host-01 together moves all twenty VMs onto the other four hosts
    within their capacity, one migration out of and into any host at a time."""
    start_vms(cluster, FLEET, timeout=60)
    set_limits(cluster, LIMITS, "scale test")
    head = cluster.head()
    ids = drain(cluster, DRAINED, "scale test")
    assert len(ids) == 2 * FLEET.vms_per_host
    wait_finished(cluster, ids, head, timeout=60)

    events = cluster.events()
    assert drain_report.outcomes(events, ids) == Counter(COMPLETED=len(ids))
    moves = drain_report.destinations(events)
    assert not [m for m in ids if moves[m][1] in DRAINED], "a VM went to a drained host"
    vms = cluster.vms.ListVms(vm_pb2.ListVmsRequest()).vms
    assert len(vms) == FLEET.hosts * FLEET.vms_per_host
    assert all(vm.status == vm_pb2.VM_STATUS_RUNNING for vm in vms)
    assert not [vm.spec.name for vm in vms if vm.host in DRAINED]
    used = Counter[str]()
    for vm in vms:
        used[vm.host] += vm.spec.memory_mib
    assert max(used.values()) <= FLEET.capacity_memory_mib, used
    hosts = host_pb2_grpc.HostServiceStub(cluster.grpc).ListHosts(host_pb2.ListHostsRequest())
    for host in hosts.hosts:
        assert host.free.memory_mib >= 0 and host.free.vcpus >= 0, host
        assert host.cordoned == (host.host_id in DRAINED), host

    peaks = drain_report.running_peaks(events)
    assert not peaks.violations
    # The limits were reached, not merely respected: both drained hosts sent at once.
    assert (peaks.cluster, peaks.out_of_host, peaks.into_host) == (2, 1, 1)
    cluster.teardown()
    assert audit_main(["verify", str(cluster.db), "--final"]) == 0
