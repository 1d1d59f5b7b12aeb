"""Small helpers to read decisions out of a Driver's log."""

from __future__ import annotations

from collections.abc import Iterable

from coordinator.core import Event
from coordinator.core.state import Kind
from tools.sim import Driver, SimHosts
from whimbrel.v1 import events_pb2 as E

OBSERVATIONS = {
    "QmpEventReceived",
    "CommandSucceeded",
    "CommandFailed",
    "LeaseAcquired",
    "LeaseReleased",
    "NetworkChanged",
    "QemuExited",
    "VmObserved",
    "MigrationStatsSampled",
    "HostConnected",
}


def decisions(events: Iterable[Event]) -> list[str]:
    """Coordinator decisions, commands written as "kind@host"."""
    out = []
    for e in events:
        if e.type in OBSERVATIONS:
            continue
        if isinstance(e.payload, E.CommandIssued):
            out.append(f"{Kind(e.payload.kind).label}@{e.payload.host_id}")
        else:
            out.append(e.type)
    return out


def answer(driver: Driver, hosts: SimHosts, events: Iterable[Event]) -> list[Event]:
    """Let the hosts answer every command in `events`."""
    out: list[Event] = []
    for e in list(events):
        if isinstance(e.payload, E.CommandIssued):
            driver.answered.add(e.payload.command_id)
            out += driver.observe(*hosts.answer(e.payload))
    return out


def fresh(policy: E.MigrationPolicy | None = None) -> tuple[Driver, SimHosts]:
    from tools.sim import running_vm

    driver = Driver()
    driver.connect("host-a", "host-b")
    running_vm(driver)
    hosts = SimHosts()
    hosts.leases["vm-1"] = ("host-a", 1)
    return driver, hosts
