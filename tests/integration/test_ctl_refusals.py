"""whimbrelctl reads the coordinator's refusals as refusals: exit 1 with the coordinator's words,
never "cannot reach the coordinator" (exit 3), whatever the status code."""

from __future__ import annotations

import asyncio
import json

from coordinator.app import Coordinator
from coordinator.core import inputs as I
from tests.integration.conftest import SPEC, Running, SimHostd, wait_until
from tools.cluster import BIN
from tools.sim import SimHosts
from whimbrel.v1 import common_pb2


async def ctl(running: Running, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "whimbrelctl"), "--coordinator", running.address, *running.tls_flags(), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_host_that_is_not_connected_is_a_refusal_not_an_unreachable_coordinator(
    coordinator: Running, sim_hosts: SimHosts
) -> None:
    """The coordinator answers UNAVAILABLE for a host it cannot reach: that is its answer."""
    host = SimHostd("host-a", coordinator.channel, sim_hosts)
    await host.start()
    await coordinator.app.request(I.DefineVm(SPEC, coordinator.app.clock()))
    await host.stop()
    code, out, err = await ctl(coordinator, "--json", "vm", "start", "vm-1", "--host", "host-a")
    assert code == 1, err
    assert "cannot reach" not in err and "host 'host-a' is not connected" in err
    assert json.loads(out)["error"] == {
        "code": "UNAVAILABLE",
        "message": "host 'host-a' is not connected",
    }


CAPACITY = common_pb2.HostCapacity(memory_mib=4096, vcpus=4)
# What a drain appends (the hosts' own reports go on meanwhile, so the log's head moves).
DRAIN_DECISIONS = ("HostCordoned", "HostDrainStarted", "MigrationRequested", "CommandIssued")


def drains(app: Coordinator) -> list[int]:
    """The seqs of the drains' decisions in the log."""
    return [e.seq for e in app.store.read() if e.type in DRAIN_DECISIONS]


async def test_a_drain_of_several_hosts_refused_for_one_changes_none(
    coordinator: Running, sim_hosts: SimHosts
) -> None:
    """`host drain` of several hosts cordons them all before planning any; a typo in one name,
    or one host still draining, used to refuse the command (exit 1) after the others were
    cordoned and drained all the same."""
    app = coordinator.app
    hosts = {h: SimHostd(h, coordinator.channel, sim_hosts, capacity=CAPACITY)
             for h in ("host-a", "host-b", "host-c")}  # fmt: skip
    hosts["host-a"].answer = False  # the drain's migration to it stays open
    for host in hosts.values():
        await host.start()
    await app.request(I.DefineVm(SPEC, app.clock()))
    await app.request(I.StartVm("vm-1", "host-c", app.clock()))
    await wait_until(lambda: app.world.vms["vm-1"].status == 3, app, *hosts.values())
    before = drains(app)
    code, out, err = await ctl(coordinator, "--json", "host", "drain", "host-b", "nosuch")
    assert code == 1, err
    assert json.loads(out)["error"]["code"] == "NOT_FOUND" and "'nosuch' not found" in err
    assert drains(app) == before and not app.world.hosts["host-b"].cordoned
    # host-c's drain moves vm-1 to host-a, which never answers: the drain stays open.
    code, _, err = await ctl(coordinator, "host", "drain", "host-c")
    assert code == 0, err
    before = drains(app)
    code, out, err = await ctl(coordinator, "--json", "host", "drain", "host-b", "host-c")
    assert code == 1, err
    assert json.loads(out)["error"]["code"] == "FAILED_PRECONDITION"
    assert "cannot drain host host-c: it is draining" in err
    assert drains(app) == before and not app.world.hosts["host-b"].cordoned
