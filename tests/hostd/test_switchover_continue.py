"""A pre-copy source armed by START_MIGRATION continues its switchover by itself once it has
stopped in pre-switchover: once, never after the coordinator changed course, and still after
a hostd restart (the arming is kept beside the QEMU files). The QMP commands are recorded
instead of sent: the real-QEMU tests (tests/qemu/test_switchover_faults.py) run the rest."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from hostd.drivers.lease import FileLeaseDriver
from hostd.drivers.network import HookNetworkDriver
from hostd.errors import HostdError, QmpError
from hostd.executor import Executor
from hostd.vm import VmRuntime
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

SPEC = common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1)
CONTINUE = ("migrate-continue", {"state": "pre-switchover"})


class Source:
    def __init__(self, tmp_path: Path) -> None:
        hook = tmp_path / "hook.sh"
        hook.write_text("#!/bin/sh\n")
        hook.chmod(0o755)
        self.root = tmp_path / "vm"
        self.sent: list[tuple[str, dict[str, Any] | None]] = []
        self.refuse = False
        self.answer = asyncio.Event()  # QEMU answers once set
        self.answer.set()
        self.executor = Executor("host-a", tmp_path / "state", "127.0.0.1",
                                 FileLeaseDriver(tmp_path / "locks"),
                                 HookNetworkDriver(hook, "host-a"), self.emit)  # fmt: skip
        self.runtime = self.load(VmRuntime(SPEC, self.root, self.emit, role="source"))
        self.runtime.save()  # its directory, as a launched QEMU has

    def load(self, runtime: VmRuntime) -> VmRuntime:
        """`runtime` as this host's vm-1, its QMP commands recorded (no QEMU behind it)."""
        runtime.execute = self.execute  # type: ignore[method-assign]
        self.executor.vms["vm-1"] = runtime
        self.runtime = runtime
        return runtime

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, **_: Any) -> Any:
        self.sent.append((command, arguments))
        await self.answer.wait()
        if self.refuse:
            error = "Migration not in expected state: failed"
            raise QmpError(error, vm="vm-1", command=command, error_class="GenericError",
                           reply={"error": {"class": "GenericError", "desc": error}})  # fmt: skip
        return {}

    async def emit(self, payload: Message, time_us: int) -> None:
        pass

    async def event(self, name: str, status: str = "") -> None:
        await self.runtime._on_event(name, {"status": status} if status else {}, 1)

    async def stop_for_switchover(self) -> None:
        await self.event("MIGRATION", "active")
        await self.event("STOP")
        await self.event("MIGRATION", "pre-switchover")
        await self.settled()

    async def command(self, kind: int) -> None:
        await self.executor.run(host_pb2.Command(command_id=f"c-{kind}", vm="vm-1", kind=kind))

    async def settled(self) -> None:
        while self.runtime._beside_tasks:
            await asyncio.gather(*self.runtime._beside_tasks)

    def continues(self) -> int:
        return self.sent.count(CONTINUE)


async def test_an_armed_source_continues_once_it_stopped_in_pre_switchover(
    tmp_path: Path,
) -> None:
    source = Source(tmp_path)
    source.runtime.arm_continue_at_pre_switchover()
    await source.event("MIGRATION", "active")
    await source.event("STOP")  # a STOP alone may be anything (an I/O error, a guest panic)
    await source.settled()
    assert source.continues() == 0
    await source.event("MIGRATION", "pre-switchover")
    await source.event("MIGRATION", "device")
    await source.event("MIGRATION", "completed")
    await source.settled()
    assert source.continues() == 1
    assert not source.runtime.continue_was_armed


async def test_without_arming_nothing_continues(tmp_path: Path) -> None:
    source = Source(tmp_path)
    await source.stop_for_switchover()
    assert source.sent == []


@pytest.mark.parametrize(
    "kind",
    [events_pb2.COMMAND_KIND_ACQUIRE_LEASE, events_pb2.COMMAND_KIND_CANCEL_MIGRATION],
)
async def test_a_change_of_course_disarms_it(tmp_path: Path, kind: int) -> None:
    """A rollback (the source takes its lease back, then cancels) arrives before the stop:
    the source must stay where it stopped for the cancel, not complete the switch."""
    source = Source(tmp_path)
    source.runtime.arm_continue_at_pre_switchover()
    with contextlib.suppress(HostdError):  # (no lease to take here: it disarms first)
        await source.command(kind)
    await source.stop_for_switchover()
    assert source.continues() == 0
    assert not source.runtime.continue_was_armed


async def test_a_migration_that_failed_first_disarms_it(tmp_path: Path) -> None:
    source = Source(tmp_path)
    source.runtime.arm_continue_at_pre_switchover()
    await source.event("MIGRATION", "failed")
    await source.stop_for_switchover()
    assert source.continues() == 0


async def test_a_refused_continue_is_left_to_the_coordinator(tmp_path: Path) -> None:
    """QEMU refuses (its migration failed meanwhile): logged, nothing raised; the
    coordinator's CONTINUE_SWITCHOVER covers a continue that did not happen."""
    source = Source(tmp_path)
    source.refuse = True
    source.runtime.arm_continue_at_pre_switchover()
    await source.stop_for_switchover()
    assert source.continues() == 1


async def test_a_restarted_hostd_finds_the_arming_and_continues(tmp_path: Path) -> None:
    source = Source(tmp_path)
    source.runtime.arm_continue_at_pre_switchover()
    # The hostd dies; the source stops while none watches; a new hostd loads the VM's files.
    restarted = source.load(VmRuntime.load(source.root, source.emit))
    assert restarted.continue_was_armed and not restarted.continue_at_pre_switchover
    restarted.arm_continue_at_pre_switchover()  # as Agent.reattach does
    restarted.stopped, restarted.migration_status = True, "pre-switchover"  # its snapshot
    restarted.maybe_continuing_switchover()
    await source.settled()
    assert source.continues() == 1


async def test_the_arming_outlives_a_continue_until_qemu_answered_it(tmp_path: Path) -> None:
    """A hostd that dies between sending migrate-continue and QEMU's answer cannot know
    whether it took: the marker stays until the answer, so a restarted hostd sends it again
    (QEMU takes it only in pre-switchover)."""
    source = Source(tmp_path)
    source.answer.clear()
    source.runtime.arm_continue_at_pre_switchover()
    await source.event("MIGRATION", "active")
    await source.event("STOP")
    await source.event("MIGRATION", "pre-switchover")
    await asyncio.sleep(0)  # the continue is sent; QEMU has not answered
    assert source.continues() == 1
    assert source.runtime.continue_was_armed and not source.runtime.continue_at_pre_switchover
    await source.event("MIGRATION", "device")  # a later event does not send it twice
    source.answer.set()
    await source.settled()
    assert source.continues() == 1
    assert not source.runtime.continue_was_armed
