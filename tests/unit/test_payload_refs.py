"""protocol.refs: what each payload names of migrations, commands and VMs, read by field."""

from __future__ import annotations

from typing import Any

import pytest

from whimbrel import protocol
from whimbrel.v1 import common_pb2, events_pb2


def by_getattr(payload: Any) -> tuple[str, str, str]:
    """The same question answered field by field with getattr (slow when a field is missing)."""
    observation = getattr(payload, "observation", None)
    return (
        getattr(payload, "migration_id", ""),
        getattr(payload, "command_id", ""),
        getattr(payload, "vm", "") or getattr(observation, "vm", ""),
    )


def filled(cls: Any) -> Any:
    """An instance with every field refs may read set to a distinct value."""
    payload = cls()
    fields = cls.DESCRIPTOR.fields_by_name
    for name in ("migration_id", "command_id", "vm"):
        if name in fields:
            setattr(payload, name, f"{name}-of-{cls.DESCRIPTOR.name}")
    if "observation" in fields:
        payload.observation.vm = f"observed-{cls.DESCRIPTOR.name}"
    return payload


@pytest.mark.parametrize("type_", sorted(protocol.PAYLOAD_CLASSES))
def test_refs_read_what_the_fields_hold(type_: str) -> None:
    cls = protocol.PAYLOAD_CLASSES[type_]
    assert protocol.refs(filled(cls)) == by_getattr(filled(cls))
    assert protocol.refs(cls()) == ("", "", "")


def test_refs_name_what_a_command_result_and_an_observation_concern() -> None:
    result = events_pb2.CommandSucceeded(command_id="c-1", vm="vm-1")
    observed = events_pb2.VmObserved(observation=common_pb2.VmObservation(vm="vm-2"))
    requested = events_pb2.MigrationRequested(migration_id="m-1")
    assert protocol.refs(result) == ("", "c-1", "vm-1")
    assert protocol.refs(observed) == ("", "", "vm-2")
    assert protocol.refs(requested)[0] == "m-1"
