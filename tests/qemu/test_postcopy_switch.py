"""A START_MIGRATION that carries the switch to post-copy (mode postcopy), with real QEMU and
hostd's executor on both ends: the switch wins even over a guest whose first pass ends within
milliseconds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from google.protobuf.message import Message

from coordinator.core.lifecycle import (
    POSTCOPY_MODE_DOWNTIME_LIMIT_MS,
    POSTCOPY_SWITCH_PRECOPY_BANDWIDTH,
)
from hostd.drivers.lease import FileLeaseDriver
from hostd.drivers.network import NullNetworkDriver
from hostd.executor import Executor
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

pytestmark = pytest.mark.qemu
K = events_pb2
# All-zero RAM: QEMU's first pass sends it in milliseconds.
SPEC = common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1)
WAIT_S = 60


class Host:
    """One host's executor, without migration TLS (its handshake would widen the window)."""

    def __init__(self, root: Path, host_id: str) -> None:
        self.statuses: list[str] = []
        self.executor = Executor(
            host_id, root / host_id, "127.0.0.1", FileLeaseDriver(root / "locks"),
            NullNetworkDriver(), self.emit,
        )  # fmt: skip
        self.ended = asyncio.Event()

    async def emit(self, payload: Message, time_us: int) -> None:
        if isinstance(payload, K.QmpEventReceived) and payload.event == "MIGRATION":
            status = json.loads(payload.data_json)["status"]
            self.statuses.append(status)
            if status in ("completed", "failed", "cancelled"):
                self.ended.set()

    async def run(self, kind: int, **args: object) -> events_pb2.CommandResult:
        command = host_pb2.Command(
            command_id=f"c-{kind}", vm="vm-1", kind=events_pb2.CommandKind.ValueType(kind),
            args=events_pb2.CommandArgs(**args),  # type: ignore[arg-type]
        )  # fmt: skip
        return await self.executor.run(command)

    async def close(self) -> None:
        for runtime in list(self.executor.vms.values()):
            await runtime.kill("test over")
            await runtime.close()


async def test_the_switch_sent_with_the_start_wins_over_a_first_pass_that_converges(
    tmp_path: Path,
) -> None:
    """QEMU 7.2 measures no bandwidth in a migration's first 100 ms and meanwhile completes as
    soon as nothing is pending: all-zero RAM, sent in its first pass, then completed as
    pre-copy whenever migrate-start-postcopy reached QEMU after the migration thread's first
    look (1 run in 5 with the switch sent on migrate's answer, 1 in 12 with both sent
    together). Pre-copy throttled, the switch always wins: the source goes post-copy."""
    source, destination = Host(tmp_path, "host-a"), Host(tmp_path, "host-b")
    try:
        await source.run(K.COMMAND_KIND_START_VM, spec=SPEC, lease_generation=1)
        prepared = await destination.run(K.COMMAND_KIND_PREPARE_INCOMING, spec=SPEC, postcopy=True)
        # As the coordinator sends it (coordinator/core/lifecycle.py).
        parameters = events_pb2.MigrationParameters(
            downtime_limit_ms=POSTCOPY_MODE_DOWNTIME_LIMIT_MS,
            max_bandwidth=POSTCOPY_SWITCH_PRECOPY_BANDWIDTH,
        )
        await source.run(
            K.COMMAND_KIND_START_MIGRATION, uri=prepared.uri, postcopy=True,
            parameters=parameters, start_postcopy=True,
        )  # fmt: skip
        await asyncio.wait_for(source.ended.wait(), WAIT_S)
        assert source.statuses[-1] == "completed", source.statuses
        assert "postcopy-active" in source.statuses, source.statuses
    finally:
        await source.close()
        await destination.close()
