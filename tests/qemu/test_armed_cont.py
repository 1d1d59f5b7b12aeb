"""A destination's RESUME_VM sent before the source's state is there (the handoff can finish
before QEMU does): `cont` waits for that state, since QEMU 7.2 would otherwise try the disks'
locks the source still holds, or only arm autostart; and the command succeeds once the guest
runs, not when QEMU accepts `cont`, so what the coordinator does next (announce-self) follows
the guest's start."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from google.protobuf.message import Message

from hostd import qemu
from hostd.drivers.lease import FileLeaseDriver
from hostd.drivers.network import NullNetworkDriver
from hostd.executor import Executor, free_port
from hostd.vm import VmRuntime
from tools.guest import boot_disk
from whimbrel.v1 import common_pb2, events_pb2, host_pb2


class Reported:
    def __init__(self) -> None:
        self.payloads: list[tuple[Message, int]] = []

    async def emit(self, payload: Message, time_us: int) -> None:
        self.payloads.append((payload, time_us))

    def qmp_event(self, name: str) -> int:
        """QEMU's timestamp (µs) of the first `name` event reported."""
        for payload, time_us in self.payloads:
            if isinstance(payload, events_pb2.QmpEventReceived) and payload.event == name:
                return time_us
        raise AssertionError(f"no {name} event was reported")


async def test_a_destination_cont_waits_for_the_source_state_and_answers_once_it_runs(
    tmp_path: Path,
) -> None:
    spec = common_pb2.VmSpec(
        name="vm-1", memory_mib=64, vcpus=1, machine="pc",
        disks=[common_pb2.Disk(path=str(boot_disk(tmp_path / "disk.img")), format="raw")],
    )  # fmt: skip
    source_reports, destination_reports = Reported(), Reported()
    source = VmRuntime(spec, tmp_path / "src", source_reports.emit, role="source")
    destination = VmRuntime(spec, tmp_path / "dst", destination_reports.emit, role="destination")
    executor = Executor("host-b", tmp_path / "state", "127.0.0.1",
                        FileLeaseDriver(tmp_path / "locks"), NullNetworkDriver(),
                        destination_reports.emit, vms={"vm-1": destination})  # fmt: skip
    # The handoff gave this destination the lease: hostd sends cont only where the lease is.
    await executor.lease.acquire("vm-1", "host-b", 1)
    pids = []
    try:
        for runtime, incoming in ((source, False), (destination, True)):
            args = qemu.command_line(spec, runtime.paths, "host", incoming=incoming)
            pids.append(await qemu.launch(args, runtime.paths, "vm-1"))
            await runtime.attach(pids[-1])
        events = {"capabilities": [{"capability": "events", "state": True}]}
        uri = f"tcp:127.0.0.1:{free_port('127.0.0.1')}"
        await destination.execute("migrate-set-capabilities", events)
        await destination.execute("migrate-incoming", {"uri": uri})
        # Sent before the migration even starts: the source holds the disk's lock.
        resume = asyncio.create_task(
            executor.resume_vm(
                host_pb2.Command(
                    command_id="c-1", vm="vm-1", kind=events_pb2.COMMAND_KIND_RESUME_VM
                )
            )
        )
        await source.execute("migrate-set-capabilities", events)
        await source.execute("migrate", {"uri": uri})
        await resume
        answered_us = time.time_ns() // 1000
        assert destination.running
        started_us = destination_reports.qmp_event("RESUME")
        # The guest started once the migration completed, before the command answered.
        assert source_reports.qmp_event("STOP") <= started_us <= answered_us
        completed = [
            time_us
            for payload, time_us in destination_reports.payloads
            if isinstance(payload, events_pb2.QmpEventReceived)
            and '"completed"' in payload.data_json
        ]
        assert completed and completed[0] <= started_us
        status = await destination.execute("query-status")
        assert status["status"] == "running"
    finally:
        for runtime in (source, destination):
            await runtime.close()
        for pid in pids:
            await qemu.kill(pid)
