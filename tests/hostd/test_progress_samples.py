"""A transferring source is sampled every few seconds, not only at each pass (a pass can take
minutes): the coordinator judges a stuck stream by samples that show no byte sent. QEMU's
answers are fed by hand here; the real-QEMU test is tests/qemu/test_switchover_faults.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from hostd import vm as vm_module
from hostd.vm import VmRuntime
from whimbrel.v1 import common_pb2, events_pb2

SPEC = common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1)


class Sampled:
    def __init__(self, tmp_path: Path, role: str) -> None:
        self.samples: list[events_pb2.MigrationStatsSampled] = []
        self.new_sample = asyncio.Event()
        self.sent = 0
        self.runtime = VmRuntime(SPEC, tmp_path / "vm", self.emit, role=role)
        self.runtime.execute = self.execute  # type: ignore[method-assign]

    async def execute(self, command: str, arguments: Any = None, **_: Any) -> Any:
        assert command == "query-migrate"
        self.sent += 4096  # a slow stream, but a moving one
        return {"status": self.runtime.migration_status, "ram": {"transferred": self.sent}}

    async def emit(self, payload: Message, time_us: int) -> None:
        if isinstance(payload, events_pb2.MigrationStatsSampled):
            self.samples.append(payload)
            self.new_sample.set()

    async def status(self, status: str) -> None:
        await self.runtime._on_event("MIGRATION", {"status": status}, 1)

    async def until(self, samples: int) -> None:
        while len(self.samples) < samples:
            self.new_sample.clear()
            await self.new_sample.wait()


@pytest.fixture(autouse=True)
def often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm_module, "PROGRESS_SAMPLE_EVERY_S", 0.01)


async def test_a_transferring_source_is_sampled_until_its_transfer_ends(tmp_path: Path) -> None:
    source = Sampled(tmp_path, "source")
    await source.status("active")
    await asyncio.wait_for(source.until(3), 5)
    sent = [s.transferred_bytes for s in source.samples]
    assert sent == sorted(sent) and all(s.status == "active" for s in source.samples)
    assert {getattr(s, "pass") for s in source.samples} == {0}  # between passes
    await source.status("pre-switchover")  # the switch: no sampling into the guest's pause
    await asyncio.sleep(0.05)
    settled = len(source.samples)
    await asyncio.sleep(0.05)
    assert len(source.samples) == settled
    assert source.runtime._progress_watch is not None and source.runtime._progress_watch.done()


async def test_a_post_copy_source_is_sampled_and_again_after_a_recovery(tmp_path: Path) -> None:
    """In post-copy the coordinator judges a wedged link by the same samples: they go on from
    the switch (the watch started in pre-copy carries on), stop while post-copy is paused, and
    start again once a recovery has it sending."""
    source = Sampled(tmp_path, "source")
    await source.status("active")
    await asyncio.wait_for(source.until(1), 5)
    await source.status("postcopy-active")
    await asyncio.wait_for(source.until(len(source.samples) + 2), 5)
    assert source.samples[-1].status == "postcopy-active"
    await source.status("postcopy-paused")
    await asyncio.sleep(0.05)
    assert source.runtime._progress_watch is not None and source.runtime._progress_watch.done()
    await source.status("postcopy-recover")
    await source.status("postcopy-active")  # recovered
    await asyncio.wait_for(source.until(len(source.samples) + 2), 5)
    assert source.samples[-1].status == "postcopy-active"
    await source.runtime.close()


async def test_a_destination_is_not_sampled(tmp_path: Path) -> None:
    destination = Sampled(tmp_path, "destination")
    await destination.status("active")
    await asyncio.sleep(0.05)
    assert destination.samples == []


@pytest.mark.parametrize("status", ["active", "postcopy-active"])
async def test_a_restarted_hostd_samples_a_source_it_finds_transferring(
    tmp_path: Path, status: str
) -> None:
    source = Sampled(tmp_path, "source")
    source.runtime.migration_status = status  # its snapshot at reattach
    source.runtime.watch_progress()
    await asyncio.wait_for(source.until(2), 5)
    await source.runtime.close()


async def test_a_new_migration_counts_its_passes_from_one(tmp_path: Path) -> None:
    """After a migration rolled back at pass 12, the next one from the same QEMU must not
    report pass 12 until its own pass 2 (mode auto would switch to post-copy at once)."""
    source = Sampled(tmp_path, "source")
    await source.status("active")
    await source.runtime._on_event("MIGRATION_PASS", {"pass": 12}, 1)
    assert source.runtime._last_pass == 12
    await source.status("cancelled")
    await source.status("setup")  # the next migration
    assert source.runtime._last_pass == 0
    await source.runtime.close()


@pytest.mark.parametrize(
    "answer",
    [
        {"status": "active", "ram": [1, 2]},
        {"status": ["active"], "ram": {"transferred": "lots", "total": -5, "mbps": "fast"}},
        {"status": "x" * 4096, "ram": {"remaining": 1 << 70, "mbps": 10**400,
                                      "dirty-pages-rate": True}, "expected-downtime": 1.5},
        {"status": "active", "ram": {"transferred": 4096, "mbps": float("nan")}},
    ],
)  # fmt: skip
async def test_a_hostile_query_migrate_answer_gives_a_sample_of_zeros(
    tmp_path: Path, answer: dict[str, Any]
) -> None:
    """What QEMU answers is checked field by field: nonsense becomes 0 (or no status), never
    an exception that would end the sampling, nor a value the log's field cannot hold."""
    source = Sampled(tmp_path, "source")

    async def hostile(command: str, arguments: Any = None, **_: Any) -> Any:
        return answer

    source.runtime.execute = hostile  # type: ignore[method-assign]
    await source.runtime._sample(0)
    (sample,) = source.samples
    ram = answer["ram"] if isinstance(answer["ram"], dict) else {}
    assert sample.status == ("active" if answer["status"] == "active" else "")
    assert sample.transferred_bytes == (4096 if ram.get("transferred") == 4096 else 0)
    assert (sample.total_bytes, sample.remaining_bytes, sample.dirty_pages_rate) == (0, 0, 0)
    assert (sample.mbps, sample.expected_downtime_ms) == (0.0, 0)
