"""hostd's command rules, on real files: at most once per command id, stale epochs refused
without acting, a command interrupted by a restart reported, never re-run."""

from __future__ import annotations

from pathlib import Path

from hostd.agent import Agent
from hostd.drivers.network import NullNetworkDriver
from whimbrel.v1 import events_pb2, host_pb2


def agent(tmp_path: Path) -> Agent:
    return Agent("host-a", "127.0.0.1:1", tmp_path / "state", tmp_path / "locks", "127.0.0.1",
                 NullNetworkDriver())  # fmt: skip


def acquire(command_id: str, generation: int, epoch: int) -> host_pb2.Command:
    return host_pb2.Command(
        command_id=command_id, epoch=epoch, vm="vm-1", kind=events_pb2.COMMAND_KIND_ACQUIRE_LEASE,
        args=events_pb2.CommandArgs(lease_generation=generation),
    )  # fmt: skip


def release(command_id: str, generation: int, epoch: int) -> host_pb2.Command:
    return host_pb2.Command(
        command_id=command_id, epoch=epoch, vm="vm-1", kind=events_pb2.COMMAND_KIND_RELEASE_LEASE,
        args=events_pb2.CommandArgs(lease_generation=generation),
    )  # fmt: skip


def kinds(a: Agent) -> list[str]:
    return [str(e.payload.WhichOneof("kind")) for e in a.pending]


async def test_command_runs_once_and_repeats_get_the_stored_result(tmp_path: Path) -> None:
    """A repeated command id is answered with the first result; the lease is taken once."""
    a = agent(tmp_path)
    await a._handle(acquire("c-1", 1, epoch=1))
    await a._handle(acquire("c-1", 1, epoch=1))
    assert kinds(a) == ["lease_acquired", "command_succeeded", "command_succeeded"]
    first, again = a.pending[1].payload.command_succeeded, a.pending[2].payload.command_succeeded
    assert first == again and first.result.lease_generation == 1
    await a.close()


async def test_an_id_reused_for_another_command_gets_a_refusal_not_its_result(
    tmp_path: Path,
) -> None:
    """Command ids are unique forever; a coordinator that reuses one for another command (kind
    or VM) was answered with the first command's stored result, and the second one never ran.
    Now it is refused, naming what the id was."""
    a = agent(tmp_path)
    await a._handle(acquire("c-1", 1, epoch=1))
    await a._handle(release("c-1", 1, epoch=1))
    refused = a.pending[-1].payload.command_failed
    assert refused.rejected and refused.kind == events_pb2.COMMAND_KIND_RELEASE_LEASE
    assert "c-1 was acquire-lease of VM vm-1 here" in refused.error
    assert a.executor.lease.read("vm-1").holder == "host-a"  # the release did not run
    await a.close()


async def test_stale_epoch_is_refused_without_acting(tmp_path: Path) -> None:
    """After epoch 3 was seen (and stored), an epoch-2 command is rejected and changes nothing."""
    a = agent(tmp_path)
    await a._handle(acquire("c-1", 1, epoch=3))
    await a._handle(acquire("c-2", 2, epoch=2))
    refused = a.pending[-1].payload.command_failed
    assert refused.rejected and "stale epoch 2" in refused.error
    assert a.executor.lease.read("vm-1").generation == 1
    await a.close()
    restarted = agent(tmp_path)  # the epoch survived the restart
    assert restarted.store.highest_epoch == 3 and restarted.generation == 2
    await restarted.close()


async def test_command_interrupted_by_restart_is_reported_not_rerun(tmp_path: Path) -> None:
    """A command marked started but never finished (hostd died) is interrupted from the next
    start on, and fails on its repeat."""
    a = agent(tmp_path)
    a.store.command_started("c-1")
    await a.close()
    restarted = agent(tmp_path)
    # "started" means running in this process (the shell simulation waits on it).
    stored = restarted.store.command("c-1")
    assert stored is not None and (stored.state, stored.result) == ("interrupted", None)
    await restarted._handle(acquire("c-1", 1, epoch=1))
    failure = restarted.pending[-1].payload.command_failed
    assert "interrupted by a hostd restart" in failure.error
    assert restarted.executor.lease.read("vm-1").holder == ""
    await restarted.close()


async def test_unacknowledged_events_survive_a_restart(tmp_path: Path) -> None:
    """The outbox keeps events until acknowledged, across hostd restarts, with their origin."""
    a = agent(tmp_path)
    await a._handle(acquire("c-1", 1, epoch=1))
    a._acknowledged(host_pb2.Ack(generation=1, seq=1))
    await a.close()
    restarted = agent(tmp_path)
    assert [(e.generation, e.seq) for e in restarted.pending] == [(1, 2)]
    assert restarted.pending[0].payload.WhichOneof("kind") == "command_succeeded"
    await restarted.close()


async def test_a_release_repeated_after_its_report_was_lost_reports_it(tmp_path: Path) -> None:
    """The release acted (the lease file is free) but hostd died before recording it; the
    repeat (a new command id: the coordinator's retry) finds nothing held. It reports the
    release of the generation named, or the coordinator waits for it for good. A host that
    holds a later generation refuses, reports no release, and keeps it; a generation never
    handed out is not reported released."""
    a = agent(tmp_path)
    await a._handle(acquire("c-1", 1, epoch=1))
    await a.executor.lease.release("vm-1", "host-a", 1)  # acted; its report lost with hostd
    await a._handle(release("c-2", 1, epoch=1))
    assert kinds(a)[-2:] == ["lease_released", "command_succeeded"]
    assert a.pending[-2].payload.lease_released.generation == 1
    await a._handle(release("c-3", 9, epoch=1))  # a generation never handed out
    assert kinds(a)[-1] == "command_succeeded" and kinds(a)[-2] != "lease_released"
    await a._handle(acquire("c-5", 2, epoch=1))
    await a._handle(release("c-4", 1, epoch=1))  # a late release of the old generation
    assert kinds(a)[-2:] == ["command_succeeded", "command_failed"]  # (c-5's answer first)
    assert a.executor.lease.read("vm-1").generation == 2
    await a.close()
