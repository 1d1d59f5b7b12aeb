"""The invariant checker as a witness of what a buggy coordinator or a hostile host could write:
each log below breaks an invariant of DESIGN.md in a way the checker once let pass.

Every log starts as a pre-copy migration of vm-1 from host-a to host-b whose handoff is done
(`handoff`); each test adds the events that break, or keep, an invariant."""

from __future__ import annotations

from typing import Any

from coordinator.core.events import Event
from coordinator.core.invariants import InvariantChecker
from whimbrel.v1 import common_pb2
from whimbrel.v1 import events_pb2 as E

K = E.CommandKind


class Log:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def coordinator(self, payload: Any, stream: str = "migration/m-1", epoch: int = 1) -> int:
        seq = len(self.events) + 1
        self.events.append(Event(seq, stream, type(payload).__name__, epoch, seq, payload))
        return seq

    def host(self, host: str, payload: Any, stream: str = "migration/m-1") -> int:
        seq = len(self.events) + 1
        event = Event(seq, stream, type(payload).__name__, 1, seq, payload,
                      origin_host=host, origin_generation=1, origin_seq=seq)  # fmt: skip
        self.events.append(event)
        return seq

    def issue(self, command_id: str, host: str, kind: int, migration_id: str = "m-1",
              generation: int = 0) -> int:  # fmt: skip
        args = E.CommandArgs(lease_generation=generation)
        payload = E.CommandIssued(command_id=command_id, migration_id=migration_id, attempt=1,
                                  host_id=host, vm="vm-1", kind=kind, args=args)  # fmt: skip
        return self.coordinator(payload, "migration/m-1" if migration_id else "vm/vm-1")

    def answer(self, host: str, command_id: str, kind: int, *, rejected: bool = False,
               failed: bool = False) -> int:  # fmt: skip
        if failed or rejected:
            payload: Any = E.CommandFailed(command_id=command_id, attempt=1, kind=kind, vm="vm-1",
                                           error="refused", rejected=rejected)  # fmt: skip
        else:
            payload = E.CommandSucceeded(command_id=command_id, attempt=1, kind=kind, vm="vm-1")
        return self.host(host, payload)

    def qmp(self, host: str, event: str, status: str = "") -> int:
        data = f'{{"status": "{status}"}}' if status else "{}"
        return self.host(host, E.QmpEventReceived(vm="vm-1", event=event, data_json=data))

    def snapshot(self, host: str, runstate: str, alive: bool = True) -> int:
        observation = common_pb2.VmObservation(vm="vm-1", process_alive=alive, runstate=runstate)
        return self.host(host, E.VmObserved(observation=observation, reason="hello"))

    def found(self, *, final: bool = False) -> list[tuple[int, int]]:
        checker = InvariantChecker()
        violations = checker.check_quiescent(self.events) if final else checker.check(self.events)
        return sorted((v.seq, v.invariant) for v in violations)


def running_on_a() -> Log:
    log = Log()
    for host in ("host-a", "host-b"):
        log.coordinator(E.HostConnected(host_id=host, generation=1), f"host/{host}")
    log.issue("vm/vm-1/1-start-vm", "host-a", K.COMMAND_KIND_START_VM, "", generation=1)
    log.host("host-a", E.LeaseAcquired(vm="vm-1", holder="host-a", generation=1))
    log.qmp("host-a", "RESUME")
    log.answer("host-a", "vm/vm-1/1-start-vm", K.COMMAND_KIND_START_VM)
    return log


def handoff() -> Log:
    """The source stopped and let go of its lease, the destination took it and enabled its
    networking: all that may come next is the destination's cont."""
    log = running_on_a()
    requested = E.MigrationRequested(migration_id="m-1", vm="vm-1", source="host-a",
                                     destination="host-b", source_lease_generation=1)  # fmt: skip
    log.coordinator(requested)
    log.qmp("host-a", "STOP")
    log.qmp("host-a", "MIGRATION", "completed")
    log.qmp("host-b", "MIGRATION", "completed")
    log.host("host-a", E.LeaseReleased(vm="vm-1", holder="host-a", generation=1))
    log.issue("m-1/1/5-acquire-lease", "host-b", K.COMMAND_KIND_ACQUIRE_LEASE, generation=2)
    log.host("host-b", E.LeaseAcquired(vm="vm-1", holder="host-b", generation=2))
    log.answer("host-b", "m-1/1/5-acquire-lease", K.COMMAND_KIND_ACQUIRE_LEASE)
    log.host("host-b", E.NetworkChanged(vm="vm-1", state=E.NETWORK_STATE_ENABLED))
    return log


def finished(phase: int) -> E.MigrationFinished:
    return E.MigrationFinished(migration_id="m-1", phase=common_pb2.MigrationPhase.ValueType(phase))


def cont(log: Log) -> int:
    return log.issue("m-1/1/9-resume-vm", "host-b", K.COMMAND_KIND_RESUME_VM)


def test_a_clean_handoff_passes() -> None:
    log = handoff()
    cont(log)
    log.qmp("host-b", "RESUME")
    log.answer("host-b", "m-1/1/9-resume-vm", K.COMMAND_KIND_RESUME_VM)
    log.coordinator(finished(common_pb2.MIGRATION_PHASE_COMPLETED))
    assert log.found(final=True) == []


def test_the_source_seen_running_in_a_snapshot_after_the_cont() -> None:
    """QMP events are lost while no hostd listens: a restarted hostd's snapshot may be the only
    word that the source ran again."""
    log = handoff()
    cont(log)
    seen = log.snapshot("host-a", "running")
    assert (seen, 3) in log.found()


def test_a_cont_while_a_resume_of_the_source_is_in_flight() -> None:
    log = handoff()
    log.issue("m-1/1/8-resume-vm", "host-a", K.COMMAND_KIND_RESUME_VM)
    early = cont(log)
    resumed = log.answer("host-a", "m-1/1/8-resume-vm", K.COMMAND_KIND_RESUME_VM)
    found = log.found()
    assert (early, 2) in found and (resumed, 3) in found
    # So is a cancel; answered before the cont (refused: the source completed), it is over.
    log = handoff()
    log.issue("m-1/1/8-cancel-migration", "host-a", K.COMMAND_KIND_CANCEL_MIGRATION)
    early = cont(log)
    assert (early, 2) in log.found()
    log = handoff()
    log.issue("m-1/1/8-cancel-migration", "host-a", K.COMMAND_KIND_CANCEL_MIGRATION)
    log.answer("host-a", "m-1/1/8-cancel-migration", K.COMMAND_KIND_CANCEL_MIGRATION, failed=True)
    cont(log)
    assert log.found() == []


def test_a_vm_command_without_migration_id_is_judged_as_the_open_migrations() -> None:
    log = handoff()
    cont(log)
    resumed = log.issue("vm/vm-1/2-resume-vm", "host-a", K.COMMAND_KIND_RESUME_VM, "")
    assert (resumed, 3) in log.found()


def test_another_hosts_rejection_does_not_undo_the_cont() -> None:
    log = handoff()
    cont(log)
    forged = log.answer("host-a", "m-1/1/9-resume-vm", K.COMMAND_KIND_RESUME_VM, rejected=True)
    cancel = log.issue("m-1/1/10-cancel-migration", "host-a", K.COMMAND_KIND_CANCEL_MIGRATION)
    found = log.found()
    assert (forged, 9) in found and (cancel, 3) in found
    # The destination's own rejection means the cont never reached QEMU.
    log = handoff()
    cont(log)
    log.answer("host-b", "m-1/1/9-resume-vm", K.COMMAND_KIND_RESUME_VM, rejected=True)
    log.issue("m-1/1/10-cancel-migration", "host-a", K.COMMAND_KIND_CANCEL_MIGRATION)
    assert log.found() == []


def test_the_destination_seen_running_before_its_networking_was_enabled() -> None:
    log = handoff()
    log.events.pop()  # no NetworkChanged
    ran = log.qmp("host-b", "RESUME")
    assert (ran, 2) in log.found()


def test_a_destination_that_gave_its_lease_back_before_the_cont() -> None:
    log = handoff()
    log.host("host-b", E.LeaseReleased(vm="vm-1", holder="host-b", generation=2))
    early = cont(log)
    assert (early, 2) in log.found()


def test_a_snapshot_that_cannot_tell_does_not_end_a_running_copy() -> None:
    """Alive with QMP unreachable is unknown: the copy may still run."""
    log = running_on_a()
    log.snapshot("host-a", "")
    second = log.snapshot("host-b", "running")
    assert (second, 1) in log.found()


def test_a_rollback_after_the_cont() -> None:
    log = handoff()
    cont(log)
    rollback = log.coordinator(E.RollbackDecided(migration_id="m-1", reason="test"))
    assert (rollback, 3) in log.found()


def test_a_host_stream_carries_no_decision() -> None:
    log = handoff()
    cont(log)
    forged = log.host("host-a", finished(common_pb2.MIGRATION_PHASE_COMPLETED))
    found = log.found(final=True)
    assert (forged, 9) in found
    # Not taken as the migration's end: it is still open at the end of the log.
    assert any(invariant == 8 for _, invariant in found)


def test_a_host_speaks_only_for_itself() -> None:
    log = running_on_a()
    other_stream = log.host("host-a", E.HostCapacityChanged(), stream="host/host-b")
    for_another = log.host("host-a", E.LeaseReleased(vm="vm-1", holder="host-b", generation=1))
    never_issued = log.answer("host-a", "vm/vm-1/77-destroy-vm", K.COMMAND_KIND_DESTROY_VM)
    assert log.found() == [(other_stream, 9), (for_another, 9), (never_issued, 9)]


def test_a_lease_taken_at_a_generation_never_handed_out() -> None:
    log = running_on_a()
    log.host("host-a", E.LeaseReleased(vm="vm-1", holder="host-a", generation=1))
    taken = log.host("host-b", E.LeaseAcquired(vm="vm-1", holder="host-b", generation=9))
    assert (taken, 4) in log.found()


def test_a_host_that_saw_a_newer_epoch_than_the_log_has() -> None:
    """The log was forked, or restored from an older copy."""
    log = running_on_a()
    forked = log.coordinator(E.HostConnected(host_id="host-b", generation=2,
                                             highest_epoch_seen=7), "host/host-b")  # fmt: skip
    assert log.found() == [(forked, 5)]


def test_a_migration_finished_in_a_phase_that_is_no_end() -> None:
    log = handoff()
    ended = log.coordinator(finished(common_pb2.MIGRATION_PHASE_HANDOFF))
    assert (ended, 8) in log.found()


def test_a_resume_sent_to_a_host_without_the_lease() -> None:
    log = handoff()
    log.coordinator(finished(common_pb2.MIGRATION_PHASE_COMPLETED))
    resumed = log.issue("vm/vm-1/3-resume-vm", "host-a", K.COMMAND_KIND_RESUME_VM, "")
    assert (resumed, 4) in log.found()


def test_an_answer_of_another_attempt_settles_nothing() -> None:
    log = handoff()
    issued = cont(log)
    other = E.CommandSucceeded(command_id="m-1/1/9-resume-vm", attempt=2,
                               kind=K.COMMAND_KIND_RESUME_VM, vm="vm-1")  # fmt: skip
    answered = log.host("host-b", other)
    found = log.found(final=True)
    assert (answered, 9) in found and (issued, 6) in found


def test_a_command_issued_after_its_migration_ended() -> None:
    log = handoff()
    cont(log)
    log.answer("host-b", "m-1/1/9-resume-vm", K.COMMAND_KIND_RESUME_VM)
    log.coordinator(finished(common_pb2.MIGRATION_PHASE_COMPLETED))
    late = log.issue("m-1/1/10-announce", "host-b", K.COMMAND_KIND_ANNOUNCE)
    assert (late, 8) in log.found()
