"""A destination armed by PREPARE_INCOMING enables its networking at its own postcopy-active:
the hook runs once however the coordinator's enable command interleaves with it, and a
destination that is being destroyed never enables."""

from __future__ import annotations

import asyncio
from pathlib import Path

from google.protobuf.message import Message

from hostd.drivers.lease import FileLeaseDriver
from hostd.drivers.network import HookNetworkDriver
from hostd.executor import Executor
from hostd.vm import VmRuntime
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

HOOK = '#!/bin/sh\necho "$1" >> "{log}"\n'
SPEC = common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1)


class Host:
    def __init__(self, tmp_path: Path) -> None:
        self.log = tmp_path / "hook.log"
        hook = tmp_path / "hook.sh"
        hook.write_text(HOOK.format(log=self.log))
        hook.chmod(0o755)
        self.reported: list[Message] = []
        self.executor = Executor("host-b", tmp_path / "state", "127.0.0.1",
                                 FileLeaseDriver(tmp_path / "locks"),
                                 HookNetworkDriver(hook, "host-b"), self.emit)  # fmt: skip
        # A destination without a QEMU process: the runtime's events are fed by hand.
        self.runtime = VmRuntime(SPEC, tmp_path / "vm", self.emit, role="destination")
        self.executor.vms["vm-1"] = self.runtime

    async def emit(self, payload: Message, time_us: int) -> None:
        self.reported.append(payload)

    def phases(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []

    def enabled_reports(self) -> int:
        return sum(
            isinstance(p, events_pb2.NetworkChanged) and p.state == events_pb2.NETWORK_STATE_ENABLED
            for p in self.reported
        )

    async def status(self, status: str) -> None:
        await self.runtime._on_event("MIGRATION", {"status": status}, 1)

    async def command(self, kind: int) -> None:
        await self.executor.run(host_pb2.Command(command_id=f"c-{kind}", vm="vm-1", kind=kind))

    async def settled(self) -> None:
        """Until the work started beside the event stream is done."""
        while self.runtime._beside_tasks:
            await asyncio.gather(*self.runtime._beside_tasks)


async def test_networking_is_enabled_at_postcopy_active_once(tmp_path: Path) -> None:
    host = Host(tmp_path)
    await host.executor._network("prepare", host.runtime, events_pb2.NETWORK_STATE_PREPARED)
    host.executor.enable_network_at_postcopy(host.runtime)
    await host.status("active")
    assert host.phases() == ["prepare"]
    await host.status("postcopy-active")
    # The coordinator's enable command arrives while the hook runs: it waits for it.
    await host.command(events_pb2.COMMAND_KIND_ENABLE_NETWORK)
    await host.settled()
    assert host.phases() == ["prepare", "enable"]
    assert host.enabled_reports() == 1
    await host.status("postcopy-active")  # (after a post-copy recovery): nothing more
    await host.settled()
    assert host.phases() == ["prepare", "enable"]


async def test_a_destination_being_destroyed_never_enables(tmp_path: Path) -> None:
    host = Host(tmp_path)
    await host.executor._network("prepare", host.runtime, events_pb2.NETWORK_STATE_PREPARED)
    host.executor.enable_network_at_postcopy(host.runtime)
    await host.command(events_pb2.COMMAND_KIND_DESTROY_VM)  # a rollback
    await host.status("postcopy-active")
    await host.settled()
    assert host.phases() == ["prepare", "release"]
    assert host.enabled_reports() == 0


async def test_without_arming_only_the_command_enables(tmp_path: Path) -> None:
    host = Host(tmp_path)
    await host.executor._network("prepare", host.runtime, events_pb2.NETWORK_STATE_PREPARED)
    await host.status("postcopy-active")
    await host.settled()
    assert host.phases() == ["prepare"]
    await host.command(events_pb2.COMMAND_KIND_ENABLE_NETWORK)
    assert host.phases() == ["prepare", "enable"]


async def test_an_enable_applied_by_a_hostd_that_died_unreported_is_reported(
    tmp_path: Path,
) -> None:
    """A previous hostd ran the hook and saved the phase, then died before it reported the
    change: the repeated command runs no hook but reports the networking enabled, or the
    coordinator waits for that report for good (the destination's cont needs it)."""
    host = Host(tmp_path)
    host.runtime.save_network_phase("enable")  # as read back from disk at the restart
    await host.command(events_pb2.COMMAND_KIND_ENABLE_NETWORK)
    assert host.phases() == []
    assert host.enabled_reports() == 1
    await host.command(events_pb2.COMMAND_KIND_ENABLE_NETWORK)  # reported once is enough
    assert host.enabled_reports() == 1
