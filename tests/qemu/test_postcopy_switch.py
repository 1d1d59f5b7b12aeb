"""START_MIGRATION with real QEMU and hostd's executor on both ends: a start that carries the
switch to post-copy wins over a guest whose first pass ends within milliseconds, and a start
after a rolled-back one inherits none of its capabilities or parameters."""

from __future__ import annotations

import asyncio
import itertools
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
        self.ids = itertools.count(1)

    def restart_watch(self) -> None:
        self.statuses.clear()
        self.ended.clear()

    async def emit(self, payload: Message, time_us: int) -> None:
        if isinstance(payload, K.QmpEventReceived) and payload.event == "MIGRATION":
            status = json.loads(payload.data_json)["status"]
            self.statuses.append(status)
            if status in ("completed", "failed", "cancelled"):
                self.ended.set()

    async def run(self, kind: int, **args: object) -> events_pb2.CommandResult:
        command = host_pb2.Command(
            command_id=f"c-{next(self.ids)}", vm="vm-1",
            kind=events_pb2.CommandKind.ValueType(kind),
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


async def test_a_start_after_a_rolled_back_one_inherits_none_of_its_choices(
    tmp_path: Path,
) -> None:
    """QEMU keeps migration capabilities and parameters for the life of the process: a
    throttled pre-copy start with pause-before-switchover, cancelled, left both in force, and
    the next start from the same source, with the policy's defaults, ran at 100 kB/s."""
    source, destination = Host(tmp_path, "host-a"), Host(tmp_path, "host-b")
    try:
        await source.run(K.COMMAND_KIND_START_VM, spec=SPEC, lease_generation=1)
        throttled = events_pb2.MigrationParameters(max_bandwidth=100_000, downtime_limit_ms=1)
        prepared = await destination.run(K.COMMAND_KIND_PREPARE_INCOMING, spec=SPEC)
        await source.run(
            K.COMMAND_KIND_START_MIGRATION, uri=prepared.uri, parameters=throttled,
            pause_before_switchover=True,
        )  # fmt: skip
        await source.run(K.COMMAND_KIND_CANCEL_MIGRATION)
        await asyncio.wait_for(source.ended.wait(), WAIT_S)
        assert source.statuses[-1] == "cancelled", source.statuses
        await destination.run(K.COMMAND_KIND_DESTROY_VM, force=True)
        source.restart_watch()
        prepared = await destination.run(K.COMMAND_KIND_PREPARE_INCOMING, spec=SPEC)
        await source.run(K.COMMAND_KIND_START_MIGRATION, uri=prepared.uri)
        runtime = source.executor.vms["vm-1"]
        parameters = await runtime.execute("query-migrate-parameters")
        capabilities = {
            c["capability"]: c["state"] for c in await runtime.execute("query-migrate-capabilities")
        }
        assert (parameters["max-bandwidth"], parameters["downtime-limit"]) == (128 << 20, 300)
        assert capabilities["pause-before-switchover"] is False
        await asyncio.wait_for(source.ended.wait(), WAIT_S)
        assert source.statuses[-1] == "completed", source.statuses
    finally:
        await source.close()
        await destination.close()
