"""Converters between the core's state and the public whimbrel.v1 messages (x_to_proto)."""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.core import Event, MigrationState, VmState, World, maintenance
from coordinator.core.state import HostState
from coordinator.log import StoredEvent
from whimbrel.protocol import PAYLOAD_FIELDS
from whimbrel.v1 import common_pb2, events_pb2, host_pb2, migration_pb2, vm_pb2


def migration_to_proto(
    m: MigrationState, places: Mapping[str, tuple[int, str]] | None = None
) -> migration_pb2.Migration:
    """`places`: the queued migrations' places and what each waits for (`scheduling.places`);
    needed to show a queued migration's place."""
    position, waiting_for = (places or {}).get(m.migration_id, (0, ""))
    if position and not waiting_for:
        waiting_for = "admission (there is room now)"
    return migration_pb2.Migration(
        migration_id=m.migration_id,
        vm=m.vm,
        source=m.source,
        destination=m.destination,
        mode=common_pb2.MigrationMode.ValueType(m.mode),
        phase=common_pb2.MigrationPhase.ValueType(m.phase),
        postcopy=m.postcopy_started,
        point_of_no_return_passed=m.point_of_no_return_passed,
        progress=_progress(m),
        reason=m.reason,
        attempt=m.attempt,
        recovery_attempts=m.recovery_attempts,
        requested_at_us=m.requested_at_us,
        finished_at_us=m.finished_at_us,
        pause_us=m.pause_us,
        last_seq=m.last_seq,
        policy=m.policy,
        queue_position=position,
        waiting_for=waiting_for,
    )


def _progress(m: MigrationState) -> migration_pb2.MigrationProgress:
    p = m.progress
    progress = migration_pb2.MigrationProgress(
        total_bytes=p.total_bytes,
        transferred_bytes=p.transferred_bytes,
        remaining_bytes=p.remaining_bytes,
        mbps=p.mbps,
        dirty_pages_rate=p.dirty_pages_rate,
        source_status=m.src.status,
    )
    setattr(progress, "pass", p.pass_)
    return progress


def vm_to_proto(vm: VmState) -> vm_pb2.Vm:
    return vm_pb2.Vm(
        spec=vm.spec,
        status=vm_pb2.VmStatus.ValueType(vm.status),
        host=vm.host,
        lease_holder=vm.lease_holder,
        lease_generation=vm.lease_generation,
        migration_id=vm.migration_id,
        lost_reason=vm.lost_reason,
    )


def host_to_proto(world: World, host: HostState) -> host_pb2.Host:
    vms = sorted(vm.name for vm in world.vms.values() if vm.host == host.host_id)
    left = maintenance.free(world, host.host_id)
    return host_pb2.Host(
        host_id=host.host_id,
        generation=host.generation,
        connected=host.connected,
        migration_address=host.migration_address,
        vms=vms,
        changed_at_us=host.changed_at_us,
        capacity=common_pb2.HostCapacity(memory_mib=host.memory_mib, vcpus=host.vcpus),
        free=common_pb2.HostCapacity(memory_mib=max(left.memory_mib, 0), vcpus=max(left.vcpus, 0)),
        cordoned=host.cordoned,
        cordon_reason=host.cordon_reason,
        drain_migrations=host.drain_migrations,
    )


def event_to_proto(stored: StoredEvent, event: Event | None = None) -> events_pb2.Event:
    """The public form of a stored event: envelope, decoded payload and the bytes hashed."""
    out = events_pb2.Event(
        seq=stored.seq,
        stream=stored.stream,
        type=stored.type,
        epoch=stored.epoch,
        time_us=stored.time_us,
        payload_bytes=stored.payload,
        prev_hash=stored.prev_hash,
        hash=stored.hash,
    )
    if stored.origin_host:
        out.origin.host_id = stored.origin_host
        out.origin.generation = stored.origin_generation
        out.origin.seq = stored.origin_seq
    field = PAYLOAD_FIELDS.get(stored.type)
    if field is not None:
        getattr(out.payload, field).MergeFromString(stored.payload)
    return out
